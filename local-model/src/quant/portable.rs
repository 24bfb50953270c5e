//! The portable loops: the products and the activations' quantization in
//! plain Rust, for CPUs without the SIMD kernels, and the kernels'
//! reference in tests (the same sums block by block; the kernels' float
//! rounding can differ in the last bits).

use super::{BlockAct, BlockQ4_1, BlockQ8_0, BLOCK};

/// The portable product over a range of rows (same layout as
/// [`super::QMatrix::matmul_rows`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul_portable<B>(
    w: &[B],
    kb: usize,
    rows: std::ops::Range<usize>,
    act: &[BlockAct],
    n: usize,
    out: &mut [f32],
    ld: usize,
    dot: impl Fn(&[B], &[BlockAct]) -> f32,
) {
    for r in rows.clone() {
        let row = &w[r * kb..(r + 1) * kb];
        for c in 0..n {
            out[c * ld + r - rows.start] = dot(row, &act[c * kb..(c + 1) * kb]);
        }
    }
}

#[inline(always)]
pub(super) fn quantize_portable(x: &[f32], out: &mut [BlockAct]) {
    for (blk, xs) in out.iter_mut().zip(x.chunks_exact(BLOCK)) {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in blk.qs.iter_mut().zip(xs) {
            let r = (v * id).round() as i32;
            *q = r.clamp(-127, 127) as i8;
            sum += i32::from(*q);
        }
        blk.d = d;
        blk.s = d * sum as f32;
    }
}

#[inline(always)]
pub(super) fn dot_q4_1_portable(w: &[BlockQ4_1], act: &[BlockAct]) -> f32 {
    let mut sum = 0f32;
    for (b, a) in w.iter().zip(act) {
        let mut s = 0i32;
        for j in 0..16 {
            s += i32::from(b.qs[j] & 0x0f) * i32::from(a.qs[j]);
            s += i32::from(b.qs[j] >> 4) * i32::from(a.qs[j + 16]);
        }
        sum += b.d * a.d * s as f32 + b.m * a.s;
    }
    sum
}

#[inline(always)]
pub(super) fn dot_q8_0_portable(w: &[BlockQ8_0], act: &[BlockAct]) -> f32 {
    let mut sum = 0f32;
    for (b, a) in w.iter().zip(act) {
        let mut s = 0i32;
        for (x, y) in b.qs.iter().zip(a.qs) {
            s += i32::from(*x) * i32::from(y);
        }
        sum += b.d * a.d * s as f32;
    }
    sum
}
