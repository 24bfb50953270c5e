//! Calibration of the semantic cache on a labelled set of prompt pairs
//! (`router-worker/data/semantic-pairs.tsv`): paraphrases that must hit and
//! near-misses that must not (another entity, number, negation, opposite,
//! language, format). The set is split in two halves, every other pair of
//! each category: the threshold is chosen on the tuning half (the lowest
//! with no false hit, so the most paraphrases caught), and the rates are
//! reported on the held-out half, beside plain thresholds (0.8 as GPTCache
//! and LiteLLM ship, 0.9) without the guard.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::guard::{self, Features};

/// The labelled set shipped with the router.
pub const PAIRS: &str = include_str!("../../data/semantic-pairs.tsv");

/// A second set, written after the guard's last change and never used to
/// tune anything: reported whole, with the thresholds chosen on `PAIRS`.
pub const FRESH: &str = include_str!("../../data/semantic-pairs-fresh.tsv");

#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    /// Whether `b` must be served `a`'s answer.
    pub same: bool,
    pub category: String,
    pub a: String,
    pub b: String,
}

/// Reads `same|different <TAB> category <TAB> prompt <TAB> prompt` lines
/// (blank lines and `#` comments skipped); the error names the line.
pub fn parse(text: &str) -> Result<Vec<Pair>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split('\t').collect();
        let [label, category, a, b] = f[..] else {
            return Err(format!("line {}: expected 4 tab-separated fields", n + 1));
        };
        let same = match label {
            "same" => true,
            "different" => false,
            other => return Err(format!("line {}: label `{other}`", n + 1)),
        };
        out.push(Pair {
            same,
            category: category.into(),
            a: a.into(),
            b: b.into(),
        });
    }
    Ok(out)
}

/// A pair measured: the cosine similarity and the guard's verdict.
#[derive(Debug, Clone)]
pub struct Scored {
    pub pair: Pair,
    pub similarity: f32,
    pub guard: Result<(), guard::Refusal>,
    /// In the tuning half (else held out).
    pub tune: bool,
}

/// Scores each pair with `similarity(a, b)`; splits the set, every other
/// pair of each category in the tuning half.
pub fn score(pairs: Vec<Pair>, mut similarity: impl FnMut(&str, &str) -> f32) -> Vec<Scored> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    pairs
        .into_iter()
        .map(|pair| {
            let n = seen.entry(pair.category.clone()).or_default();
            let tune = n.is_multiple_of(2);
            *n += 1;
            Scored {
                similarity: similarity(&pair.a, &pair.b),
                guard: guard::check(&Features::of(&pair.a), &Features::of(&pair.b)),
                pair,
                tune,
            }
        })
        .collect()
}

/// One policy's results on a set of pairs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rates {
    pub hits: usize,
    pub paraphrases: usize,
    pub false_hits: usize,
    pub near_misses: usize,
}

impl Rates {
    pub fn hit_rate(&self) -> f64 {
        ratio(self.hits, self.paraphrases)
    }
    pub fn false_hit_rate(&self) -> f64 {
        ratio(self.false_hits, self.near_misses)
    }
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// Whether a policy serves the cached answer for this pair.
pub fn served(s: &Scored, threshold: f32, use_guard: bool) -> bool {
    s.similarity >= threshold && (!use_guard || s.guard.is_ok())
}

pub fn rates<'a>(
    set: impl IntoIterator<Item = &'a Scored>,
    threshold: f32,
    use_guard: bool,
) -> Rates {
    let mut r = Rates {
        hits: 0,
        paraphrases: 0,
        false_hits: 0,
        near_misses: 0,
    };
    for s in set {
        let hit = served(s, threshold, use_guard);
        if s.pair.same {
            r.paraphrases += 1;
            r.hits += usize::from(hit);
        } else {
            r.near_misses += 1;
            r.false_hits += usize::from(hit);
        }
    }
    r
}

/// The lowest threshold on a 0.01 grid (0.50 to 1.00) with no false hit
/// on `set`.
pub fn choose<'a>(set: impl IntoIterator<Item = &'a Scored> + Clone, use_guard: bool) -> f32 {
    (50..=100)
        .map(|c| c as f32 / 100.0)
        .find(|&t| rates(set.clone(), t, use_guard).false_hits == 0)
        .unwrap_or(1.0)
}

/// The lowest threshold the shipped policy accepts: below it the guard
/// alone would stand between a user and a wrong answer, and a tuning half
/// with few near-misses that pass the guard can put the lowest threshold
/// without a false hit far lower than is safe.
pub const THRESHOLD_FLOOR: f32 = 0.80;

/// The shipped threshold: the lowest without a false hit on the tuning
/// half (with the guard), not below [`THRESHOLD_FLOOR`].
pub fn shipped_threshold(scored: &[Scored]) -> f32 {
    choose(scored.iter().filter(|s| s.tune), true).max(THRESHOLD_FLOOR)
}

/// The policies compared: plain thresholds, the same with the guard, and
/// the thresholds chosen on the tuning half of `scored`.
pub fn policies(scored: &[Scored]) -> Vec<(String, f32, bool)> {
    let tune: Vec<&Scored> = scored.iter().filter(|s| s.tune).collect();
    let chosen_guard = choose(tune.iter().copied(), true);
    let chosen_plain = choose(tune.iter().copied(), false);
    let shipped = shipped_threshold(scored);
    vec![
        (
            "threshold 0.80, no guard (GPTCache, LiteLLM)".into(),
            0.80,
            false,
        ),
        ("threshold 0.90, no guard".into(), 0.90, false),
        (
            format!("threshold {chosen_plain:.2}, no guard (tuned)"),
            chosen_plain,
            false,
        ),
        ("threshold 0.80 + guard".into(), 0.80, true),
        ("threshold 0.90 + guard".into(), 0.90, true),
        (
            format!("threshold {chosen_guard:.2} + guard (tuned)"),
            chosen_guard,
            true,
        ),
        (
            format!("threshold {shipped:.2} + guard (tuned, floor {THRESHOLD_FLOOR:.2}: shipped)"),
            shipped,
            true,
        ),
    ]
}

/// The table the calibration command prints: each policy's hit rate and
/// false-hit rate on both halves, then the held-out false hits of each
/// policy by category.
pub fn report(scored: &[Scored]) -> String {
    let tune: Vec<&Scored> = scored.iter().filter(|s| s.tune).collect();
    let test: Vec<&Scored> = scored.iter().filter(|s| !s.tune).collect();
    let policies = policies(scored);
    let mut out = String::new();
    let count = |set: &[&Scored], same: bool| set.iter().filter(|s| s.pair.same == same).count();
    let _ = writeln!(
        out,
        "pairs: {} ({} paraphrases, {} near-misses); tuning half {} / held-out half {}",
        scored.len(),
        scored.iter().filter(|s| s.pair.same).count(),
        scored.iter().filter(|s| !s.pair.same).count(),
        tune.len(),
        test.len()
    );
    let _ = writeln!(
        out,
        "held-out: {} paraphrases, {} near-misses\n",
        count(&test, true),
        count(&test, false)
    );
    let _ = writeln!(
        out,
        "| policy | held-out hit rate | held-out false-hit rate | tuning hit rate | tuning false-hit rate |"
    );
    let _ = writeln!(out, "| --- | --- | --- | --- | --- |");
    for (name, t, g) in &policies {
        let h = rates(test.iter().copied(), *t, *g);
        let u = rates(tune.iter().copied(), *t, *g);
        let _ = writeln!(
            out,
            "| {name} | {:.1} % ({}/{}) | {:.1} % ({}/{}) | {:.1} % | {:.1} % |",
            100.0 * h.hit_rate(),
            h.hits,
            h.paraphrases,
            100.0 * h.false_hit_rate(),
            h.false_hits,
            h.near_misses,
            100.0 * u.hit_rate(),
            100.0 * u.false_hit_rate(),
        );
    }
    let mut categories: Vec<&str> = scored
        .iter()
        .filter(|s| !s.pair.same)
        .map(|s| s.pair.category.as_str())
        .collect();
    categories.sort_unstable();
    categories.dedup();
    let _ = writeln!(out, "\nheld-out false hits by near-miss category:\n");
    let _ = write!(out, "| category | pairs |");
    for (name, _, _) in &policies {
        let short = name.split(" (").next().unwrap_or(name);
        let _ = write!(out, " {short} |");
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "|{}", " --- |".repeat(policies.len() + 2));
    for c in categories {
        let set: Vec<&Scored> = test
            .iter()
            .copied()
            .filter(|s| s.pair.category == c)
            .collect();
        let _ = write!(out, "| {c} | {} |", set.len());
        for (_, t, g) in &policies {
            let _ = write!(out, " {} |", rates(set.iter().copied(), *t, *g).false_hits);
        }
        let _ = writeln!(out);
    }
    out
}

/// The policies chosen on `main` applied to the whole of `fresh`.
pub fn report_fresh(main: &[Scored], fresh: &[Scored]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| policy (thresholds from the tuning half) | fresh-set hit rate | fresh-set false-hit rate |"
    );
    let _ = writeln!(out, "| --- | --- | --- |");
    for (name, t, g) in policies(main) {
        let r = rates(fresh, t, g);
        let _ = writeln!(
            out,
            "| {name} | {:.1} % ({}/{}) | {:.1} % ({}/{}) |",
            100.0 * r.hit_rate(),
            r.hits,
            r.paraphrases,
            100.0 * r.false_hit_rate(),
            r.false_hits,
            r.near_misses
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_set_parses_and_is_large_enough() {
        let pairs = parse(PAIRS).unwrap();
        assert!(pairs.len() >= 300, "{}", pairs.len());
        assert!(pairs.iter().filter(|p| p.same).count() >= 100);
        for c in [
            "entity", "number", "negation", "opposite", "language", "format",
        ] {
            assert!(
                pairs.iter().any(|p| !p.same && p.category == c),
                "no near-miss of category {c}"
            );
        }
        assert!(parse("maybe\tx\ta\tb").is_err());
        assert!(parse("same\tx\ta").unwrap_err().contains("line 1"));
    }

    #[test]
    fn chooses_the_lowest_threshold_without_false_hits() {
        let pairs = parse(
            "same\tp\tWhat is NATS?\tWhat's NATS?\n\
             different\tnumber\tWhat is 2+2?\tWhat is 2+3?\n\
             different\ttopic\tHow do I bake bread?\tWhich flour suits pizza dough best?\n\
             same\tp\tHi there\tHello there\n",
        )
        .unwrap();
        let sims = [0.95, 0.97, 0.72, 0.6];
        let mut i = 0;
        let scored = score(pairs, |_, _| {
            i += 1;
            sims[i - 1]
        });
        // Without the guard, only a threshold above 0.97 avoids the number pair.
        assert!((choose(&scored, false) - 0.98).abs() < 1e-6);
        // The guard refuses the number pair: the topic pair decides.
        assert!((choose(&scored, true) - 0.73).abs() < 1e-6);
        let r = rates(&scored, 0.73, true);
        assert_eq!((r.hits, r.false_hits), (1, 0));
        let r = rates(&scored, 0.8, false);
        assert_eq!((r.hits, r.false_hits), (1, 1));
        assert!(report(&scored).contains("| number | "));
    }
}
