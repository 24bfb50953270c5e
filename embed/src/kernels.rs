//! The f32 matrix product that dominates the forward pass, with an
//! AVX2+FMA kernel chosen at run time.
//!
//! Like local-model's kernels (`local-model/src/quant.rs`): on x86-64 the
//! AVX2+FMA path runs when the CPU has it (checked through `pulp`, with no
//! `unsafe` here); elsewhere a portable loop over 8-lane arrays does the same
//! arithmetic, which the compiler vectorises for the baseline target.
//!
//! Both layouts are row-major and both operands are walked along their rows
//! (`x · wᵀ`, the PyTorch `Linear` layout), so no weight is transposed. The
//! output is computed in tiles of 4 rows of `x` by 3 rows of `w` (12 vector
//! accumulators), over blocks of `w` rows that stay in L2 while every row of
//! `x` passes over them.

/// Rows of `w` per cache block (64 rows of 1536 floats: 384 KiB).
const W_BLOCK: usize = 64;

/// `out[i][j] = x[i] · w[j] + bias[j]`, where `x` is `n × k`, `w` is
/// `m × k` and `out` is `n × m`, all row-major (`n`, `m` taken from the
/// lengths). The caller guarantees the shapes agree.
pub fn matmul_t(x: &[f32], w: &[f32], k: usize, bias: Option<&[f32]>, out: &mut [f32]) {
    debug_assert!(k > 0 && x.len().is_multiple_of(k) && w.len().is_multiple_of(k));
    debug_assert_eq!(out.len(), (x.len() / k) * (w.len() / k));
    imp::matmul_t(x, w, k, out);
    if let Some(b) = bias {
        for row in out.chunks_exact_mut(b.len()) {
            for (o, b) in row.iter_mut().zip(b) {
                *o += b;
            }
        }
    }
}

/// `e^x` for each element, in place (the softmax's exponentials).
pub fn exp_in_place(v: &mut [f32]) {
    imp::elementwise(v, exp_portable);
}

/// GELU (the erf form BERT uses) for each element, in place.
pub fn gelu_in_place(v: &mut [f32]) {
    imp::elementwise(v, gelu_portable);
}

/// `e^x` without branches or calls, so a loop of it vectorises: Cephes'
/// `expf` (range reduction by ln 2, degree-6 polynomial, the power of two
/// put in the exponent bits); relative error about 2e-7, inputs clamped to
/// the range where the result is a normal float.
#[inline(always)]
pub(crate) fn exp_portable(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_2e-4f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `x/2 · (1 + erf(x/√2))`, erf by Abramowitz & Stegun 7.1.26 (absolute
/// error under 1.5e-7), branch-free like [`exp_portable`].
#[inline(always)]
pub(crate) fn gelu_portable(x: f32) -> f32 {
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let a = z.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    let erf = (1.0 - poly * exp_portable(-a * a)).copysign(z);
    0.5 * x * (1.0 + erf)
}

/// A kernel computing an `R × C` tile of dot products.
trait Tile: Copy {
    fn tile<const R: usize, const C: usize>(
        self,
        xs: [&[f32]; R],
        ws: [&[f32]; C],
    ) -> [[f32; C]; R];
}

/// The blocked loops over tiles, shared by both kernels.
#[inline(always)]
fn drive<T: Tile>(t: T, x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
    let n = x.len() / k;
    let m = w.len() / k;
    let xrow = |i: usize| &x[i * k..(i + 1) * k];
    let wrow = |j: usize| &w[j * k..(j + 1) * k];
    let mut j0 = 0;
    while j0 < m {
        let j1 = (j0 + W_BLOCK).min(m);
        let mut i = 0;
        while i + 4 <= n {
            let xs = [xrow(i), xrow(i + 1), xrow(i + 2), xrow(i + 3)];
            let mut j = j0;
            while j + 3 <= j1 {
                let t = t.tile(xs, [wrow(j), wrow(j + 1), wrow(j + 2)]);
                for (r, tr) in t.iter().enumerate() {
                    out[(i + r) * m + j..(i + r) * m + j + 3].copy_from_slice(tr);
                }
                j += 3;
            }
            while j < j1 {
                let t = t.tile(xs, [wrow(j)]);
                for (r, tr) in t.iter().enumerate() {
                    out[(i + r) * m + j] = tr[0];
                }
                j += 1;
            }
            i += 4;
        }
        while i < n {
            let xs = [xrow(i)];
            let mut j = j0;
            while j + 3 <= j1 {
                let t = t.tile(xs, [wrow(j), wrow(j + 1), wrow(j + 2)]);
                out[i * m + j..i * m + j + 3].copy_from_slice(&t[0]);
                j += 3;
            }
            while j < j1 {
                out[i * m + j] = t.tile(xs, [wrow(j)])[0][0];
                j += 1;
            }
            i += 1;
        }
        j0 = j1;
    }
}

/// The portable kernel: 8 lanes per accumulator, as the SIMD one.
#[derive(Clone, Copy)]
struct Portable;

impl Tile for Portable {
    #[inline(always)]
    fn tile<const R: usize, const C: usize>(
        self,
        xs: [&[f32]; R],
        ws: [&[f32]; C],
    ) -> [[f32; C]; R] {
        let k = xs[0].len();
        let body = k / 8 * 8;
        let mut acc = [[[0f32; 8]; C]; R];
        let mut p = 0;
        while p < body {
            for r in 0..R {
                let xv = &xs[r][p..p + 8];
                for c in 0..C {
                    let wv = &ws[c][p..p + 8];
                    for l in 0..8 {
                        acc[r][c][l] += xv[l] * wv[l];
                    }
                }
            }
            p += 8;
        }
        let mut out = [[0f32; C]; R];
        for r in 0..R {
            for c in 0..C {
                let a = acc[r][c];
                let mut s = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
                for q in body..k {
                    s += xs[r][q] * ws[c][q];
                }
                out[r][c] = s;
            }
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use super::{drive, Portable, Tile};
    use pulp::bytemuck::cast;
    use pulp::x86::V3;
    use std::arch::x86_64::__m256;

    #[derive(Clone, Copy)]
    struct Avx2(V3);

    #[inline(always)]
    fn hsum(simd: V3, v: __m256) -> f32 {
        let hi = simd.avx._mm256_extractf128_ps::<1>(v);
        let lo = simd.avx._mm256_castps256_ps128(v);
        let s = simd.sse._mm_add_ps(hi, lo);
        let s = simd.sse._mm_add_ps(s, simd.sse._mm_movehl_ps(s, s));
        let s = simd.sse._mm_add_ss(s, simd.sse3._mm_movehdup_ps(s));
        simd.sse._mm_cvtss_f32(s)
    }

    impl Tile for Avx2 {
        #[inline(always)]
        fn tile<const R: usize, const C: usize>(
            self,
            xs: [&[f32]; R],
            ws: [&[f32]; C],
        ) -> [[f32; C]; R] {
            let simd = self.0;
            let k = xs[0].len();
            let xa = xs.map(|x| pulp::as_arrays::<8, f32>(x).0);
            let wa = ws.map(|w| pulp::as_arrays::<8, f32>(w).0);
            let blocks = k / 8;
            let mut acc = [[simd.avx._mm256_setzero_ps(); C]; R];
            for p in 0..blocks {
                let wv: [__m256; C] = std::array::from_fn(|c| cast(wa[c][p]));
                for r in 0..R {
                    let xv: __m256 = cast(xa[r][p]);
                    for c in 0..C {
                        acc[r][c] = simd.fma._mm256_fmadd_ps(xv, wv[c], acc[r][c]);
                    }
                }
            }
            let mut out = [[0f32; C]; R];
            for r in 0..R {
                for c in 0..C {
                    let mut s = hsum(simd, acc[r][c]);
                    for q in blocks * 8..k {
                        s += xs[r][q] * ws[c][q];
                    }
                    out[r][c] = s;
                }
            }
            out
        }
    }

    pub fn matmul_t(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
        match V3::try_new() {
            Some(simd) => simd.vectorize(move || drive(Avx2(simd), x, w, k, out)),
            None => drive(Portable, x, w, k, out),
        }
    }

    /// `f` over `v`, the loop compiled with AVX2+FMA where the CPU has
    /// them (the functions are branch-free, so it vectorises).
    pub fn elementwise<F: Fn(f32) -> f32 + Copy>(v: &mut [f32], f: F) {
        #[inline(always)]
        fn each<F: Fn(f32) -> f32>(v: &mut [f32], f: F) {
            for x in v {
                *x = f(*x);
            }
        }
        match V3::try_new() {
            Some(simd) => simd.vectorize(move || each(v, f)),
            None => each(v, f),
        }
    }

    /// The portable kernel even where AVX2 is there (for the tests).
    #[cfg(test)]
    pub fn matmul_t_portable(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
        drive(Portable, x, w, k, out)
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod imp {
    use super::{drive, Portable};

    pub fn matmul_t(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
        drive(Portable, x, w, k, out)
    }

    pub fn elementwise<F: Fn(f32) -> f32>(v: &mut [f32], f: F) {
        for x in v {
            *x = f(*x);
        }
    }

    #[cfg(test)]
    pub fn matmul_t_portable(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
        drive(Portable, x, w, k, out)
    }
}

/// Whether the SIMD kernel runs on this CPU.
pub fn simd_kernels() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if pulp::x86::V3::try_new().is_some() {
            return "avx2+fma";
        }
    }
    "portable"
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

    /// The fast exp and GELU against the f64 library functions (erf by
    /// its series: enough terms for |x| <= 6).
    #[test]
    fn exp_and_gelu_are_accurate() {
        let erf = |x: f64| {
            let (mut term, mut sum) = (x, x);
            for n in 1..200 {
                term *= -x * x / n as f64;
                sum += term / (2 * n + 1) as f64;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        };
        let mut xs: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.003).collect();
        let mut e = xs.clone();
        exp_in_place(&mut e);
        for (x, e) in xs.iter().zip(&e) {
            let want = f64::from(*x).exp();
            assert!(
                ((f64::from(*e) - want) / want).abs() < 5e-7,
                "exp({x}) = {e}"
            );
        }
        let mut wide = vec![-100.0f32, -88.0, 89.0, 100.0];
        exp_in_place(&mut wide);
        assert!(wide.iter().all(|v| v.is_finite() && *v >= 0.0), "{wide:?}");
        let mut g = xs.clone();
        gelu_in_place(&mut g);
        for (x, g) in xs.iter().zip(&g) {
            let x = f64::from(*x);
            let want = 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2));
            assert!(
                (f64::from(*g) - want).abs() < 1e-6,
                "gelu({x}) = {g}, want {want}"
            );
        }
        xs.clear();
    }

    /// Every tile shape and remainder (n, m not multiples of 4 and 3, k not
    /// a multiple of 8, m past one cache block) against the plain triple
    /// loop in f64, for the dispatched and the portable kernel.
    #[test]
    fn matmul_matches_the_naive_product() {
        for &(n, m, k) in &[(1, 1, 1), (5, 7, 13), (9, 70, 40), (4, 3, 8), (2, 130, 33)] {
            let x = pseudo(n * k, 3);
            let w = pseudo(m * k, 11);
            let bias = pseudo(m, 17);
            let mut want = vec![0f32; n * m];
            for i in 0..n {
                for j in 0..m {
                    let s: f64 = (0..k)
                        .map(|q| f64::from(x[i * k + q]) * f64::from(w[j * k + q]))
                        .sum();
                    want[i * m + j] = s as f32 + bias[j];
                }
            }
            let mut fast = vec![f32::NAN; n * m];
            matmul_t(&x, &w, k, Some(&bias), &mut fast);
            let mut portable = vec![f32::NAN; n * m];
            imp::matmul_t_portable(&x, &w, k, &mut portable);
            for (p, b) in portable.iter_mut().zip(bias.iter().cycle()) {
                *p += b;
            }
            for (idx, ((f, p), e)) in fast.iter().zip(&portable).zip(&want).enumerate() {
                assert!((f - e).abs() < 1e-5, "{n}x{m}x{k} [{idx}]: {f} vs {e}");
                assert!((p - e).abs() < 1e-5, "{n}x{m}x{k} [{idx}]: {p} vs {e}");
            }
        }
    }
}
