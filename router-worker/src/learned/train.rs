//! Offline training of the learned router (`optiroute-route-eval --train`):
//! logistic regression, mini-batch Adam with L2 regularisation, the batch
//! order drawn from a seeded generator, so the same data and seed give the
//! same file byte for byte.
//!
//! The regularisation strength and the threshold are chosen by two-fold
//! cross-validation over the training and validation thirds (each fold
//! trained on one third and scored on the other): the threshold is the
//! out-of-fold logit with the best accuracy among those keeping cloud recall
//! at [`TARGET_RECALL`] or more (the operating point: a cloud prompt
//! answered by a 135M model is the worse mistake), and the regularisation the
//! one with the best accuracy there. The shipped model is then trained on
//! both thirds. The held-out third is never read here.

use super::{
    quantiles, TrainingInfo, Weights, DIMS, EMBEDDING_MODEL, EMBEDDING_SCALE, FEATURES, FORMAT, NF,
};

/// One labelled prompt, ready for the model.
#[derive(Debug, Clone)]
pub struct Example {
    pub embedding: Vec<f32>,
    pub inputs: [f32; NF],
    pub cloud: bool,
}

/// The cloud recall the threshold keeps on out-of-fold scores.
pub const TARGET_RECALL: f64 = 0.95;
pub const L2_GRID: [f32; 7] = [1e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0];
pub const EPOCHS: usize = 120;
const BATCH: usize = 32;
const LEARNING_RATE: f32 = 0.01;

/// SplitMix64: a small, well-mixed generator for the batch order.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// A fitted model: weights over [scaled embedding, standardised features].
struct Model {
    mean: [f32; NF],
    scale: [f32; NF],
    w: Vec<f32>,
    b: f32,
}

impl Model {
    fn row(&self, e: &Example) -> Vec<f32> {
        row(e, &self.mean, &self.scale)
    }

    fn logit(&self, e: &Example) -> f32 {
        self.b + dot(&self.w, &self.row(e))
    }
}

fn row(e: &Example, mean: &[f32; NF], scale: &[f32; NF]) -> Vec<f32> {
    let mut z: Vec<f32> = e.embedding.iter().map(|v| v * EMBEDDING_SCALE).collect();
    z.extend((0..NF).map(|i| (e.inputs[i] - mean[i]) / scale[i]));
    z
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

fn fit(examples: &[&Example], l2: f32, epochs: usize, seed: u64) -> Model {
    let n = examples.len().max(1) as f32;
    let mut mean = [0.0f32; NF];
    let mut scale = [0.0f32; NF];
    for i in 0..NF {
        mean[i] = examples.iter().map(|e| e.inputs[i]).sum::<f32>() / n;
        let var = examples
            .iter()
            .map(|e| (e.inputs[i] - mean[i]).powi(2))
            .sum::<f32>()
            / n;
        scale[i] = var.sqrt().max(1e-3);
    }
    let rows: Vec<(Vec<f32>, f32)> = examples
        .iter()
        .map(|e| (row(e, &mean, &scale), if e.cloud { 1.0 } else { 0.0 }))
        .collect();
    let d = DIMS + NF;
    let (mut w, mut b) = (vec![0.0f32; d], 0.0f32);
    // Adam state: weights then bias at index d.
    let (mut m, mut v) = (vec![0.0f32; d + 1], vec![0.0f32; d + 1]);
    let (beta1, beta2, eps) = (0.9f32, 0.999f32, 1e-8f32);
    let mut rng = SplitMix(seed);
    let mut order: Vec<usize> = (0..rows.len()).collect();
    let mut step = 0i32;
    let mut grad = vec![0.0f32; d + 1];
    for _ in 0..epochs {
        rng.shuffle(&mut order);
        for batch in order.chunks(BATCH) {
            grad.iter_mut().for_each(|g| *g = 0.0);
            for &k in batch {
                let (z, y) = &rows[k];
                let err = sigmoid(b + dot(&w, z)) - y;
                for (g, x) in grad.iter_mut().zip(z) {
                    *g += err * x;
                }
                grad[d] += err;
            }
            let bn = batch.len() as f32;
            step += 1;
            let (c1, c2) = (1.0 - beta1.powi(step), 1.0 - beta2.powi(step));
            for j in 0..=d {
                let param = if j < d { w[j] } else { b };
                let g = grad[j] / bn + if j < d { l2 * param } else { 0.0 };
                m[j] = beta1 * m[j] + (1.0 - beta1) * g;
                v[j] = beta2 * v[j] + (1.0 - beta2) * g * g;
                let delta = LEARNING_RATE * (m[j] / c1) / ((v[j] / c2).sqrt() + eps);
                if j < d {
                    w[j] -= delta;
                } else {
                    b -= delta;
                }
            }
        }
    }
    Model { mean, scale, w, b }
}

/// Among the thresholds whose cloud recall on `scored` is at least
/// `min_recall`, the one maximising accuracy + `recall_weight` × recall:
/// returns (threshold, accuracy, recall). A threshold sits halfway between
/// two neighbouring scores.
pub fn pick_threshold(
    scored: &[(f32, bool)],
    min_recall: f64,
    recall_weight: f64,
) -> (f32, f64, f64) {
    let mut s: Vec<(f32, bool)> = scored.to_vec();
    s.sort_by(|a, b| b.0.total_cmp(&a.0));
    let pos = s.iter().filter(|(_, c)| *c).count().max(1) as f64;
    let neg = s.iter().filter(|(_, c)| !*c).count();
    let n = s.len().max(1) as f64;
    // Cutting after the first k scores (descending) sends those k to the cloud.
    let (mut tp, mut fp) = (0usize, 0usize);
    let mut best: Option<(f64, f64, usize, f64)> = None;
    for k in 0..=s.len() {
        if k > 0 {
            if s[k - 1].1 {
                tp += 1;
            } else {
                fp += 1;
            }
            // Only cut between different scores.
            if k < s.len() && s[k].0 == s[k - 1].0 {
                continue;
            }
        }
        let recall = tp as f64 / pos;
        let accuracy = (tp + (neg - fp)) as f64 / n;
        let objective = accuracy + recall_weight * recall;
        if recall >= min_recall && best.is_none_or(|(o, _, _, _)| objective > o) {
            best = Some((objective, accuracy, k, recall));
        }
    }
    let (_, accuracy, k, recall) = best.unwrap_or((0.0, 0.0, s.len(), 1.0));
    let threshold = match k {
        0 => s.first().map_or(0.0, |x| x.0 + 1e-3),
        k if k >= s.len() => s.last().map_or(0.0, |x| x.0 - 1e-3),
        k => (s[k - 1].0 + s[k].0) / 2.0,
    };
    (threshold, accuracy, recall)
}

/// Trains on `train` and `validation` (cross-validated choices, then one
/// model on both) and returns the weights with a report of the choices.
pub fn train(
    train: &[Example],
    validation: &[Example],
    seed: u64,
    data: &str,
) -> (Weights, String) {
    let a: Vec<&Example> = train.iter().collect();
    let b: Vec<&Example> = validation.iter().collect();
    let mut report =
        String::from("two-fold cross-validation (train <-> validation), out-of-fold:\n");
    let mut best: Option<(f64, f32, f32)> = None; // (accuracy, l2, threshold)
    for l2 in L2_GRID {
        let on_a = fit(&a, l2, EPOCHS, seed);
        let on_b = fit(&b, l2, EPOCHS, seed);
        let scored: Vec<(f32, bool)> = b
            .iter()
            .map(|e| (on_a.logit(e), e.cloud))
            .chain(a.iter().map(|e| (on_b.logit(e), e.cloud)))
            .collect();
        let (t, acc, rec) = pick_threshold(&scored, TARGET_RECALL, 0.0);
        let (_, best_acc, best_rec) = pick_threshold(&scored, 0.0, 0.0);
        report.push_str(&format!(
            "  l2 {l2:<5} threshold {t:+.3}: accuracy {:.1} %, cloud recall {:.1} % \
             (best accuracy at any threshold {:.1} %, at recall {:.1} %)\n",
            acc * 100.0,
            rec * 100.0,
            best_acc * 100.0,
            best_rec * 100.0
        ));
        if best.is_none_or(|(a, _, _)| acc > a) {
            best = Some((acc, l2, t));
        }
    }
    let (_, l2, threshold) = best.unwrap_or((0.0, L2_GRID[0], 0.0));
    let both: Vec<&Example> = a.iter().chain(&b).copied().collect();
    let model = fit(&both, l2, EPOCHS, seed);
    let reference: Vec<f32> = both.iter().map(|e| model.logit(e)).collect();
    report.push_str(&format!(
        "chosen: l2 {l2}, threshold {threshold:+.3}; final model trained on {} examples\n",
        both.len()
    ));
    let round = |x: f32| (x * 1e5).round() / 1e5;
    let weights = Weights {
        format: FORMAT.into(),
        embedding_model: EMBEDDING_MODEL.into(),
        features: FEATURES.iter().map(|s| s.to_string()).collect(),
        feature_mean: model.mean.iter().map(|x| round(*x)).collect(),
        feature_scale: model.scale.iter().map(|x| round(*x)).collect(),
        embedding_weights: model.w[..DIMS].iter().map(|x| round(*x)).collect(),
        feature_weights: model.w[DIMS..].iter().map(|x| round(*x)).collect(),
        bias: round(model.b),
        threshold: round(threshold),
        reference_quantiles: quantiles(&reference).into_iter().map(round).collect(),
        training: TrainingInfo {
            seed,
            l2,
            epochs: EPOCHS,
            examples: both.len(),
            data: data.to_string(),
        },
    };
    (weights, report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(x: f32, cloud: bool) -> Example {
        let mut embedding = vec![0.0; DIMS];
        embedding[0] = x / EMBEDDING_SCALE;
        Example {
            embedding,
            inputs: [x; NF],
            cloud,
        }
    }

    #[test]
    fn pick_threshold_keeps_recall_then_maximises_accuracy() {
        let s = [
            (3.0, true),
            (2.0, true),
            (1.0, false),
            (0.5, true),
            (0.0, false),
        ];
        let (t, acc, rec) = pick_threshold(&s, 0.6, 0.0);
        assert!((t - 1.5).abs() < 1e-6 && (acc - 0.8).abs() < 1e-9 && rec > 0.6);
        let (t, _, rec) = pick_threshold(&s, 1.0, 0.0);
        assert!((t - 0.25).abs() < 1e-6 && rec == 1.0);
        // Recall weighted twice: 0.8 + 2 * 2/3 < 0.8 + 2 * 1.0 at the lower cut.
        let (t, _, rec) = pick_threshold(&s, 0.0, 2.0);
        assert!((t - 0.25).abs() < 1e-6 && rec == 1.0);
    }

    #[test]
    fn training_separates_a_separable_set_and_is_deterministic() {
        let train: Vec<Example> = (0..40)
            .map(|i| example(i as f32 / 10.0 - 2.0, i >= 20))
            .collect();
        let val: Vec<Example> = (0..40)
            .map(|i| example(i as f32 / 10.0 - 1.95, i >= 20))
            .collect();
        let (w1, _) = train_and(&train, &val, 7);
        let (w2, _) = train_and(&train, &val, 7);
        assert_eq!(w1, w2);
        let w = Weights::parse(&serde_json::to_string(&w1).unwrap()).unwrap();
        let hi = example(1.5, true);
        let lo = example(-1.5, false);
        assert!(w.logit(&hi.embedding, &hi.inputs) > w.threshold);
        assert!(w.logit(&lo.embedding, &lo.inputs) < w.threshold);
    }

    fn train_and(t: &[Example], v: &[Example], seed: u64) -> (Weights, String) {
        train(t, v, seed, "test")
    }
}
