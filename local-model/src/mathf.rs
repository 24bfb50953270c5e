//! Elementwise float functions written so that they vectorize: no
//! branches, no calls into libm (whose `expf` runs one value at a time).

/// `e^x`, within a few ulp of `f32::exp` for `x` in -87..88 (below, the
/// value for -87, about 1.6e-38; above, the value for 88); NaN stays NaN.
/// Cody-Waite range reduction to `r` in [-ln 2 / 2, ln 2 / 2] and Cephes'
/// polynomial for `e^r`; `2^n` is built from its bits.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    // t's low mantissa bits hold n in two's complement (|n| < 2^22).
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n from n's bits (n is in -126..=127 after the clamp: a normal
    // power of two). Integer operations, not `n as i32`, whose saturating
    // conversion the compiler does one lane at a time.
    let n_bits = t.to_bits().wrapping_sub(ROUND.to_bits());
    e * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// SwiGLU's activation in place: `g = silu(g) * u` (`silu(g) = g / (1 +
/// e^-g)`), compiled with the CPU's SIMD features.
pub struct SwiGlu<'a> {
    pub gate: &'a mut [f32],
    pub up: &'a [f32],
}

impl pulp::NullaryFnOnce for SwiGlu<'_> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        for (g, u) in self.gate.iter_mut().zip(self.up) {
            *g = *g / (1.0 + exp(-*g)) * u;
        }
    }
}

/// `x = e^(x - max) / sum` over `x` (softmax), the exponentials computed
/// 16 at a time and summed in 16 lanes.
#[inline(always)]
pub fn softmax(x: &mut [f32]) {
    // The largest, 16 lanes at a time (a NaN is passed over).
    let mut top = [f32::NEG_INFINITY; 16];
    let (chunks, rest) = x.as_chunks::<16>();
    for c in chunks {
        for (m, v) in top.iter_mut().zip(c) {
            *m = if *v > *m { *v } else { *m };
        }
    }
    let max = top
        .iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, v| if *v > m { *v } else { m });
    for s in x.iter_mut() {
        *s = exp(*s - max);
    }
    let mut lanes = [0f32; 16];
    let (chunks, rest) = x.as_chunks::<16>();
    for c in chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += v;
        }
    }
    let sum = lanes.iter().sum::<f32>() + rest.iter().sum::<f32>();
    for s in x.iter_mut() {
        *s /= sum;
    }
}

/// The index of the largest value under [`f32::total_cmp`], the last of
/// equals (what `iter().max_by(total_cmp)` gives; 0 for no values),
/// compiled with the CPU's SIMD features: the greedy choice over a
/// vocabulary's logits, once a sequence a step. The values' total-order
/// keys are integers, whose maximum vectorizes (the float comparison,
/// with its index, does not): the largest key of each chunk, then the
/// last chunk holding the overall largest searched from its end.
pub struct Argmax<'a>(pub &'a [f32]);

/// Values per chunk of [`Argmax`]'s first pass.
const ARGMAX_CHUNK: usize = 512;

/// `x`'s key in `total_cmp`'s order (as the standard library computes it).
#[inline(always)]
fn total_key(x: f32) -> i32 {
    let b = x.to_bits().cast_signed();
    b ^ (((b >> 31).cast_unsigned() >> 1).cast_signed())
}

impl pulp::NullaryFnOnce for Argmax<'_> {
    type Output = usize;

    #[inline(always)]
    fn call(self) -> usize {
        let (mut best, mut at) = (i32::MIN, 0);
        for (c, chunk) in self.0.chunks(ARGMAX_CHUNK).enumerate() {
            let top = chunk.iter().fold(i32::MIN, |m, x| m.max(total_key(*x)));
            if top >= best {
                (best, at) = (top, c);
            }
        }
        let start = at * ARGMAX_CHUNK;
        let chunk = self.0.get(start..).unwrap_or_default();
        let chunk = &chunk[..chunk.len().min(ARGMAX_CHUNK)];
        start
            + chunk
                .iter()
                .rposition(|x| total_key(*x) == best)
                .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same index as `max_by(total_cmp)`, the last of equal maxima,
    /// across chunk edges, with infinities, zeros of both signs and NaNs.
    #[test]
    fn argmax_is_the_last_largest_under_total_order() {
        let want = |x: &[f32]| {
            x.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(i, _)| i)
        };
        let got = |x: &[f32]| crate::quant::vectorized(Argmax(x));
        assert_eq!(got(&[]), 0);
        let mut seed = 7u32;
        for len in [1, 2, 15, 16, 17, 511, 512, 513, 1024, 1500, 49_152] {
            let mut x: Vec<f32> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    ((seed >> 8) % 1000) as f32 / 10.0 - 50.0
                })
                .collect();
            assert_eq!(got(&x), want(&x), "len {len}");
            // Ties: the largest repeated, in the same chunk and across one.
            let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) + 1.0;
            for at in [0, len / 3, len - 1] {
                x[at] = m;
                assert_eq!(got(&x), want(&x), "len {len} tie at {at}");
            }
            for special in [
                f32::INFINITY,
                -0.0,
                0.0,
                f32::NAN,
                -f32::NAN,
                f32::NEG_INFINITY,
            ] {
                x[len / 2] = special;
                assert_eq!(got(&x), want(&x), "len {len} with {special}");
            }
        }
        let all_neg_inf = [f32::NEG_INFINITY; 600];
        assert_eq!(got(&all_neg_inf), want(&all_neg_inf));
    }

    /// Within 4 ulp (relative 5e-7) of libm's `expf` across the range,
    /// clamped outside it, and NaN through.
    #[test]
    fn exp_is_close_to_libm() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_7;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-1000.0), exp(-87.0));
        assert!(exp(-1000.0) > 0.0 && exp(-1000.0) < 1e-37);
        assert_eq!(exp(1000.0), exp(88.0));
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let mut x: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 9.0).collect();
        let orig = x.clone();
        softmax(&mut x);
        let sum: f32 = x.iter().sum();
        assert!((sum - 1.0).abs() < 1e-5, "{sum}");
        let max = orig.iter().fold(f32::NEG_INFINITY, |m, s| m.max(*s));
        let denom: f64 = orig.iter().map(|v| f64::from(v - max).exp()).sum();
        for (p, v) in x.iter().zip(&orig) {
            let want = f64::from(v - max).exp() / denom;
            assert!((f64::from(*p) - want).abs() < 1e-6, "{p} vs {want}");
        }
    }
}
