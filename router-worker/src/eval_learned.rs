//! The learned router on the labelled sets: embeddings of a whole set,
//! training examples, scores, the cost–quality curve and the comparison
//! at equal cloud recall (`optiroute-route-eval`).

use optiroute_common::wire::{Pool, DEFAULT_MAX_TOKENS};
use optiroute_embed::Embedder;

use crate::eval::{score_decisions, Labelled, Scores};
use crate::learned::train::Example;
use crate::learned::{inputs, threshold_for_share, LearnedRouter};
use crate::routing::Router;

/// The embedding every item's request gets in the router (its last user
/// turn: the vector the semantic cache reads too), on two threads.
pub fn embed_all(model: &Embedder, items: &[&Labelled]) -> Vec<Vec<f32>> {
    let texts: Vec<String> = items
        .iter()
        .map(|i| i.request().params.last_user_text().to_string())
        .collect();
    let half = texts.len().div_ceil(2);
    let (a, b) = texts.split_at(half);
    std::thread::scope(|s| {
        let first = s.spawn(|| a.iter().map(|t| model.embed(t)).collect::<Vec<_>>());
        let mut second: Vec<Vec<f32>> = b.iter().map(|t| model.embed(t)).collect();
        let mut out = first.join().unwrap_or_else(|_| {
            // A panic in the model is a bug; embed on this thread instead of losing the run.
            a.iter().map(|t| model.embed(t)).collect()
        });
        out.append(&mut second);
        out
    })
}

/// Training examples from labelled items and their embeddings.
pub fn examples(router: &Router, items: &[&Labelled], embs: &[Vec<f32>]) -> Vec<Example> {
    items
        .iter()
        .zip(embs)
        .map(|(i, e)| {
            let text = i.text();
            let f = router.features(&text, DEFAULT_MAX_TOKENS);
            Example {
                embedding: e.clone(),
                inputs: inputs(&f, text.chars().count()),
                cloud: i.label == Pool::Cloud,
            }
        })
        .collect()
}

/// The learned router's score for each item.
pub fn learned_scores(
    learned: &LearnedRouter,
    features: &Router,
    items: &[&Labelled],
    embs: &[Vec<f32>],
) -> Vec<f32> {
    items
        .iter()
        .zip(embs)
        .map(|(i, e)| learned.score(features, &i.request(), e))
        .collect()
}

/// The feature router's score for each item.
pub fn feature_scores(router: &Router, items: &[&Labelled]) -> Vec<f32> {
    items
        .iter()
        .map(|i| {
            let req = i.request();
            router
                .features(&req.text(), req.params.max_tokens)
                .score(&router.weights())
        })
        .collect()
}

/// Cloud at or above `threshold`.
pub fn at_threshold(scores: &[f32], threshold: f32) -> Vec<Pool> {
    scores
        .iter()
        .map(|s| {
            if *s >= threshold {
                Pool::Cloud
            } else {
                Pool::Local
            }
        })
        .collect()
}

/// One point of the cost–quality curve.
#[derive(Debug, Clone)]
pub struct CurvePoint {
    /// The share asked for (`router.routing.cloud_share`).
    pub share: f32,
    pub threshold: f32,
    pub scores: Scores,
}

/// For each share, the threshold calibrated on the reference workload's
/// score quantiles `q` (from [`crate::learned::quantiles`]), applied to `items` (whose
/// scores are `item_scores`).
pub fn curve(
    q: &[f32],
    items: &[&Labelled],
    item_scores: &[f32],
    shares: &[f32],
) -> Vec<CurvePoint> {
    shares
        .iter()
        .map(|&share| {
            let threshold = threshold_for_share(q, share);
            CurvePoint {
                share,
                threshold,
                scores: score_decisions(items, &at_threshold(item_scores, threshold)),
            }
        })
        .collect()
}

/// Over every threshold on `scores`, the cheapest whose cloud recall on
/// `items` is at least `recall`: (threshold, scores).
pub fn cheapest_at_recall(
    items: &[&Labelled],
    scores: &[f32],
    recall: f64,
) -> Option<(f32, Scores)> {
    let mut cuts: Vec<f32> = scores.to_vec();
    cuts.sort_by(f32::total_cmp);
    cuts.dedup();
    cuts.into_iter()
        .map(|t| (t, score_decisions(items, &at_threshold(scores, t))))
        .filter(|(_, s)| s.cloud_recall >= recall - 1e-9)
        .min_by(|a, b| a.1.cost_per_1k.total_cmp(&b.1.cost_per_1k))
}

/// The `p`-th percentile (0..=100) of `samples` (sorted here).
pub fn percentile(samples: &mut [f64], p: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_by(f64::total_cmp);
    let idx = ((p / 100.0) * (samples.len() - 1) as f64).round() as usize;
    samples[idx.min(samples.len() - 1)]
}

/// The curve as a Markdown table.
pub fn curve_table(rows: &[(&str, Vec<CurvePoint>)]) -> String {
    let mut out = String::from(
        "| router | cloud_share | threshold | routed cloud | cloud-labelled served by cloud | accuracy | cost / 1k req |\n|---|---|---|---|---|---|---|\n",
    );
    for (name, points) in rows {
        for p in points {
            out.push_str(&format!(
                "| {name} | {:.1} | {:+.3} | {:.1} % | {:.1} % | {:.1} % | ${:.4} |\n",
                p.share,
                p.threshold,
                (1.0 - p.scores.local_share) * 100.0,
                p.scores.cloud_recall * 100.0,
                p.scores.accuracy * 100.0,
                p.scores.cost_per_1k,
            ));
        }
    }
    out
}
