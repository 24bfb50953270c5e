//! The learned router: a logistic regression on the sentence embedding of
//! the request's last user turn (all-MiniLM-L6-v2, the vector the semantic
//! cache reads too, computed once per request)
//! and the feature router's hand-written features, trained offline by
//! `optiroute-route-eval --train` (see [`train`]) and shipped as a small
//! JSON file next to the labelled set.
//!
//! # Weights file (`router-worker/data/learned-router.json`)
//! One JSON object, format `optiroute-learned-router/1`:
//! - `embedding_model`: the model whose vectors the weights expect;
//! - `features`: the names of the hand features, in input order
//!   (see [`FEATURES`]); `feature_mean` and `feature_scale` standardise them;
//! - `embedding_weights` (384 values, applied to the embedding times
//!   [`EMBEDDING_SCALE`]), `feature_weights` (one per feature) and `bias`:
//!   the score is `logit = bias + Σ w_e·e·EMBEDDING_SCALE + Σ w_f·(f − mean)/scale`,
//!   and `sigmoid(logit)` is the learned probability that the prompt needs the cloud;
//! - `threshold`: the logit at or above which a prompt goes to the cloud,
//!   chosen during training on out-of-fold scores for cloud recall;
//! - `reference_quantiles`: the logits of the reference workload (the
//!   labelled set's training and validation thirds) at every 0.5 %, 201
//!   ascending values, from which `router.routing.cloud_share` picks a threshold;
//! - `training`: how the weights were made (seed, regularisation, epochs, examples).

pub mod train;

use std::fmt::Write as _;

use optiroute_common::config::RoutingConfig;
use optiroute_common::wire::{GenerateRequest, Pool};
use serde::{Deserialize, Serialize};

use crate::routing::{Decision, Features, Router};

pub const FORMAT: &str = "optiroute-learned-router/1";
/// The weights the router uses unless `router.routing.learned.weights_file` is set.
pub const BUILT_IN: &str = include_str!("../data/learned-router.json");
pub const EMBEDDING_MODEL: &str = "all-MiniLM-L6-v2";
/// Embedding dimensions.
pub const DIMS: usize = 384;
/// The embedding is L2-normalised (components around ±0.05); this brings
/// them to about unit scale, like the standardised features.
pub const EMBEDDING_SCALE: f32 = 19.595_918; // sqrt(384)
/// The hand features the model reads besides the embedding, in order.
pub const FEATURES: [&str; 11] = [
    "length",
    "max_tokens",
    "code",
    "math",
    "reasoning",
    "longform",
    "questions",
    "non_english",
    "constraints",
    "simple",
    "log_chars",
];
pub const NF: usize = FEATURES.len();
/// Quantiles of the reference workload kept in the file: every 0.5 %.
pub const QUANTILES: usize = 201;

/// The model's inputs besides the embedding, from the feature router's
/// features and the text's length in characters.
pub fn inputs(f: &Features, chars: usize) -> [f32; NF] {
    [
        f.length,
        f.max_tokens,
        f.code,
        f.math,
        f.reasoning,
        f.longform,
        f.questions,
        f.non_english,
        f.constraints,
        f.simple,
        (1.0 + chars as f32).ln() / 8.0,
    ]
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingInfo {
    pub seed: u64,
    pub l2: f32,
    pub epochs: usize,
    pub examples: usize,
    /// Where the examples came from.
    pub data: String,
}

/// The contents of a weights file; [`Weights::parse`] checks every field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Weights {
    pub format: String,
    pub embedding_model: String,
    pub features: Vec<String>,
    pub feature_mean: Vec<f32>,
    pub feature_scale: Vec<f32>,
    pub embedding_weights: Vec<f32>,
    pub feature_weights: Vec<f32>,
    pub bias: f32,
    pub threshold: f32,
    pub reference_quantiles: Vec<f32>,
    pub training: TrainingInfo,
}

impl Weights {
    /// Reads and checks a weights file; the error says what is wrong.
    pub fn load(path: &str) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
        Self::parse(&text).map_err(|e| format!("{path}: {e}"))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let w: Weights =
            serde_json::from_str(text).map_err(|e| format!("not a weights file: {e}"))?;
        w.check()?;
        Ok(w)
    }

    fn check(&self) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!("format is {:?}, expected {FORMAT:?}", self.format));
        }
        if self.embedding_model != EMBEDDING_MODEL {
            return Err(format!(
                "trained on {:?} embeddings, the router computes {EMBEDDING_MODEL:?}",
                self.embedding_model
            ));
        }
        if self.features.iter().map(String::as_str).ne(FEATURES) {
            return Err(format!(
                "features are {:?}, expected {FEATURES:?}",
                self.features
            ));
        }
        for (name, v, n) in [
            ("feature_mean", &self.feature_mean, NF),
            ("feature_scale", &self.feature_scale, NF),
            ("feature_weights", &self.feature_weights, NF),
            ("embedding_weights", &self.embedding_weights, DIMS),
            ("reference_quantiles", &self.reference_quantiles, QUANTILES),
        ] {
            if v.len() != n {
                return Err(format!("{name} has {} values, expected {n}", v.len()));
            }
            if !v.iter().all(|x| x.is_finite()) {
                return Err(format!("{name} has a value that is not a finite number"));
            }
        }
        if !self.feature_scale.iter().all(|s| *s > 0.0) {
            return Err("feature_scale must be positive".into());
        }
        if !self.bias.is_finite() || !self.threshold.is_finite() {
            return Err("bias and threshold must be finite numbers".into());
        }
        if self.reference_quantiles.windows(2).any(|w| w[0] > w[1]) {
            return Err("reference_quantiles must be ascending".into());
        }
        Ok(())
    }

    /// Each standardised feature's contribution to the logit, with its name.
    pub fn feature_contributions(&self, x: &[f32; NF]) -> [(&'static str, f32); NF] {
        std::array::from_fn(|i| {
            let z = (x[i] - self.feature_mean[i]) / self.feature_scale[i];
            (FEATURES[i], z * self.feature_weights[i])
        })
    }

    /// The embedding's contribution to the logit.
    pub fn embedding_contribution(&self, embedding: &[f32]) -> f32 {
        embedding
            .iter()
            .zip(&self.embedding_weights)
            .map(|(e, w)| e * w)
            .sum::<f32>()
            * EMBEDDING_SCALE
    }

    pub fn logit(&self, embedding: &[f32], x: &[f32; NF]) -> f32 {
        self.bias
            + self.embedding_contribution(embedding)
            + self
                .feature_contributions(x)
                .iter()
                .map(|(_, c)| c)
                .sum::<f32>()
    }

    /// The logit threshold that sends `share` of the reference workload
    /// to the cloud.
    pub fn threshold_for_share(&self, share: f32) -> f32 {
        threshold_for_share(&self.reference_quantiles, share)
    }
}

/// The score at or above which `share` of a workload whose score quantiles
/// are `q` (from [`quantiles`]) lies, interpolated between quantiles.
pub fn threshold_for_share(q: &[f32], share: f32) -> f32 {
    let (Some(&first), Some(&last)) = (q.first(), q.last()) else {
        return 0.0;
    };
    // Everything at or above the threshold goes to the cloud: a share of
    // 0 must be above the highest score, a share of 1 at the lowest.
    if share <= 0.0 {
        return last + 1e-3;
    }
    if share >= 1.0 {
        return first;
    }
    let pos = (1.0 - share) * (q.len() - 1) as f32;
    let lo = (pos.floor() as usize).min(q.len() - 1);
    let hi = (lo + 1).min(q.len() - 1);
    q[lo] + (q[hi] - q[lo]) * (pos - lo as f32)
}

/// The quantiles (every 0.5 %, [`QUANTILES`] values) of `scores`, ascending.
pub fn quantiles(scores: &[f32]) -> Vec<f32> {
    let mut s: Vec<f32> = scores.iter().copied().filter(|x| x.is_finite()).collect();
    s.sort_by(f32::total_cmp);
    if s.is_empty() {
        return vec![0.0; QUANTILES];
    }
    (0..QUANTILES)
        .map(|i| {
            let pos = i as f32 / (QUANTILES - 1) as f32 * (s.len() - 1) as f32;
            let lo = pos.floor() as usize;
            let hi = (lo + 1).min(s.len() - 1);
            s[lo] + (s[hi] - s[lo]) * (pos - lo as f32)
        })
        .collect()
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// A loaded model with its threshold settled from config.
#[derive(Debug, Clone)]
pub struct LearnedRouter {
    weights: Weights,
    threshold: f32,
    bias_span: f32,
    /// How the threshold was set, for `route_reason`.
    threshold_from: String,
}

impl LearnedRouter {
    pub fn new(weights: Weights, cfg: &RoutingConfig) -> Self {
        let (threshold, threshold_from) = match cfg.cloud_share {
            Some(s) => (
                weights.threshold_for_share(s),
                format!("cloud_share {s:.2}"),
            ),
            None => (weights.threshold, "trained".to_string()),
        };
        LearnedRouter {
            weights,
            threshold,
            bias_span: cfg.learned.bias_span,
            threshold_from,
        }
    }

    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// The logit threshold in use (before `route_bias`).
    pub fn threshold(&self) -> f32 {
        self.threshold
    }

    /// The logit of a request whose embedding is known.
    pub fn score(&self, features: &Router, req: &GenerateRequest, embedding: &[f32]) -> f32 {
        let text = req.text();
        let f = features.features(&text, req.params.max_tokens);
        self.weights
            .logit(embedding, &inputs(&f, text.chars().count()))
    }

    /// A request's logit and what made it, from its text, `max_tokens` and
    /// the embedding of its last user turn (not `route_bias`, which only
    /// moves the threshold).
    pub fn scored(&self, features: &Router, req: &GenerateRequest, embedding: &[f32]) -> Scored {
        let text = req.text();
        let f = features.features(&text, req.params.max_tokens);
        let x = inputs(&f, text.chars().count());
        let emb = self.weights.embedding_contribution(embedding);
        let contrib = self.weights.feature_contributions(&x);
        let logit = self.weights.bias + emb + contrib.iter().map(|(_, c)| c).sum::<f32>();
        let mut order: Vec<(&'static str, f32)> = std::iter::once(("embedding", emb))
            .chain(contrib)
            .filter(|(_, c)| c.abs() > 0.01)
            .collect();
        order.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()));
        let mut parts = String::new();
        for (n, (name, c)) in order.iter().take(3).enumerate() {
            parts.push_str(if n == 0 { ": " } else { ", " });
            let _ = write!(parts, "{name}{c:+.2}");
        }
        let _ = write!(
            parts,
            "; features score {:.2}",
            f.score(&features.weights())
        );
        Scored { logit, parts }
    }

    /// The decision on a scored request with its `route_bias`.
    pub fn decision(&self, s: &Scored, route_bias: Option<f32>) -> Decision {
        let threshold = self.threshold - route_bias.unwrap_or(0.0) * self.bias_span;
        let target = if s.logit >= threshold {
            Pool::Cloud
        } else {
            Pool::Local
        };
        let cmp = if target == Pool::Cloud { ">=" } else { "<" };
        Decision {
            target,
            reason_label: if target == Pool::Cloud {
                "learned"
            } else {
                "below_threshold"
            },
            reason: format!(
                "learned {:.2} (logit {:.2} {cmp} {threshold:.2}, {}){}",
                sigmoid(s.logit),
                s.logit,
                self.threshold_from,
                s.parts
            ),
            score: s.logit,
        }
    }

    /// The pool for an `auto` request whose embedding is known, and why.
    pub fn decide(&self, features: &Router, req: &GenerateRequest, embedding: &[f32]) -> Decision {
        self.decision(&self.scored(features, req, embedding), req.route_bias)
    }
}

/// A request's learned logit and its explanation (the top contributions
/// and the feature router's score), kept for repeated prompts.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub logit: f32,
    parts: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights() -> Weights {
        Weights {
            format: FORMAT.into(),
            embedding_model: EMBEDDING_MODEL.into(),
            features: FEATURES.iter().map(|s| s.to_string()).collect(),
            feature_mean: vec![0.0; NF],
            feature_scale: vec![1.0; NF],
            embedding_weights: vec![0.0; DIMS],
            feature_weights: vec![0.0; NF],
            bias: 0.0,
            threshold: 0.0,
            reference_quantiles: (0..QUANTILES).map(|i| i as f32).collect(),
            training: TrainingInfo {
                seed: 1,
                l2: 0.0,
                epochs: 0,
                examples: 0,
                data: String::new(),
            },
        }
    }

    #[test]
    fn parse_names_what_is_wrong() {
        let good = serde_json::to_string(&weights()).unwrap();
        assert!(Weights::parse(&good).is_ok());
        let mut w = weights();
        w.embedding_weights.pop();
        let e = Weights::parse(&serde_json::to_string(&w).unwrap()).unwrap_err();
        assert!(e.contains("embedding_weights has 383 values"), "{e}");
        let mut w = weights();
        w.format = "other/2".into();
        let e = Weights::parse(&serde_json::to_string(&w).unwrap()).unwrap_err();
        assert!(e.contains("format"), "{e}");
        let mut w = weights();
        w.reference_quantiles[3] = -1.0;
        let e = Weights::parse(&serde_json::to_string(&w).unwrap()).unwrap_err();
        assert!(e.contains("ascending"), "{e}");
        assert!(Weights::parse("{")
            .unwrap_err()
            .contains("not a weights file"));
        let nan = good.replacen("\"bias\":0.0", "\"bias\":1e999", 1);
        assert!(Weights::parse(&nan).is_err());
    }

    #[test]
    fn threshold_for_share_reads_the_quantiles() {
        let w = weights(); // quantiles 0, 1, ..., 200
        assert_eq!(w.threshold_for_share(0.5), 100.0);
        assert_eq!(w.threshold_for_share(1.0), 0.0);
        assert!((w.threshold_for_share(0.1) - 180.0).abs() < 1e-3);
        assert!(w.threshold_for_share(0.0) > 200.0);
        let q = quantiles(&[3.0, 1.0, 2.0]);
        assert_eq!((q[0], q[100], q[200]), (1.0, 2.0, 3.0));
    }
}
