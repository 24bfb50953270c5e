//! The learned router: kernel ridge regression (an RBF kernel) on the
//! sentence embedding of the request's last user turn (all-MiniLM-L6-v2,
//! the vector the semantic cache reads too, computed once per request) and
//! the feature router's hand-written features, trained offline by
//! `optiroute-route-eval --train` (see [`train`]) and shipped as a JSON file
//! next to the labelled set. A prompt's score is a similarity-weighted vote
//! of the labelled prompts it resembles, so it follows what the work of a
//! prompt is like rather than which keywords it uses.
//!
//! # Weights file (`router-worker/data/learned-router.json`)
//! One JSON object, format `optiroute-learned-router/2`:
//! - `embedding_model`: the model whose vectors the weights expect;
//! - `features`: the names of the hand features, in input order
//!   (see [`FEATURES`]);
//! - `input_mean`, `input_scale` ([`INPUTS`] values each): the input is
//!   the embedding (384 values) then the features, each standardised as
//!   `z = (x − mean) / scale`;
//! - `gamma`: the kernel `k(z, s) = exp(−gamma · |z − s|²)`;
//! - `support`: the training prompts' standardised inputs, one row of
//!   [`INPUTS`] signed bytes per prompt, hex-encoded, row after row; row
//!   `i` is `byte · support_scale[i]`;
//! - `support_cloud`: one character per row, `1` when that prompt is
//!   labelled cloud, `0` local (for `route_reason`'s nearest prompts);
//! - `alpha`: one weight per row; the score is `Σ alpha[i] · k(z, row i)`
//!   (about +1 for prompts like the cloud-labelled ones, −1 for local);
//! - `threshold`: the score at or above which a prompt goes to the cloud,
//!   chosen during training on out-of-fold scores for cloud recall;
//! - `reference_quantiles`: the out-of-fold scores of the reference
//!   workload (the labelled set's training and validation thirds, each
//!   scored by a model that did not see it, as a new prompt would be) at
//!   every 0.5 %, 201 ascending values, from which
//!   `router.routing.cloud_share` picks a threshold;
//! - `training`: how the weights were made (ridge, folds, seed, examples).

pub mod train;

use std::fmt::Write as _;

use optiroute_common::config::RoutingConfig;
use optiroute_common::wire::{GenerateRequest, Pool};
use serde::{Deserialize, Serialize};

use crate::routing::{Decision, Features, Router};

pub const FORMAT: &str = "optiroute-learned-router/2";
/// The weights the router uses unless `router.routing.learned.weights_file` is set.
pub const BUILT_IN: &str = include_str!("../data/learned-router.json");
pub const EMBEDDING_MODEL: &str = "all-MiniLM-L6-v2";
/// Embedding dimensions.
pub const DIMS: usize = 384;
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
/// The model's input: the embedding, then the features.
pub const INPUTS: usize = DIMS + NF;
/// Labelled prompts a route_reason counts around a prompt.
const NEAREST: usize = 5;
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
    /// The ridge (added to the kernel matrix's diagonal).
    pub ridge: f32,
    /// Folds of the out-of-fold scores (threshold and reference quantiles).
    pub folds: usize,
    /// Seeds the assignment of prompts to folds.
    pub seed: u64,
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
    pub input_mean: Vec<f32>,
    pub input_scale: Vec<f32>,
    pub gamma: f32,
    pub support: String,
    pub support_scale: Vec<f32>,
    pub support_cloud: String,
    pub alpha: Vec<f32>,
    pub threshold: f32,
    pub reference_quantiles: Vec<f32>,
    pub training: TrainingInfo,
    /// `support` decoded: row-major, [`INPUTS`] per row (filled by `parse`).
    #[serde(skip)]
    rows: Vec<f32>,
    /// Each row's squared length.
    #[serde(skip)]
    norms: Vec<f32>,
}

/// A standardised input is clamped to ±`Z_MAX`: one input far outside
/// what training saw (a `max_tokens` no labelled prompt had) must not push
/// a prompt away from every stored one.
pub const Z_MAX: f32 = 8.0;
/// Bounds a weights file's numbers must keep (so nothing overflows).
const LIMIT: f32 = 1e6;

/// `(x − mean) / scale`, clamped to ±[`Z_MAX`]; 0 for a non-number.
pub fn standard(x: f32, mean: f32, scale: f32) -> f32 {
    let z = (x - mean) / scale;
    if z.is_nan() {
        0.0
    } else {
        z.clamp(-Z_MAX, Z_MAX)
    }
}

/// One row's signed bytes and scale for `z` (what `support` stores).
pub fn quantize_row(z: &[f32]) -> (Vec<i8>, f32) {
    let max = z.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
    let q = z
        .iter()
        .map(|v| (v / scale).round().clamp(-127.0, 127.0) as i8)
        .collect();
    (q, scale)
}

impl Weights {
    /// Weights from their parts; `rows` are the support rows as stored
    /// (already quantized), `cloud` their labels.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        input_mean: Vec<f32>,
        input_scale: Vec<f32>,
        gamma: f32,
        rows: &[(Vec<i8>, f32)],
        cloud: &[bool],
        alpha: Vec<f32>,
        threshold: f32,
        reference_quantiles: Vec<f32>,
        training: TrainingInfo,
    ) -> Result<Self, String> {
        let bytes: Vec<u8> = rows
            .iter()
            .flat_map(|(q, _)| q.iter().map(|b| *b as u8))
            .collect();
        let mut w = Weights {
            format: FORMAT.into(),
            embedding_model: EMBEDDING_MODEL.into(),
            features: FEATURES.iter().map(|s| s.to_string()).collect(),
            input_mean,
            input_scale,
            gamma,
            support: hex::encode(bytes),
            support_scale: rows.iter().map(|(_, s)| *s).collect(),
            support_cloud: cloud.iter().map(|c| if *c { '1' } else { '0' }).collect(),
            alpha,
            threshold,
            reference_quantiles,
            training,
            rows: Vec::new(),
            norms: Vec::new(),
        };
        w.check()?;
        Ok(w)
    }

    /// Reads and checks a weights file; the error says what is wrong.
    pub fn load(path: &str) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
        Self::parse(&text).map_err(|e| format!("{path}: {e}"))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let mut w: Weights =
            serde_json::from_str(text).map_err(|e| format!("not a weights file: {e}"))?;
        w.check()?;
        Ok(w)
    }

    /// Checks every field and decodes the support rows.
    fn check(&mut self) -> Result<(), String> {
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
        let n = self.alpha.len();
        if n == 0 {
            return Err("alpha is empty: no support rows".into());
        }
        for (name, v, len) in [
            ("input_mean", &self.input_mean, INPUTS),
            ("input_scale", &self.input_scale, INPUTS),
            ("support_scale", &self.support_scale, n),
            ("reference_quantiles", &self.reference_quantiles, QUANTILES),
        ] {
            if v.len() != len {
                return Err(format!("{name} has {} values, expected {len}", v.len()));
            }
            if !v.iter().all(|x| x.is_finite()) {
                return Err(format!("{name} has a value that is not a finite number"));
            }
        }
        let within = |v: &[f32], lo: f32, hi: f32| v.iter().all(|x| (lo..=hi).contains(x));
        for (name, v, lo, hi, what) in [
            ("alpha", &self.alpha[..], -LIMIT, LIMIT, "within ±1e6"),
            (
                "input_mean",
                &self.input_mean[..],
                -LIMIT,
                LIMIT,
                "within ±1e6",
            ),
            (
                "input_scale",
                &self.input_scale[..],
                1e-6,
                LIMIT,
                "between 1e-6 and 1e6",
            ),
            (
                "support_scale",
                &self.support_scale[..],
                1e-9,
                1.0,
                "in (0, 1]",
            ),
            (
                "reference_quantiles",
                &self.reference_quantiles[..],
                -LIMIT,
                LIMIT,
                "within ±1e6",
            ),
            ("gamma", &[self.gamma][..], 1e-9, 1e3, "in (0, 1000]"),
            (
                "threshold",
                &[self.threshold][..],
                -LIMIT,
                LIMIT,
                "within ±1e6",
            ),
        ] {
            if !within(v, lo, hi) {
                return Err(format!("{name} must be {what} (and a number)"));
            }
        }
        if self.reference_quantiles.windows(2).any(|w| w[0] > w[1]) {
            return Err("reference_quantiles must be ascending".into());
        }
        if self.support_cloud.len() != n
            || !self.support_cloud.bytes().all(|b| b == b'0' || b == b'1')
        {
            return Err(format!(
                "support_cloud must be {n} characters, each 0 or 1 (one per alpha)"
            ));
        }
        let bytes = hex::decode(&self.support).map_err(|e| format!("support is not hex: {e}"))?;
        if bytes.len() != n * INPUTS {
            return Err(format!(
                "support has {} bytes, expected {} ({n} rows of {INPUTS})",
                bytes.len(),
                n * INPUTS
            ));
        }
        self.rows = bytes
            .chunks(INPUTS)
            .zip(&self.support_scale)
            .flat_map(|(row, s)| row.iter().map(move |b| f32::from(*b as i8) * s))
            .collect();
        self.norms = self
            .rows
            .chunks(INPUTS)
            .map(|r| r.iter().map(|v| v * v).sum())
            .collect();
        Ok(())
    }

    /// The standardised input of an embedding ([`DIMS`] values) and its
    /// features.
    pub fn standardise(&self, embedding: &[f32], x: &[f32; NF]) -> Vec<f32> {
        embedding
            .iter()
            .chain(x)
            .zip(self.input_mean.iter().zip(&self.input_scale))
            .map(|(v, (m, s))| standard(*v, *m, *s))
            .collect()
    }

    /// The kernel between a standardised input and each support row.
    fn kernel<'a>(&'a self, z: &'a [f32]) -> impl Iterator<Item = f32> + 'a {
        let zz: f32 = z.iter().map(|v| v * v).sum();
        self.rows
            .chunks(INPUTS)
            .zip(&self.norms)
            .map(move |(r, n)| (-self.gamma * (zz + n - 2.0 * dot(r, z)).max(0.0)).exp())
    }

    /// The score of an embedding and its features.
    pub fn score(&self, embedding: &[f32], x: &[f32; NF]) -> f32 {
        self.score_standardised(&self.standardise(embedding, x))
    }

    /// The score of an input already standardised.
    pub fn score_standardised(&self, z: &[f32]) -> f32 {
        self.kernel(z).zip(&self.alpha).map(|(k, a)| k * a).sum()
    }

    /// The score, with how many of the [`NEAREST`] most similar labelled
    /// prompts are labelled cloud and their mean kernel value.
    pub fn score_nearest(&self, embedding: &[f32], x: &[f32; NF]) -> (f32, usize, f32) {
        let z = self.standardise(embedding, x);
        let mut score = 0.0;
        // The NEAREST largest kernel values, descending (earlier rows first
        // among equals), kept in place: no per-request sort of every row.
        let mut near = [(0.0f32, false); NEAREST];
        let mut len = 0;
        for ((k, a), c) in self
            .kernel(&z)
            .zip(&self.alpha)
            .zip(self.support_cloud.bytes())
        {
            score += k * a;
            let at = near[..len]
                .iter()
                .position(|(n, _)| n.total_cmp(&k) == std::cmp::Ordering::Less)
                .unwrap_or(len);
            if at < NEAREST {
                len = (len + 1).min(NEAREST);
                near.copy_within(at..len - 1, at + 1);
                near[at] = (k, c == b'1');
            }
        }
        let top = &near[..len];
        let cloud = top.iter().filter(|(_, c)| *c).count();
        let mean = top.iter().map(|(k, _)| k).sum::<f32>() / top.len().max(1) as f32;
        (score, cloud, mean)
    }

    /// The threshold that sends `share` of the reference workload to the cloud.
    pub fn threshold_for_share(&self, share: f32) -> f32 {
        threshold_for_share(&self.reference_quantiles, share)
    }
}

/// A dot product in eight independent lanes, so the compiler can keep
/// them in one vector register (a single running sum cannot be reordered).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
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

    /// The score threshold in use (before `route_bias`).
    pub fn threshold(&self) -> f32 {
        self.threshold
    }

    /// The score of a request whose embedding is known.
    pub fn score(&self, features: &Router, req: &GenerateRequest, embedding: &[f32]) -> f32 {
        let text = req.text();
        let f = features.features(&text, req.params.max_tokens);
        self.weights
            .score(embedding, &inputs(&f, text.chars().count()))
    }

    /// A request's score and what made it, from its text, `max_tokens` and
    /// the embedding of its last user turn (not `route_bias`, which only
    /// moves the threshold): the labels of the most similar labelled
    /// prompts and the feature router's score with its top features.
    pub fn scored(&self, features: &Router, req: &GenerateRequest, embedding: &[f32]) -> Scored {
        let text = req.text();
        let f = features.features(&text, req.params.max_tokens);
        let x = inputs(&f, text.chars().count());
        let (score, cloud, similarity) = self.weights.score_nearest(embedding, &x);
        let w = features.weights();
        let near = NEAREST.min(self.weights.alpha.len());
        let mut parts = format!(
            ": nearest labelled {cloud} cloud / {} local (kernel {similarity:.2}); features score {:.2}",
            near - cloud,
            f.score(&w)
        );
        let mut order: Vec<(&'static str, f32)> = f
            .contributions(&w)
            .into_iter()
            .filter(|(_, c)| c.abs() > 0.01)
            .collect();
        order.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()));
        for (n, (name, c)) in order.iter().take(3).enumerate() {
            parts.push_str(if n == 0 { " (" } else { ", " });
            let _ = write!(parts, "{name}{c:+.2}");
            if n + 1 == order.len().min(3) {
                parts.push(')');
            }
        }
        Scored { score, parts }
    }

    /// The decision on a scored request with its `route_bias`.
    pub fn decision(&self, s: &Scored, route_bias: Option<f32>) -> Decision {
        let threshold = self.threshold - route_bias.unwrap_or(0.0) * self.bias_span;
        let target = if s.score >= threshold {
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
                "learned score {:.2} {cmp} {threshold:.2} ({}){}",
                s.score, self.threshold_from, s.parts
            ),
            score: s.score,
        }
    }

    /// The pool for an `auto` request whose embedding is known, and why.
    pub fn decide(&self, features: &Router, req: &GenerateRequest, embedding: &[f32]) -> Decision {
        self.decision(&self.scored(features, req, embedding), req.route_bias)
    }
}

/// A request's learned score and its explanation (the nearest labelled
/// prompts and the feature router's score), kept for repeated prompts.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// The learned score (compared with the threshold).
    pub score: f32,
    parts: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> TrainingInfo {
        TrainingInfo {
            ridge: 0.1,
            folds: 5,
            seed: 1,
            examples: 2,
            data: String::new(),
        }
    }

    /// Two support rows: one at +1 on the first input (cloud), one at −1.
    fn weights() -> Weights {
        let mut a = vec![0.0; INPUTS];
        a[0] = 1.0;
        let b: Vec<f32> = a.iter().map(|v| -v).collect();
        Weights::new(
            vec![0.0; INPUTS],
            vec![1.0; INPUTS],
            0.5,
            &[quantize_row(&a), quantize_row(&b)],
            &[true, false],
            vec![1.0, -1.0],
            0.0,
            (0..QUANTILES).map(|i| i as f32).collect(),
            info(),
        )
        .unwrap()
    }

    #[test]
    fn parse_names_what_is_wrong() {
        let good = serde_json::to_string(&weights()).unwrap();
        assert_eq!(Weights::parse(&good).unwrap(), weights());
        let bad = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
            f(&mut v);
            Weights::parse(&v.to_string()).unwrap_err()
        };
        let e = bad(&|v| {
            v["input_mean"].as_array_mut().unwrap().pop();
        });
        assert!(e.contains("input_mean has 394 values, expected 395"), "{e}");
        let e = bad(&|v| v["format"] = "other/2".into());
        assert!(e.contains("format"), "{e}");
        let e = bad(&|v| v["reference_quantiles"][3] = (-1.0).into());
        assert!(e.contains("ascending"), "{e}");
        let e = bad(&|v| v["support"] = "00ff".into());
        assert!(e.contains("support has 2 bytes, expected 790"), "{e}");
        let e = bad(&|v| v["support"] = "zz".into());
        assert!(e.contains("support is not hex"), "{e}");
        let e = bad(&|v| v["support_cloud"] = "1x".into());
        assert!(e.contains("support_cloud"), "{e}");
        let e = bad(&|v| v["gamma"] = (-1.0).into());
        assert!(e.contains("gamma"), "{e}");
        assert!(Weights::parse("{")
            .unwrap_err()
            .contains("not a weights file"));
        let nan = good.replacen("\"threshold\":0.0", "\"threshold\":1e999", 1);
        assert!(Weights::parse(&nan).is_err());
    }

    #[test]
    fn the_score_is_a_kernel_vote_of_the_support_rows() {
        let w = weights();
        let mut e = vec![0.0; DIMS];
        e[0] = 1.0;
        let x = [0.0; NF];
        // At the cloud row: k = 1 there, exp(-0.5 * 4) at the other.
        let want = 1.0 - (-2.0f32).exp();
        assert!((w.score(&e, &x) - want).abs() < 1e-3, "{}", w.score(&e, &x));
        let (s, cloud, _) = w.score_nearest(&e, &x);
        assert!((s - want).abs() < 1e-3 && cloud == 1);
        e[0] = -1.0;
        assert!((w.score(&e, &x) + want).abs() < 1e-3);
        e[0] = 0.0;
        assert!(w.score(&e, &x).abs() < 1e-6, "halfway is undecided");
    }

    /// The nearest stored prompts are the ones with the largest kernel
    /// values, as sorting them all would give.
    #[test]
    fn the_nearest_are_the_most_similar_rows() {
        let rows: Vec<Vec<f32>> = (0..12)
            .map(|i| {
                let mut r = vec![0.0; INPUTS];
                r[0] = (i as f32 - 6.0) / 3.0;
                r
            })
            .collect();
        let cloud: Vec<bool> = (0..12).map(|i| i % 3 == 0).collect();
        let w = Weights::new(
            vec![0.0; INPUTS],
            vec![1.0; INPUTS],
            0.5,
            &rows.iter().map(|r| quantize_row(r)).collect::<Vec<_>>(),
            &cloud,
            vec![1.0; 12],
            0.0,
            (0..QUANTILES).map(|i| i as f32).collect(),
            info(),
        )
        .unwrap();
        for at in [-2.0f32, 0.0, 0.7, 2.0] {
            let mut e = vec![0.0; DIMS];
            e[0] = at;
            let x = [0.0; NF];
            let z = w.standardise(&e, &x);
            let mut all: Vec<(f32, bool)> = w.kernel(&z).zip(cloud.iter().copied()).collect();
            all.sort_by(|a, b| b.0.total_cmp(&a.0));
            let top = &all[..NEAREST];
            let want_cloud = top.iter().filter(|(_, c)| *c).count();
            let want_mean = top.iter().map(|(k, _)| k).sum::<f32>() / NEAREST as f32;
            let (_, cloud_n, mean) = w.score_nearest(&e, &x);
            assert_eq!(cloud_n, want_cloud, "at {at}");
            assert!(
                (mean - want_mean).abs() < 1e-6,
                "at {at}: {mean} vs {want_mean}"
            );
        }
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
