//! Each sequence's key/value cache and the attention over it.
//!
//! Keys are kept in blocks of [`KEY_BLOCK`] positions, transposed (per
//! block, element `j` of the 16 positions side by side), so the scores of
//! a query against 16 positions are 16 lanes of one vector with no
//! horizontal sums; values stay one position after another. Each KV head's
//! keys and values are contiguous, so a head's attention reads two plain
//! streams, and the query heads that share a KV head (three in SmolLM2)
//! read them together: each key and value is widened once for all of them,
//! while each head's sums stay what they would be alone. Both are kept
//! as bfloat16 (the model's training precision; half the bytes of f32, and
//! attention over a long context is bound by reading them). The loops are
//! plain Rust, compiled with the CPU's SIMD features through
//! [`crate::quant::vectorized`]; the arithmetic is the same on every CPU
//! and for a sequence alone or in a batch.

use std::ops::Range;
use std::sync::{Arc, PoisonError, RwLock};

use crate::model::Config;

/// Positions a block of the key cache holds.
pub const KEY_BLOCK: usize = 16;

/// One layer's keys and values of a sequence, per KV head, each reserved
/// for the positions asked for when the sequence joined (pages touched only
/// as positions fill; never grown past the reservation).
pub struct LayerKv {
    /// Per KV head: blocks of [`KEY_BLOCK`] positions, each `head_dim` rows
    /// of [`KEY_BLOCK`] lanes (zero past the last position).
    keys: Vec<Vec<u16>>,
    /// Per KV head: `positions × head_dim`.
    values: Vec<Vec<u16>>,
    head_dim: usize,
    /// Positions written; the next push is at `filled`.
    filled: usize,
}

impl LayerKv {
    /// KV head `kvh`'s keys (blocks of `head_dim × KEY_BLOCK`) and values
    /// (`head_dim` a position).
    fn head(&self, kvh: usize) -> (&[u16], &[u16]) {
        (&self.keys[kvh], &self.values[kvh])
    }
}

/// A layer's cache, shared with the helper threads that read it during
/// attention (the engine thread alone writes, between attentions).
pub type SharedLayer = Arc<RwLock<LayerKv>>;

/// One sequence's keys and values, per layer.
pub struct KvCache {
    layers: Vec<SharedLayer>,
    pub(crate) len: usize,
}

impl KvCache {
    /// Bytes a cache for `tokens` positions reserves.
    pub fn bytes(cfg: &Config, tokens: usize) -> usize {
        let kv_dim = cfg.kv_heads * cfg.head_dim;
        cfg.layers * (tokens.div_ceil(KEY_BLOCK) * KEY_BLOCK + tokens) * kv_dim * 2
    }

    /// Room for `tokens` positions, allocated once (pages are touched only
    /// as positions fill), so the cache never grows past what was reserved.
    pub fn new(cfg: &Config, tokens: usize) -> Self {
        let hd = cfg.head_dim;
        let k = tokens.div_ceil(KEY_BLOCK) * KEY_BLOCK * hd;
        KvCache {
            layers: (0..cfg.layers)
                .map(|_| {
                    Arc::new(RwLock::new(LayerKv {
                        keys: (0..cfg.kv_heads).map(|_| Vec::with_capacity(k)).collect(),
                        values: (0..cfg.kv_heads)
                            .map(|_| Vec::with_capacity(tokens * hd))
                            .collect(),
                        head_dim: hd,
                        filled: 0,
                    }))
                })
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

    /// Layer `layer`'s cache.
    pub(crate) fn layer(&self, layer: usize) -> &SharedLayer {
        &self.layers[layer]
    }

    /// Stores position `pos`'s key and value for `layer` (positions come
    /// in order).
    pub(crate) fn push(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let mut l = self.layers[layer]
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let hd = l.head_dim;
        let LayerKv {
            keys,
            values,
            filled,
            ..
        } = &mut *l;
        // Positions come in order, within the reservation, a key and a
        // value for every head; anything else would write the wrong slots
        // or grow the cache past what was reserved.
        assert!(
            *filled == pos
                && k.len() == keys.len() * hd
                && v.len() == k.len()
                && values
                    .iter()
                    .all(|v| v.len() == pos * hd && v.len() + hd <= v.capacity()),
            "KV cache position {pos} out of order or past the reserved length"
        );
        let base = pos / KEY_BLOCK * KEY_BLOCK * hd + pos % KEY_BLOCK;
        for ((keys, values), (k, v)) in keys
            .iter_mut()
            .zip(values.iter_mut())
            .zip(k.chunks_exact(hd).zip(v.chunks_exact(hd)))
        {
            if pos.is_multiple_of(KEY_BLOCK) {
                keys.resize(keys.len() + KEY_BLOCK * hd, 0);
            }
            for (j, x) in k.iter().enumerate() {
                keys[base + j * KEY_BLOCK] = to_bf16(*x);
            }
            values.extend(v.iter().map(|x| to_bf16(*x)));
        }
        *filled += 1;
    }
}

/// What one layer's attention reads, for every row of a batch: each row's
/// query (`dim` floats), position and layer cache.
#[derive(Default, Clone)]
pub struct AttnInput {
    pub q: Vec<f32>,
    pub pos: Vec<usize>,
    pub kv: Vec<SharedLayer>,
}

/// The attention of rows `rows` of a batch for one layer, into `att`
/// (`dim` floats a row, from `rows.start`): a struct rather than a
/// closure, so that it is compiled inline with the CPU's SIMD features.
pub(crate) struct Attend<'a> {
    pub input: &'a AttnInput,
    pub rows: Range<usize>,
    pub scores: &'a mut Vec<f32>,
    pub att: &'a mut [f32],
    pub cfg: &'a Config,
}

impl pulp::NullaryFnOnce for Attend<'_> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        let c = self.cfg;
        let (dim, hd) = (c.dim, c.head_dim);
        let group = c.heads / c.kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let buf: &mut Vec<f32> = self.scores;
        let start = self.rows.start;
        // Three heads' sums fill AVX-512's 32 registers; with AVX2's 16
        // they would spill (attention measured 12 % slower), so one.
        let at_once = if crate::quant::wide_vectors() {
            HEADS_AT_ONCE
        } else {
            1
        };
        for i in self.rows {
            let layer = self.input.kv[i]
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            let seen = self.input.pos[i] + 1;
            // Only positions written are read.
            assert!(seen <= layer.filled, "attention past the KV cache");
            let ld = seen.div_ceil(KEY_BLOCK) * KEY_BLOCK;
            buf.resize(ld * at_once, 0.0);
            let q = &self.input.q[i * dim..(i + 1) * dim];
            let att = &mut self.att[(i - start) * dim..(i - start + 1) * dim];
            // The query heads that share a KV head go through its keys and
            // values together, a few at a time: each key and value is
            // widened once for all of them.
            let mut first = 0;
            while first < c.heads {
                let end = (first + at_once).min((first / group + 1) * group);
                let heads = Heads {
                    kv: layer.head(first / group),
                    q: &q[first * hd..end * hd],
                    seen,
                    scores: &mut buf[..],
                    ld,
                    scale,
                    att: &mut att[first * hd..end * hd],
                };
                match end - first {
                    3 => heads.attend::<3>(),
                    2 => heads.attend::<2>(),
                    _ => heads.attend::<1>(),
                }
                first = end;
            }
        }
    }
}

/// Query heads at most attended together with AVX-512 (SmolLM2 has three
/// a KV head).
const HEADS_AT_ONCE: usize = 3;

/// `G` consecutive query heads of one row that share a KV head.
struct Heads<'a> {
    /// The KV head's keys and values.
    kv: (&'a [u16], &'a [u16]),
    /// The heads' queries, `head_dim` each.
    q: &'a [f32],
    /// Positions attended.
    seen: usize,
    /// Room for `G` rows of scores, `ld` apart.
    scores: &'a mut [f32],
    ld: usize,
    scale: f32,
    /// The heads' outputs, `head_dim` each.
    att: &'a mut [f32],
}

impl Heads<'_> {
    /// Each head's scores, softmax and weighted values. Per head the
    /// arithmetic is what it would be alone (the same sums in the same
    /// order); only the widened keys and values are shared.
    #[inline(always)]
    fn attend<const G: usize>(self) {
        let hd = self.q.len() / G;
        let (keys, values) = self.kv;
        let q: [&[f32]; G] = std::array::from_fn(|g| &self.q[g * hd..(g + 1) * hd]);
        let blocks = self.seen.div_ceil(KEY_BLOCK);
        // Scores, 16 positions at a time, four blocks at once
        // (independent chains of additions).
        let stride = KEY_BLOCK * hd;
        let mut b = 0;
        while b < blocks {
            let n = (blocks - b).min(4);
            score_blocks4(q, keys, b, n, stride, self.scores, self.ld, self.scale);
            b += n;
        }
        for g in 0..G {
            crate::mathf::softmax(&mut self.scores[g * self.ld..g * self.ld + self.seen]);
        }
        let p: [&[f32]; G] =
            std::array::from_fn(|g| &self.scores[g * self.ld..g * self.ld + self.seen]);
        let values = &values[..self.seen * hd];
        if hd == 64 {
            weigh64(p, values, self.att);
        } else {
            for (g, out) in self.att.chunks_exact_mut(hd).enumerate() {
                weigh(p[g], values, out);
            }
        }
    }
}

/// `x` rounded to bfloat16 (to nearest, ties to even; NaN stays NaN).
pub(crate) fn to_bf16(x: f32) -> u16 {
    if x.is_nan() {
        return 0x7fc0;
    }
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// A bfloat16 widened to f32 (exact).
#[inline(always)]
pub(crate) fn from_bf16(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// `k` widened to f32.
#[inline(always)]
fn widen16(k: &[u16]) -> [f32; 16] {
    let k: &[u16; 16] = k.try_into().unwrap_or(&[0; 16]);
    let mut w = [0f32; 16];
    for (w, k) in w.iter_mut().zip(k) {
        *w = from_bf16(*k);
    }
    w
}

/// `s += q * k`, lane by lane (one vector operation each on AVX-512).
#[inline(always)]
fn axpy16(s: &mut [f32; 16], q: f32, k: &[f32; 16]) {
    for (s, k) in s.iter_mut().zip(k) {
        *s += q * k;
    }
}

/// `G` queries' scores against key blocks `b..b + n` (`n` at most 4; each
/// block `stride` elements: a head's rows of 16 positions), scaled, into
/// `out[g * ld + 16 * b..]` for query `g`: four independent chains of
/// additions a query (a short group repeats its last block, and drops the
/// copies); each key row widened once for every query.
///
/// Indexed loops on purpose: written with iterators over the queries and
/// accumulators, the compiler kept the sums in memory and moved them with
/// gathers and scatters (attention took 7× as long).
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
#[inline(always)]
fn score_blocks4<const G: usize>(
    q: [&[f32]; G],
    keys: &[u16],
    b: usize,
    n: usize,
    stride: usize,
    out: &mut [f32],
    ld: usize,
    scale: f32,
) {
    let hd = q[0].len();
    let len = hd * KEY_BLOCK;
    let at = |j: usize| (b + j.min(n.max(1) - 1)) * stride;
    let k: [&[u16]; 4] = std::array::from_fn(|j| &keys[at(j)..at(j) + len]);
    let mut s = [[[0f32; 16]; 4]; G];
    for d in 0..hd {
        let r = d * KEY_BLOCK..(d + 1) * KEY_BLOCK;
        let kw = [
            widen16(&k[0][r.clone()]),
            widen16(&k[1][r.clone()]),
            widen16(&k[2][r.clone()]),
            widen16(&k[3][r]),
        ];
        let qd: [f32; G] = std::array::from_fn(|g| q[g][d]);
        for g in 0..G {
            for j in 0..4 {
                axpy16(&mut s[g][j], qd[g], &kw[j]);
            }
        }
    }
    for (g, s) in s.iter().enumerate() {
        for (j, s) in s.iter().enumerate().take(n) {
            let o = g * ld + (b + j) * KEY_BLOCK;
            for (o, s) in out[o..o + KEY_BLOCK].iter_mut().zip(s) {
                *o = s * scale;
            }
        }
    }
}

/// `out_g = sum_t p_g[t] * values[t]` over one head's 64 elements
/// (`values`: 64 a position) for `G` heads (`out`: 64 each), the position
/// order kept per element; four independent chains a head, each value
/// widened once for every head (indexed loops, as in [`score_blocks4`]).
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn weigh64<const G: usize>(p: [&[f32]; G], values: &[u16], out: &mut [f32]) {
    let mut a = [[[0f32; 16]; 4]; G];
    for (t, v) in values.chunks_exact(64).enumerate() {
        let vw = [
            widen16(&v[..16]),
            widen16(&v[16..32]),
            widen16(&v[32..48]),
            widen16(&v[48..]),
        ];
        let pt: [f32; G] = std::array::from_fn(|g| p[g][t]);
        for g in 0..G {
            for k in 0..4 {
                axpy16(&mut a[g][k], pt[g], &vw[k]);
            }
        }
    }
    for (o, a) in out.chunks_exact_mut(64).zip(&a) {
        for (o, a) in o.chunks_exact_mut(16).zip(a) {
            o.copy_from_slice(a);
        }
    }
}

/// The same for any head size (`values`: the head's `out.len()` a
/// position), 16 elements at a time (then one by one).
#[inline(always)]
fn weigh(p: &[f32], values: &[u16], out: &mut [f32]) {
    let hd = out.len();
    let (chunks, rest) = out.as_chunks_mut::<16>();
    for (ci, chunk) in chunks.iter_mut().enumerate() {
        let mut acc = [0f32; 16];
        for (p, v) in p.iter().zip(values.chunks_exact(hd)) {
            axpy16(&mut acc, *p, &widen16(&v[16 * ci..16 * (ci + 1)]));
        }
        *chunk = acc;
    }
    let d0 = 16 * chunks.len();
    for (d, o) in rest.iter_mut().enumerate() {
        let mut acc = 0f32;
        for (p, v) in p.iter().zip(values.chunks_exact(hd)) {
            acc += p * from_bf16(v[d0 + d]);
        }
        *o = acc;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::testdata::pseudo;

    /// What the KV cap counts is what a full cache holds: filling every
    /// position (a count that is not a multiple of the key block) never
    /// grows a layer past its first allocation, whose bytes are `bytes`.
    #[test]
    fn a_full_cache_holds_what_its_reservation_counts() {
        let cfg = Config {
            dim: 64,
            hidden: 0,
            layers: 3,
            heads: 2,
            kv_heads: 1,
            head_dim: 32,
            vocab: 0,
            context: 64,
            rms_eps: 1e-5,
            rope_base: 10_000.0,
        };
        let tokens = 37;
        let mut cache = KvCache::new(&cfg, tokens);
        let caps = |c: &KvCache| -> Vec<(usize, usize)> {
            (0..cfg.layers)
                .map(|l| {
                    let g = c.layer(l).read().unwrap();
                    (
                        g.keys.iter().map(Vec::capacity).sum::<usize>(),
                        g.values.iter().map(Vec::capacity).sum::<usize>(),
                    )
                })
                .collect()
        };
        let before = caps(&cache);
        let kv = vec![0.25f32; 32];
        for pos in 0..tokens {
            for l in 0..cfg.layers {
                cache.push(l, pos, &kv, &kv);
            }
        }
        assert_eq!(caps(&cache), before, "a layer grew past its reservation");
        let held: usize = before.iter().map(|(k, v)| (k + v) * 2).sum();
        assert_eq!(held, KvCache::bytes(&cfg, tokens));
        let full = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            cache.push(0, tokens, &kv, &kv);
        }));
        assert!(full.is_err(), "a position past the reservation is refused");
        // A key or value short of a head is refused too, not half written.
        let mut fresh = KvCache::new(&cfg, tokens);
        let short = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            fresh.push(0, 0, &kv[..16], &kv[..16]);
        }));
        assert!(short.is_err(), "a short key is refused");
    }

    /// The blocked, transposed cache gives textbook attention (softmax of
    /// scaled dot products, weighted values) at positions on both sides
    /// of block boundaries, for head sizes that take the general loops
    /// (20) and the unrolled ones (32, 64), with 1 to 4 query heads a KV
    /// head (attended three, two or one at a time: 4 is three and one).
    #[test]
    fn attention_over_the_blocked_cache_is_softmax_attention() {
        for hd in [20, 32, 64] {
            for group in [1, 2, 3, 4] {
                check_attention(hd, group);
            }
        }
    }

    fn check_attention(hd: usize, group: usize) {
        let heads = 2 * group;
        let cfg = Config {
            dim: heads * hd,
            hidden: 0,
            layers: 2,
            heads,
            kv_heads: 2,
            head_dim: hd,
            vocab: 0,
            context: 128,
            rms_eps: 1e-5,
            rope_base: 10_000.0,
        };
        let (kv_dim, dim) = (2 * hd, heads * hd);
        let tokens = 90;
        // The cache keeps bfloat16: the reference gets the same values.
        let bf = |v: Vec<f32>| -> Vec<f32> { v.iter().map(|x| from_bf16(to_bf16(*x))).collect() };
        let keys = bf(pseudo(tokens * kv_dim, 1));
        let values = bf(pseudo(tokens * kv_dim, 2));
        let mut cache = KvCache::new(&cfg, tokens);
        for t in 0..tokens {
            let (k, v) = (
                &keys[t * kv_dim..(t + 1) * kv_dim],
                &values[t * kv_dim..(t + 1) * kv_dim],
            );
            cache.push(1, t, k, v);
        }
        cache.len = tokens;
        let positions = [0, 14, 15, 16, 17, 31, 32, 40, 63, 64, 79, 89];
        let q = pseudo(positions.len() * dim, 3);
        let input = AttnInput {
            q: q.clone(),
            pos: positions.to_vec(),
            kv: positions
                .iter()
                .map(|_| Arc::clone(cache.layer(1)))
                .collect(),
        };
        // All rows at once, and split in two ranges (as two threads would).
        let mut att = vec![0f32; positions.len() * dim];
        let mut scores = Vec::new();
        crate::quant::vectorized(Attend {
            input: &input,
            rows: 0..positions.len(),
            scores: &mut scores,
            att: &mut att,
            cfg: &cfg,
        });
        let mut split = vec![0f32; positions.len() * dim];
        let (a, b) = split.split_at_mut(5 * dim);
        for (rows, out) in [(0..5, a), (5..positions.len(), b)] {
            crate::quant::vectorized(Attend {
                input: &input,
                rows,
                scores: &mut scores,
                att: out,
                cfg: &cfg,
            });
        }
        assert_eq!(att, split);
        for (i, &pos) in positions.iter().enumerate() {
            for h in 0..cfg.heads {
                let kvh = h / group;
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
                        "group {group} pos {pos} head {h} d {d}: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// bfloat16 rounds to nearest, ties to even, and widens back exactly.
    #[test]
    fn bfloat16_rounds_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        assert_eq!(from_bf16(0x3f80), 1.0);
        // 1 + 2^-8 is a tie between 1 and 1 + 2^-7: to the even one, 1.
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3 * 2^-8 is a tie between 1 + 2^-7 and 1 + 2^-6: even is the latter.
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(to_bf16(-2.5), 0xc020);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        for x in pseudo(1000, 9) {
            let y = from_bf16(to_bf16(x));
            assert!((x - y).abs() <= x.abs() / 256.0, "{x} {y}");
        }
    }
}
