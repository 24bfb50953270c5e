//! Offline training of the learned router (`optiroute-route-eval --train`):
//! kernel ridge regression with an RBF kernel, solved exactly (a Cholesky
//! factorisation of the kernel matrix plus the ridge), so the same data
//! and seed give the same file byte for byte (the seed only assigns
//! prompts to folds).
//!
//! The threshold and the reference quantiles come from out-of-fold scores
//! over the training and validation thirds ([`FOLDS`] folds, each scored by
//! a model trained on the others, as a new prompt would be): the threshold
//! is the out-of-fold score with the best accuracy among those keeping
//! cloud recall at [`TARGET_RECALL`] or more (the operating point:
//! a cloud prompt answered by a 135M model is the worse mistake). The
//! shipped model is then trained on both thirds. The held-out third is
//! never read here. The inputs' means and scales are taken over both
//! thirds before the folds (no label leaks through them). [`RIDGE`] and
//! [`GAMMA`] were chosen by cross-validation over the same two thirds (5 folds, 3 shuffles; an RBF kernel beat a
//! logistic regression there by 3–4 points of accuracy at 95 % recall).

use super::{quantiles, quantize_row, standard, TrainingInfo, Weights, DIMS, INPUTS, NF};

/// One labelled prompt, ready for the model.
#[derive(Debug, Clone)]
pub struct Example {
    pub embedding: Vec<f32>,
    pub inputs: [f32; NF],
    pub cloud: bool,
}

/// The cloud recall the threshold keeps on out-of-fold scores.
pub const TARGET_RECALL: f64 = 0.95;
/// Added to the kernel matrix's diagonal.
pub const RIDGE: f64 = 0.1;
/// The kernel's width: `exp(-GAMMA |z - s|²)` over standardised inputs.
pub const GAMMA: f32 = 1.0 / INPUTS as f32;
pub const FOLDS: usize = 5;

/// SplitMix64: a small, well-mixed generator for the fold assignment.
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

/// The raw input of an example: its embedding, then its features.
fn raw(e: &Example) -> Vec<f32> {
    e.embedding.iter().chain(&e.inputs).copied().collect()
}

/// Solves `(K + RIDGE·I) alpha = y` for the rows `idx` of `z` by Cholesky.
fn solve(z: &[Vec<f32>], y: &[f64], idx: &[usize]) -> Result<Vec<f64>, String> {
    let n = idx.len();
    let g = f64::from(GAMMA);
    let mut l = vec![0.0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let d2: f64 = z[idx[i]]
                .iter()
                .zip(&z[idx[j]])
                .map(|(a, b)| f64::from(a - b).powi(2))
                .sum();
            l[i * n + j] = (-g * d2).exp() + if i == j { RIDGE } else { 0.0 };
        }
    }
    // In place: the lower triangle becomes L with K + RIDGE·I = L·Lᵀ.
    for j in 0..n {
        let mut d = l[j * n + j];
        for k in 0..j {
            d -= l[j * n + k] * l[j * n + k];
        }
        if d <= 0.0 {
            return Err("the kernel matrix is not positive definite".into());
        }
        let d = d.sqrt();
        l[j * n + j] = d;
        for i in j + 1..n {
            let mut v = l[i * n + j];
            for k in 0..j {
                v -= l[i * n + k] * l[j * n + k];
            }
            l[i * n + j] = v / d;
        }
    }
    let mut x: Vec<f64> = idx.iter().map(|&i| y[i]).collect();
    for i in 0..n {
        for k in 0..i {
            x[i] -= l[i * n + k] * x[k];
        }
        x[i] /= l[i * n + i];
    }
    for i in (0..n).rev() {
        for k in i + 1..n {
            x[i] -= l[k * n + i] * x[k];
        }
        x[i] /= l[i * n + i];
    }
    Ok(x)
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

/// What [`train`] made.
pub struct Trained {
    pub weights: Weights,
    /// How the threshold was chosen, for the operator.
    pub report: String,
    /// Each example's out-of-fold score (`train` then `validation` order):
    /// the reference workload the quantiles describe.
    pub out_of_fold: Vec<f32>,
}

/// Trains on `train` and `validation` (out-of-fold threshold and
/// quantiles, then one model on both).
pub fn train(
    train: &[Example],
    validation: &[Example],
    seed: u64,
    data: &str,
) -> Result<Trained, String> {
    let all: Vec<&Example> = train.iter().chain(validation).collect();
    let n = all.len();
    if n < FOLDS * 2 {
        return Err(format!("{n} examples are too few to train on"));
    }
    let raws: Vec<Vec<f32>> = all.iter().map(|e| raw(e)).collect();
    let nf = n as f32;
    let mean: Vec<f32> = (0..INPUTS)
        .map(|d| raws.iter().map(|r| r[d]).sum::<f32>() / nf)
        .collect();
    let scale: Vec<f32> = (0..INPUTS)
        .map(|d| {
            let var = raws.iter().map(|r| (r[d] - mean[d]).powi(2)).sum::<f32>() / nf;
            // An input that (nearly) never varies in training carries
            // nothing: unit scale keeps a new value of it from dominating.
            let sd = var.sqrt();
            if sd < 1e-3 {
                1.0
            } else {
                sd
            }
        })
        .collect();
    let zs: Vec<Vec<f32>> = raws
        .iter()
        .map(|r| {
            r.iter()
                .zip(mean.iter().zip(&scale))
                .map(|(v, (m, s))| standard(*v, *m, *s))
                .collect()
        })
        .collect();
    // The model is trained on the rows as the file stores them.
    let quantized: Vec<(Vec<i8>, f32)> = zs.iter().map(|z| quantize_row(z)).collect();
    let rows: Vec<Vec<f32>> = quantized
        .iter()
        .map(|(q, s)| q.iter().map(|b| f32::from(*b) * s).collect())
        .collect();
    let y: Vec<f64> = all
        .iter()
        .map(|e| if e.cloud { 1.0 } else { -1.0 })
        .collect();
    let cloud: Vec<bool> = all.iter().map(|e| e.cloud).collect();
    let info = |examples| TrainingInfo {
        ridge: RIDGE as f32,
        folds: FOLDS,
        seed,
        examples,
        data: data.to_string(),
    };
    let model = |idx: &[usize], threshold: f32, q: Vec<f32>| -> Result<Weights, String> {
        let alpha = solve(&rows, &y, idx)?;
        Weights::new(
            mean.clone(),
            scale.clone(),
            GAMMA,
            &idx.iter()
                .map(|&i| quantized[i].clone())
                .collect::<Vec<_>>(),
            &idx.iter().map(|&i| cloud[i]).collect::<Vec<_>>(),
            alpha.iter().map(|a| *a as f32).collect(),
            threshold,
            q,
            info(idx.len()),
        )
    };
    let mut order: Vec<usize> = (0..n).collect();
    SplitMix(seed).shuffle(&mut order);
    let mut fold = vec![0usize; n];
    for (pos, &i) in order.iter().enumerate() {
        fold[i] = pos % FOLDS;
    }
    let flat = vec![0.0; super::QUANTILES];
    let mut oof = vec![0.0f32; n];
    for f in 0..FOLDS {
        let idx: Vec<usize> = (0..n).filter(|&i| fold[i] != f).collect();
        let m = model(&idx, 0.0, flat.clone())?;
        for i in (0..n).filter(|&i| fold[i] == f) {
            oof[i] = m.score_standardised(&zs[i]);
        }
    }
    let scored: Vec<(f32, bool)> = oof.iter().copied().zip(cloud.iter().copied()).collect();
    let (threshold, acc, rec) = pick_threshold(&scored, TARGET_RECALL, 0.0);
    let (_, best_acc, best_rec) = pick_threshold(&scored, 0.0, 0.0);
    let report = format!(
        "{FOLDS}-fold out-of-fold scores over {n} examples (seed {seed}), ridge {RIDGE}, gamma 1/{INPUTS}:\n  \
         threshold {threshold:+.3}: accuracy {:.1} %, cloud recall {:.1} % \
         (best accuracy at any threshold {:.1} %, at recall {:.1} %)\n\
         final model trained on {n} examples ({} embedding dimensions + {NF} features)\n",
        acc * 100.0,
        rec * 100.0,
        best_acc * 100.0,
        best_rec * 100.0,
        DIMS
    );
    let round = |x: f32| (x * 1e5).round() / 1e5;
    let all_idx: Vec<usize> = (0..n).collect();
    let weights = model(
        &all_idx,
        round(threshold),
        quantiles(&oof).into_iter().map(round).collect(),
    )?;
    Ok(Trained {
        weights,
        report,
        out_of_fold: oof,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(x: f32, cloud: bool) -> Example {
        let mut embedding = vec![0.0; DIMS];
        embedding[0] = x;
        embedding[1] = -x;
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
        let tr: Vec<Example> = (0..40)
            .map(|i| example(i as f32 / 10.0 - 2.0, i >= 20))
            .collect();
        let val: Vec<Example> = (0..40)
            .map(|i| example(i as f32 / 10.0 - 1.95, i >= 20))
            .collect();
        let t1 = train(&tr, &val, 7, "test").unwrap();
        let right = t1
            .out_of_fold
            .iter()
            .zip(tr.iter().chain(&val))
            .filter(|(s, e)| (**s >= t1.weights.threshold) == e.cloud)
            .count();
        assert!(right >= 76, "{right} of 80 out of fold: {}", t1.report);
        let w1 = t1.weights;
        let w2 = train(&tr, &val, 7, "test").unwrap().weights;
        assert_eq!(w1, w2);
        let w = Weights::parse(&serde_json::to_string(&w1).unwrap()).unwrap();
        assert_eq!(w, w1);
        let hi = example(1.5, true);
        let lo = example(-1.5, false);
        assert!(w.score(&hi.embedding, &hi.inputs) > w.threshold);
        assert!(w.score(&lo.embedding, &lo.inputs) < w.threshold);
        // The out-of-fold quantiles span both labels' scores.
        assert!(w.reference_quantiles[0] < w.threshold);
        assert!(w.reference_quantiles[200] > w.threshold);
        assert!(train(&tr[..3], &[], 7, "test").is_err());
    }

    #[test]
    fn the_solve_inverts_the_regularised_kernel() {
        // Two far-apart points: K ≈ I, so alpha ≈ y / (1 + RIDGE).
        let z = vec![vec![0.0f32; INPUTS], vec![100.0f32; INPUTS]];
        let a = solve(&z, &[1.0, -1.0], &[0, 1]).unwrap();
        assert!((a[0] - 1.0 / (1.0 + RIDGE)).abs() < 1e-9, "{a:?}");
        assert!((a[1] + 1.0 / (1.0 + RIDGE)).abs() < 1e-9, "{a:?}");
    }
}
