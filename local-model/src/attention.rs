//! Each sequence's key/value cache and the attention over it.
//!
//! Keys are kept in blocks of [`KEY_BLOCK`] positions, transposed (per
//! block, element `j` of the 16 positions side by side), so the scores of
//! a query against 16 positions are 16 lanes of one vector with no
//! horizontal sums; values stay one position after another. The loops are
//! plain Rust, compiled with the CPU's SIMD features through
//! [`crate::quant::vectorized`]; the arithmetic is the same on every CPU
//! and for a sequence alone or in a batch.

use crate::model::{Config, Row};

/// Positions a block of the key cache holds.
pub const KEY_BLOCK: usize = 16;

/// One sequence's keys and values, per layer.
pub struct KvCache {
    /// Per layer: blocks of [`KEY_BLOCK`] positions, each `kv_dim` rows of
    /// [`KEY_BLOCK`] lanes (zero past the last position).
    keys: Vec<Vec<f32>>,
    /// Per layer: `positions × kv_dim`.
    values: Vec<Vec<f32>>,
    pub(crate) len: usize,
}

impl KvCache {
    /// Bytes a cache for `tokens` positions reserves.
    pub fn bytes(cfg: &Config, tokens: usize) -> usize {
        let kv_dim = cfg.kv_heads * cfg.head_dim;
        cfg.layers * (tokens.div_ceil(KEY_BLOCK) * KEY_BLOCK + tokens) * kv_dim * 4
    }

    /// Room for `tokens` positions, allocated once (pages are touched only
    /// as positions fill), so the cache never grows past what was reserved.
    pub fn new(cfg: &Config, tokens: usize) -> Self {
        let kv_dim = cfg.kv_heads * cfg.head_dim;
        let k = tokens.div_ceil(KEY_BLOCK) * KEY_BLOCK * kv_dim;
        KvCache {
            keys: (0..cfg.layers).map(|_| Vec::with_capacity(k)).collect(),
            values: (0..cfg.layers)
                .map(|_| Vec::with_capacity(tokens * kv_dim))
                .collect(),
            len: 0,
        }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Stores position `pos`'s key and value for `layer` (positions come
    /// in order).
    pub(crate) fn push(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let kv_dim = k.len();
        let keys = &mut self.keys[layer];
        debug_assert_eq!(self.values[layer].len(), pos * kv_dim);
        if pos.is_multiple_of(KEY_BLOCK) {
            keys.resize(keys.len() + KEY_BLOCK * kv_dim, 0.0);
        }
        let base = pos / KEY_BLOCK * KEY_BLOCK * kv_dim + pos % KEY_BLOCK;
        for (j, x) in k.iter().enumerate() {
            keys[base + j * KEY_BLOCK] = *x;
        }
        self.values[layer].extend_from_slice(v);
    }
}

/// Every row's attention over its sequence's cache for one layer (a
/// struct rather than a closure, so that it is compiled inline with the
/// CPU's SIMD features).
pub(crate) struct Attend<'a, 'b> {
    pub rows: &'a [Row],
    pub caches: &'a [&'b mut KvCache],
    pub layer: usize,
    pub pos: &'a [usize],
    pub q: &'a [f32],
    pub scores: &'a mut Vec<f32>,
    pub att: &'a mut [f32],
    pub cfg: &'a Config,
}

impl pulp::NullaryFnOnce for Attend<'_, '_> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        let c = self.cfg;
        let (dim, hd, kv_dim) = (c.dim, c.head_dim, c.kv_heads * c.head_dim);
        let group = c.heads / c.kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        for (i, r) in self.rows.iter().enumerate() {
            let cache = &*self.caches[r.seq];
            let (keys, values) = (&cache.keys[self.layer], &cache.values[self.layer]);
            let seen = self.pos[i] + 1;
            let blocks = seen.div_ceil(KEY_BLOCK);
            self.scores.resize(blocks * KEY_BLOCK, 0.0);
            for h in 0..c.heads {
                let kvh = h / group;
                let q = &self.q[i * dim + h * hd..i * dim + (h + 1) * hd];
                // Scores, 16 positions at a time.
                for (b, out) in self.scores.chunks_exact_mut(KEY_BLOCK).enumerate() {
                    let at = b * KEY_BLOCK * kv_dim + kvh * hd * KEY_BLOCK;
                    let blk = &keys[at..at + hd * KEY_BLOCK];
                    let mut s = [0f32; KEY_BLOCK];
                    for (qd, col) in q.iter().zip(blk.chunks_exact(KEY_BLOCK)) {
                        for (s, k) in s.iter_mut().zip(col) {
                            *s += qd * k;
                        }
                    }
                    for (o, s) in out.iter_mut().zip(s) {
                        *o = s * scale;
                    }
                }
                let scores = &mut self.scores[..seen];
                let max = scores.iter().fold(f32::NEG_INFINITY, |m, s| m.max(*s));
                let mut sum = 0.0;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                for s in scores.iter_mut() {
                    *s /= sum;
                }
                // The weighted values, 16 elements of the head at a time
                // (their sums stay in registers over the positions).
                let out = &mut self.att[i * dim + h * hd..i * dim + (h + 1) * hd];
                let mut d0 = 0;
                for chunk in out.chunks_mut(16) {
                    let mut acc = [0f32; 16];
                    let w = chunk.len();
                    for (t, p) in scores.iter().enumerate() {
                        let at = t * kv_dim + kvh * hd + d0;
                        for (a, v) in acc.iter_mut().zip(&values[at..at + w]) {
                            *a += p * v;
                        }
                    }
                    chunk.copy_from_slice(&acc[..w]);
                    d0 += w;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                ((s >> 8) as f32 / (1u32 << 24) as f32) - 0.5
            })
            .collect()
    }

    /// The blocked, transposed cache gives textbook attention (softmax of
    /// scaled dot products, weighted values) at positions on both sides
    /// of block boundaries, with grouped heads.
    #[test]
    fn attention_over_the_blocked_cache_is_softmax_attention() {
        let cfg = Config {
            dim: 6 * 20,
            hidden: 0,
            layers: 2,
            heads: 6,
            kv_heads: 2,
            head_dim: 20,
            vocab: 0,
            context: 64,
            rms_eps: 1e-5,
            rope_base: 10_000.0,
        };
        let (hd, kv_dim, dim) = (20, 40, 120);
        let tokens = 41;
        let keys = pseudo(tokens * kv_dim, 1);
        let values = pseudo(tokens * kv_dim, 2);
        let mut cache = KvCache::new(&cfg, tokens);
        for t in 0..tokens {
            let (k, v) = (
                &keys[t * kv_dim..(t + 1) * kv_dim],
                &values[t * kv_dim..(t + 1) * kv_dim],
            );
            cache.push(1, t, k, v);
        }
        cache.len = tokens;
        let positions = [0, 14, 15, 16, 17, 31, 32, 40];
        let q = pseudo(positions.len() * dim, 3);
        let rows: Vec<Row> = positions
            .iter()
            .map(|_| Row {
                seq: 0,
                token: 0,
                logits: false,
            })
            .collect();
        let mut att = vec![0f32; positions.len() * dim];
        let mut scores = Vec::new();
        let caches = [&mut cache];
        crate::quant::vectorized(Attend {
            rows: &rows,
            caches: &caches,
            layer: 1,
            pos: &positions,
            q: &q,
            scores: &mut scores,
            att: &mut att,
            cfg: &cfg,
        });
        for (i, &pos) in positions.iter().enumerate() {
            for h in 0..cfg.heads {
                let kvh = h / 3;
                let qh = &q[i * dim + h * hd..i * dim + (h + 1) * hd];
                let s: Vec<f64> = (0..=pos)
                    .map(|t| {
                        let k = &keys[t * kv_dim + kvh * hd..t * kv_dim + (kvh + 1) * hd];
                        qh.iter().zip(k).map(|(a, b)| f64::from(a * b)).sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for d in 0..hd {
                    let want: f64 = (0..=pos)
                        .map(|t| e[t] / sum * f64::from(values[t * kv_dim + kvh * hd + d]))
                        .sum();
                    let got = f64::from(att[i * dim + h * hd + d]);
                    assert!(
                        (got - want).abs() < 1e-5,
                        "pos {pos} head {h} d {d}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
