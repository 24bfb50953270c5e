//! Evaluation of the routers on the labelled prompt set
//! (`router-worker/data/prompts.jsonl`) and the external set
//! (`router-worker/data/external.jsonl`), against the original 60-character rule.

use optiroute_common::config::{RoutingConfig, RoutingWeights};
use optiroute_common::cost::estimate_tokens;
use optiroute_common::wire::{ChatMessage, GenerateRequest, Pool};
use serde::Deserialize;

use crate::routing::{original_rule, Features, Router};

/// One labelled prompt: a `prompt`, or a conversation in `messages`
/// (routed on what the router reads: the turns joined by newlines).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Labelled {
    #[serde(default)]
    pub prompt: String,
    #[serde(default)]
    pub messages: Vec<ChatMessage>,
    pub label: Pool,
    pub category: String,
    /// How the prompt is written (terse, chatty, multi-turn...).
    #[serde(default)]
    pub style: Option<String>,
    /// Why it has its label.
    #[serde(default)]
    pub reason: Option<String>,
    /// Where a prompt written outside the project comes from.
    #[serde(default)]
    pub source: Option<String>,
}

impl Labelled {
    /// The request a caller would send.
    pub fn request(&self) -> GenerateRequest {
        let mut req = GenerateRequest::new(self.prompt.as_str());
        if !self.messages.is_empty() {
            req.params.messages = self.messages.clone();
        }
        req
    }

    /// The text routing reads.
    pub fn text(&self) -> String {
        self.request().text().into_owned()
    }
}

/// Reads the JSONL set; the error names the line.
pub fn load(text: &str) -> Result<Vec<Labelled>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let item: Labelled =
                serde_json::from_str(l).map_err(|e| format!("line {}: {e}", i + 1))?;
            if item.prompt.is_empty() == item.messages.is_empty() {
                return Err(format!("line {}: give either prompt or messages", i + 1));
            }
            Ok(item)
        })
        .collect()
}

/// Which third a line belongs to, by its index: 0 training, 1 validation,
/// 2 held out (never used to design, tune or train).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Validation,
    HeldOut,
}

pub fn split_of(index: usize) -> Split {
    match index % 3 {
        0 => Split::Train,
        1 => Split::Validation,
        _ => Split::HeldOut,
    }
}

/// Every third line (index % 3 == 2) is held out.
pub fn is_held_out(index: usize) -> bool {
    split_of(index) == Split::HeldOut
}

/// The items of `items` in `split`.
pub fn in_split(items: &[Labelled], split: Split) -> Vec<&Labelled> {
    items
        .iter()
        .enumerate()
        .filter(|(i, _)| split_of(*i) == split)
        .map(|(_, x)| x)
        .collect()
}

/// Assumptions of the cost comparison, per request.
pub const OUTPUT_TOKENS: u32 = 150;
pub const CLOUD_PRICE_PER_1K: f64 = 0.0002;
/// Simulated local compute: 0.5 s + 0.02 s per token for 150 tokens = 3.5 s.
pub const LOCAL_SECONDS: f64 = 3.5;
pub const LOCAL_PRICE_PER_S: f64 = 0.000005;

fn cloud_cost(prompt: &str) -> f64 {
    f64::from(estimate_tokens(prompt) + OUTPUT_TOKENS) / 1000.0 * CLOUD_PRICE_PER_1K
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Scores {
    pub n: usize,
    pub accuracy: f64,
    pub cloud_precision: f64,
    pub cloud_recall: f64,
    pub local_share: f64,
    /// USD per 1k requests; a cloud prompt sent local is paid twice (local, then cloud again).
    pub cost_per_1k: f64,
    pub all_cloud_cost_per_1k: f64,
}

/// Scores the decisions `decide` makes on `items`.
pub fn score(items: &[&Labelled], decide: impl Fn(&Labelled) -> Pool) -> Scores {
    let got: Vec<Pool> = items.iter().map(|i| decide(i)).collect();
    score_decisions(items, &got)
}

/// Scores `got[i]` as the decision on `items[i]`.
pub fn score_decisions(items: &[&Labelled], got: &[Pool]) -> Scores {
    let (mut tp, mut fp, mut fn_, mut correct, mut local) =
        (0usize, 0usize, 0usize, 0usize, 0usize);
    let (mut cost, mut all_cloud) = (0.0, 0.0);
    for (item, &got) in items.iter().zip(got) {
        let cloud = cloud_cost(&item.text());
        let local_cost = LOCAL_SECONDS * LOCAL_PRICE_PER_S;
        all_cloud += cloud;
        cost += match (got, item.label) {
            (Pool::Cloud, _) => cloud,
            (Pool::Local, Pool::Local) => local_cost,
            (Pool::Local, Pool::Cloud) => local_cost + cloud,
        };
        if got == item.label {
            correct += 1;
        }
        match (got, item.label) {
            (Pool::Cloud, Pool::Cloud) => tp += 1,
            (Pool::Cloud, Pool::Local) => fp += 1,
            (Pool::Local, Pool::Cloud) => fn_ += 1,
            _ => {}
        }
        if got == Pool::Local {
            local += 1;
        }
    }
    let n = items.len().max(1) as f64;
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    Scores {
        n: items.len(),
        accuracy: correct as f64 / n,
        cloud_precision: ratio(tp, tp + fp),
        cloud_recall: ratio(tp, tp + fn_),
        local_share: local as f64 / n,
        cost_per_1k: cost / n * 1000.0,
        all_cloud_cost_per_1k: all_cloud / n * 1000.0,
    }
}

/// The feature router with `cfg`, as a decision function.
pub fn ours(cfg: &RoutingConfig) -> Result<impl Fn(&Labelled) -> Pool, optiroute_common::Error> {
    let router = Router::new(cfg)?;
    Ok(move |i: &Labelled| router.decide(&i.request()).target)
}

pub fn original(i: &Labelled) -> Pool {
    original_rule(&i.text())
}

/// The comparison as a Markdown table.
pub fn table(rows: &[(&str, &str, Scores)]) -> String {
    let mut out = String::from(
        "| split | router | n | accuracy | cloud precision | cloud recall | routed local | cost / 1k req | vs all-cloud |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for (split, name, s) in rows {
        out.push_str(&format!(
            "| {split} | {name} | {} | {:.1} % | {:.1} % | {:.1} % | {:.1} % | ${:.4} | {:.0} % |\n",
            s.n,
            s.accuracy * 100.0,
            s.cloud_precision * 100.0,
            s.cloud_recall * 100.0,
            s.local_share * 100.0,
            s.cost_per_1k,
            s.cost_per_1k / s.all_cloud_cost_per_1k.max(f64::MIN_POSITIVE) * 100.0,
        ));
    }
    out
}

/// Coordinate search of weights and threshold on `items`, maximising
/// accuracy + twice the cloud recall (a cloud prompt answered by a 135M
/// model is the worse mistake). Returns the tuned config.
pub fn tune(
    items: &[&Labelled],
    start: &RoutingConfig,
) -> Result<RoutingConfig, optiroute_common::Error> {
    let router = Router::new(start)?;
    let feats: Vec<(Features, bool)> = items
        .iter()
        .map(|i| {
            (
                router.features(&i.text(), optiroute_common::wire::DEFAULT_MAX_TOKENS),
                i.label == Pool::Cloud,
            )
        })
        .collect();
    let objective = |w: &RoutingWeights, t: f32| {
        let (mut correct, mut tp, mut pos) = (0usize, 0usize, 0usize);
        // Credit only decisions made with a margin, so the weights do not
        // hinge on the exact prompts they were tuned on.
        const MARGIN: f32 = 0.25;
        for (f, cloud) in &feats {
            let s = f.score(w);
            let sure = if *cloud {
                s >= t + MARGIN
            } else {
                s < t - MARGIN
            };
            correct += usize::from(sure);
            pos += usize::from(*cloud);
            tp += usize::from(*cloud && sure);
        }
        correct as f64 / feats.len().max(1) as f64 + 2.0 * tp as f64 / pos.max(1) as f64
    };
    let mut w = start.weights;
    let mut t = start.threshold;
    let mut best = objective(&w, t);
    let steps = [-0.4f32, -0.2, -0.1, -0.05, 0.05, 0.1, 0.2, 0.4];
    for _round in 0..30 {
        let mut improved = false;
        // Each weight in turn, then the threshold (index 10).
        for i in 0..=10 {
            for s in steps {
                let (mut w2, mut t2) = (w, t);
                match w2.named_mut().into_iter().nth(i) {
                    Some((_, weight)) => *weight = ((*weight + s) * 100.0).round() / 100.0,
                    None => t2 = (t + s).max(0.1),
                }
                let o = objective(&w2, t2);
                if o > best + 1e-9 {
                    best = o;
                    w = w2;
                    t = t2;
                    improved = true;
                }
            }
        }
        if !improved {
            break;
        }
    }
    let mut cfg = start.clone();
    cfg.weights = w;
    cfg.threshold = (t * 100.0).round() / 100.0;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SET: &str = include_str!("../data/prompts.jsonl");

    #[test]
    fn the_set_is_large_labelled_and_varied() {
        let items = load(SET).unwrap();
        assert!(items.len() >= 1000, "{}", items.len());
        assert!(items
            .iter()
            .all(|i| i.reason.as_ref().is_some_and(|r| !r.is_empty())));
        let styles: std::collections::BTreeSet<_> =
            items.iter().filter_map(|i| i.style.as_deref()).collect();
        for s in [
            "terse",
            "chatty",
            "non-english",
            "multi-turn",
            "code-pasted",
            "long-doc",
            "short-hard",
        ] {
            assert!(styles.contains(s), "no {s} prompts: {styles:?}");
        }
        let cats: std::collections::BTreeSet<_> =
            items.iter().map(|i| i.category.as_str()).collect();
        assert_eq!(cats.len(), 9, "{cats:?}");
        assert!(
            items.iter().any(|i| i.label == Pool::Cloud)
                && items.iter().any(|i| i.label == Pool::Local)
        );
    }

    #[test]
    fn our_router_beats_the_sixty_char_rule_on_held_out_prompts() {
        let items = load(SET).unwrap();
        let held: Vec<&Labelled> = items
            .iter()
            .enumerate()
            .filter(|(i, _)| is_held_out(*i))
            .map(|(_, x)| x)
            .collect();
        let ours = score(&held, ours(&RoutingConfig::default()).unwrap());
        let orig = score(&held, original);
        assert!(ours.accuracy > orig.accuracy, "{ours:?} vs {orig:?}");
        assert!(
            ours.cloud_recall > orig.cloud_recall,
            "{ours:?} vs {orig:?}"
        );
    }
}
