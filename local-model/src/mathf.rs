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

#[cfg(test)]
mod tests {
    use super::*;

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
