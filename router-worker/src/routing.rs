//! Cost-aware routing: a complexity score from cheap, transparent features
//! of the request. At or above the threshold the prompt goes to the cloud;
//! below it, to the cheap local pool. An explicit provider always wins.
//!
//! Every feature is in [0, 1] (a few may reach 2) and multiplied by its
//! configured weight; the reply's `route_reason` lists the score and the
//! features that contributed most. Scoring allocates only for the reason
//! string and costs a few microseconds (see `benches`/`route-eval --bench`).

use optiroute_common::config::{RoutingConfig, RoutingWeights};
use optiroute_common::wire::{GenerateRequest, Pool, ProviderChoice};

/// The features of a prompt that routing scores, each mostly in [0, 1]
/// (a few may reach 2). A feature's name is also the bounded `reason`
/// label of `llm_route_decisions_total`; its weight is the field of the
/// same name in [`RoutingWeights`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Features {
    /// A ramp around the original 60-character rule, then a slow rise.
    pub length: f32,
    /// How many tokens the answer may take.
    pub max_tokens: f32,
    pub code: f32,
    pub math: f32,
    pub reasoning: f32,
    pub longform: f32,
    /// Questions beyond the first.
    pub questions: f32,
    pub non_english: f32,
    pub constraints: f32,
    /// Small talk and short factual questions (weighted negatively).
    pub simple: f32,
}

impl Features {
    /// Each feature's contribution to the score under `w`, with its name.
    pub fn contributions(&self, w: &RoutingWeights) -> [(&'static str, f32); 10] {
        [
            ("length", self.length * w.length),
            ("max_tokens", self.max_tokens * w.max_tokens),
            ("code", self.code * w.code),
            ("math", self.math * w.math),
            ("reasoning", self.reasoning * w.reasoning),
            ("longform", self.longform * w.longform),
            ("questions", self.questions * w.questions),
            ("non_english", self.non_english * w.non_english),
            ("constraints", self.constraints * w.constraints),
            ("simple", self.simple * w.simple),
        ]
    }

    /// The score under `w`: the sum of the contributions.
    pub fn score(&self, w: &RoutingWeights) -> f32 {
        self.contributions(w).iter().map(|(_, c)| c).sum()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub target: Pool,
    /// Bounded label: `explicit`, `below_threshold`, or the top feature.
    pub reason_label: &'static str,
    /// Human-readable: score, threshold and top features.
    pub reason: String,
    pub score: f32,
}

/// A keyword, prepared once: lower-cased, with how it must match.
#[derive(Debug, Clone)]
struct Keyword {
    text: String,
    /// Word boundary before and (unless `prefix`) after.
    word: bool,
    prefix: bool,
}

impl Keyword {
    fn new(raw: &str) -> Self {
        let lower = raw.to_lowercase();
        let (text, prefix) = match lower.strip_suffix('*') {
            Some(t) => (t.to_string(), true),
            None => (lower, false),
        };
        let word = text.chars().next().is_some_and(char::is_alphanumeric)
            && text.chars().next_back().is_some_and(char::is_alphanumeric);
        Keyword { text, word, prefix }
    }

    /// Whether an occurrence at `start..end` of `lower` stands on word boundaries.
    fn boundaries_ok(&self, lower: &str, start: usize, end: usize) -> bool {
        if !self.word {
            return true;
        }
        let before_ok = !lower[..start]
            .chars()
            .next_back()
            .is_some_and(char::is_alphanumeric);
        let after_ok = self.prefix
            || !lower[end..]
                .chars()
                .next()
                .is_some_and(char::is_alphanumeric);
        before_ok && after_ok
    }

    #[cfg(test)]
    fn found_in(&self, lower: &str) -> bool {
        lower
            .match_indices(&self.text)
            .any(|(at, m)| self.boundaries_ok(lower, at, at + m.len()))
    }
}

/// Keyword groups, in the order of their slots in [`Matcher::counts`].
const GROUPS: usize = 7;
const CODE: usize = 0;
const MATH: usize = 1;
const REASONING: usize = 2;
const LONGFORM: usize = 3;
const CONSTRAINTS: usize = 4;
const SIMPLE: usize = 5;
const FOREIGN: usize = 6;

/// Every keyword of every group in one Aho-Corasick automaton, so a prompt
/// is scanned once however many keywords there are.
#[derive(Debug, Clone)]
struct Matcher {
    automaton: aho_corasick::AhoCorasick,
    /// Per pattern: its keyword and group.
    patterns: Vec<(Keyword, usize)>,
}

impl Matcher {
    fn new(groups: [&[String]; GROUPS]) -> Result<Self, String> {
        let mut patterns = Vec::new();
        for (g, list) in groups.iter().enumerate() {
            for k in list.iter().filter(|k| !k.trim_end_matches('*').is_empty()) {
                patterns.push((Keyword::new(k), g));
            }
        }
        let automaton =
            aho_corasick::AhoCorasick::new(patterns.iter().map(|(k, _)| k.text.as_str()))
                .map_err(|e| format!("routing keywords: {e}"))?;
        Ok(Matcher {
            automaton,
            patterns,
        })
    }

    /// How many distinct keywords of each group occur in `lower`.
    fn counts(&self, lower: &str) -> [f32; GROUPS] {
        let mut seen = vec![false; self.patterns.len()];
        let mut counts = [0.0; GROUPS];
        for m in self.automaton.find_overlapping_iter(lower) {
            let id = m.pattern().as_usize();
            if seen[id] {
                continue;
            }
            let (k, g) = &self.patterns[id];
            if k.boundaries_ok(lower, m.start(), m.end()) {
                seen[id] = true;
                counts[*g] += 1.0;
            }
        }
        counts
    }
}

const FOREIGN_WORDS: &[&str] = &[
    "der", "die", "und", "ist", "nicht", "le", "la", "les", "est", "une", "pour", "el", "los",
    "las", "por", "qué", "para", "cómo", "pourquoi", "warum", "porque", "wie", "dans", "sur",
];

/// A router built from config, with keyword lists prepared once.
#[derive(Debug, Clone)]
pub struct Router {
    threshold: f32,
    bias_span: f32,
    weights: RoutingWeights,
    matcher: Matcher,
}

impl Router {
    /// Fails only when the keyword lists are too large for one automaton.
    pub fn new(cfg: &RoutingConfig) -> Result<Self, optiroute_common::Error> {
        Ok(Router {
            threshold: cfg.threshold,
            bias_span: cfg.bias_span,
            weights: cfg.weights,
            matcher: Matcher::new([
                &cfg.code_keywords,
                &cfg.math_keywords,
                &cfg.reasoning_keywords,
                &cfg.longform_keywords,
                &cfg.constraint_keywords,
                &cfg.simple_keywords,
                &FOREIGN_WORDS
                    .iter()
                    .map(|w| w.to_string())
                    .collect::<Vec<_>>(),
            ])
            .map_err(|e| {
                optiroute_common::Error::bad_request(format!("config key `router.routing`: {e}"))
            })?,
        })
    }

    /// The weight of each feature.
    pub fn weights(&self) -> RoutingWeights {
        self.weights
    }

    /// The score threshold in use (before `route_bias`).
    pub fn threshold(&self) -> f32 {
        self.threshold
    }

    /// The feature values of a prompt.
    pub fn features(&self, prompt: &str, max_tokens: u32) -> Features {
        let lower = prompt.to_lowercase();
        let chars = prompt.chars().count() as f32;
        // A ramp around the original 60-character rule, then a slow rise for long prompts.
        let length =
            ((chars - 40.0) / 40.0).clamp(0.0, 1.0) + ((chars - 200.0) / 400.0).clamp(0.0, 1.0);
        let max_tok = ((max_tokens as f32 - 256.0) / 768.0).clamp(0.0, 1.0);
        let n = self.matcher.counts(&lower);
        let code = n[CODE].min(2.0);
        let math = n[MATH].min(2.0);
        let reasoning = n[REASONING].min(2.0);
        let longform = n[LONGFORM].min(2.0);
        let questions = (prompt.matches('?').count().saturating_sub(1) as f32 / 2.0).min(1.0);
        let non_ascii = prompt
            .chars()
            .filter(|c| c.is_alphabetic() && !c.is_ascii())
            .count() as f32;
        let foreign = n[FOREIGN];
        let non_english = ((non_ascii / chars.max(1.0)) * 10.0 + foreign / 2.0).min(1.0);
        let constraints = n[CONSTRAINTS].min(2.0);
        let simple = if chars < 160.0 {
            n[SIMPLE].min(1.0)
        } else {
            0.0
        };
        Features {
            length,
            max_tokens: max_tok,
            code,
            math,
            reasoning,
            longform,
            questions,
            non_english,
            constraints,
            simple,
        }
    }

    /// The pool for a request, and why.
    pub fn decide(&self, req: &GenerateRequest) -> Decision {
        match req.provider {
            ProviderChoice::Local => return explicit(Pool::Local),
            ProviderChoice::Cloud => return explicit(Pool::Cloud),
            ProviderChoice::Auto => {}
        }
        let f = self.features(&req.text(), req.params.max_tokens);
        let contrib = f.contributions(&self.weights);
        let score: f32 = contrib.iter().map(|(_, c)| c).sum();
        let threshold = self.threshold - req.route_bias.unwrap_or(0.0) * self.bias_span;
        let target = if score >= threshold {
            Pool::Cloud
        } else {
            Pool::Local
        };
        let mut order: Vec<(&'static str, f32)> = contrib
            .into_iter()
            .filter(|(_, c)| c.abs() > 0.01)
            .collect();
        order.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()));
        let reason_label = match (target, order.iter().find(|(_, c)| *c > 0.0)) {
            (Pool::Cloud, Some(&(name, _))) => name,
            _ => "below_threshold",
        };
        let cmp = if target == Pool::Cloud { ">=" } else { "<" };
        let mut reason = format!("score {score:.2} {cmp} {threshold:.2}");
        for (n, (name, c)) in order.iter().take(3).enumerate() {
            reason.push_str(if n == 0 { ": " } else { ", " });
            reason.push_str(&format!("{name}{c:+.2}"));
        }
        Decision {
            target,
            reason_label,
            reason,
            score,
        }
    }
}

fn explicit(pool: Pool) -> Decision {
    Decision {
        target: pool,
        reason_label: "explicit",
        reason: format!("provider {} requested", pool.as_str()),
        score: 0.0,
    }
}

/// The original OptiRoute rule: longer than 60 characters goes to the cloud.
pub fn original_rule(prompt: &str) -> Pool {
    if prompt.chars().count() > 60 {
        Pool::Cloud
    } else {
        Pool::Local
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        Router::new(&RoutingConfig::default()).unwrap()
    }

    fn auto(prompt: &str) -> GenerateRequest {
        GenerateRequest::new(prompt)
    }

    #[test]
    fn simple_prompts_stay_local_and_hard_ones_go_cloud() {
        let r = router();
        assert_eq!(r.decide(&auto("Hello!")).target, Pool::Local);
        assert_eq!(
            r.decide(&auto("What is the capital of France?")).target,
            Pool::Local
        );
        assert_eq!(
            r.decide(&auto("Prove that sqrt(2) is irrational.")).target,
            Pool::Cloud
        );
        assert_eq!(
            r.decide(&auto(
                "Write a Rust LRU cache with O(1) get and put, and explain the design."
            ))
            .target,
            Pool::Cloud
        );
        let d = r.decide(&auto(
            "Compare the trade-offs of Raft and Paxos step by step.",
        ));
        assert_eq!(d.target, Pool::Cloud);
        assert_eq!(d.reason_label, "reasoning");
        assert!(d.reason.starts_with("score"), "{}", d.reason);
    }

    #[test]
    fn explicit_provider_wins_and_bias_moves_the_threshold() {
        let r = router();
        let mut req = auto("Prove that sqrt(2) is irrational.");
        req.provider = ProviderChoice::Local;
        assert_eq!(r.decide(&req).target, Pool::Local);
        assert_eq!(r.decide(&req).reason_label, "explicit");
        let mut req = auto("Explain why the sky is blue.");
        let base = r.decide(&req);
        req.route_bias = Some(1.0);
        let better = r.decide(&req);
        req.route_bias = Some(-1.0);
        let cheaper = r.decide(&req);
        assert_eq!(base.score, better.score);
        assert_eq!(better.target, Pool::Cloud);
        assert_eq!(cheaper.target, Pool::Local);
    }

    #[test]
    fn keywords_match_words_prefixes_and_symbols() {
        assert!(Keyword::new("hi").found_in("say hi there"));
        assert!(!Keyword::new("hi").found_in("this is it"));
        assert!(Keyword::new("hello").found_in("hello, world"));
        assert!(Keyword::new("optimi*").found_in("optimise this"));
        assert!(!Keyword::new("optimi").found_in("optimise this"));
        assert!(Keyword::new("^").found_in("x^2"));
    }

    #[test]
    fn original_rule_is_sixty_chars() {
        assert_eq!(original_rule(&"a".repeat(60)), Pool::Local);
        assert_eq!(original_rule(&"a".repeat(61)), Pool::Cloud);
    }
}
