//! The AVX2+FMA kernels (x86-64), picked at run time when the CPU has
//! them; the portable loops of the parent module otherwise.

use super::avx512;
use super::vnni::Vnni;
use super::{
    dot_q4_1_portable, dot_q8_0_portable, matmul_portable, quantize_portable, BlockAct, BlockQ4_1,
    BlockQ8_0,
};
use pulp::bytemuck::cast;
use pulp::x86::{V3, V4};
use std::arch::x86_64::{__m128, __m128i, __m256, __m256i};
use std::ops::Range;
use std::sync::OnceLock;

#[inline(always)]
fn hsum(simd: V3, v: __m256) -> f32 {
    let hi = simd.avx._mm256_extractf128_ps::<1>(v);
    let lo = simd.avx._mm256_castps256_ps128(v);
    let s = simd.sse._mm_add_ps(hi, lo);
    let s = simd.sse._mm_add_ps(s, simd.sse._mm_movehl_ps(s, s));
    let s = simd.sse._mm_add_ss(s, simd.sse3._mm_movehdup_ps(s));
    simd.sse._mm_cvtss_f32(s)
}

/// `a * b + c` rounded once, as one lane of `_mm_fmadd_ps` computes it
/// (`f32::mul_add` may become a slow library call).
#[inline(always)]
fn fma1(simd: V3, a: f32, b: f32, c: f32) -> f32 {
    let r = simd.fma._mm_fmadd_ss(
        simd.sse._mm_set_ss(a),
        simd.sse._mm_set_ss(b),
        simd.sse._mm_set_ss(c),
    );
    simd.sse._mm_cvtss_f32(r)
}

/// 32 unsigned nibbles of a Q4_1 block, in element order.
#[inline(always)]
fn nibbles(simd: V3, qs: [u8; 16]) -> __m256i {
    let raw: __m128i = cast(qs);
    let hi = simd.sse2._mm_srli_epi16::<4>(raw);
    let both = simd.avx._mm256_set_m128i(hi, raw);
    simd.avx2
        ._mm256_and_si256(both, simd.avx._mm256_set1_epi8(0x0f))
}

/// An R-row by C-column tile: each weight block is unpacked once for
/// the C columns and each activation block loaded once for the R rows;
/// the R*C accumulations are independent. Per (row, column) the
/// arithmetic is the same for every tile shape.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn q4_1_tile<const R: usize, const C: usize>(
    simd: V3,
    w: [&[BlockQ4_1]; R],
    a: [&[BlockAct]; C],
) -> [[f32; C]; R] {
    let ones = simd.avx._mm256_set1_epi16(1);
    let mut acc = [[simd.avx._mm256_setzero_ps(); C]; R];
    let mut macc = [[0f32; C]; R];
    let kb = a[0].len();
    for i in 0..kb {
        let ys: [__m256i; C] = std::array::from_fn(|c| cast(a[c][i].qs));
        for r in 0..R {
            let b = &w[r][i];
            let x = nibbles(simd, b.qs);
            for c in 0..C {
                let p16 = simd.avx2._mm256_maddubs_epi16(x, ys[c]);
                let p32 = simd.avx2._mm256_madd_epi16(p16, ones);
                let f = simd.avx._mm256_cvtepi32_ps(p32);
                acc[r][c] = simd.fma._mm256_fmadd_ps(
                    simd.avx._mm256_set1_ps(b.d * a[c][i].d),
                    f,
                    acc[r][c],
                );
                macc[r][c] = fma1(simd, b.m, a[c][i].s, macc[r][c]);
            }
        }
    }
    std::array::from_fn(|r| std::array::from_fn(|c| hsum(simd, acc[r][c]) + macc[r][c]))
}

#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn q8_0_tile<const R: usize, const C: usize>(
    simd: V3,
    w: [&[BlockQ8_0]; R],
    a: [&[BlockAct]; C],
) -> [[f32; C]; R] {
    let ones = simd.avx._mm256_set1_epi16(1);
    let mut acc = [[simd.avx._mm256_setzero_ps(); C]; R];
    let kb = a[0].len();
    for i in 0..kb {
        let ys: [__m256i; C] = std::array::from_fn(|c| cast(a[c][i].qs));
        for r in 0..R {
            let b = &w[r][i];
            let x: __m256i = cast(b.qs);
            // maddubs wants unsigned × signed: move x's sign onto y.
            let ax = simd.avx2._mm256_sign_epi8(x, x);
            for c in 0..C {
                let sy = simd.avx2._mm256_sign_epi8(ys[c], x);
                let p16 = simd.avx2._mm256_maddubs_epi16(ax, sy);
                let p32 = simd.avx2._mm256_madd_epi16(p16, ones);
                let f = simd.avx._mm256_cvtepi32_ps(p32);
                acc[r][c] = simd.fma._mm256_fmadd_ps(
                    simd.avx._mm256_set1_ps(b.d * a[c][i].d),
                    f,
                    acc[r][c],
                );
            }
        }
    }
    std::array::from_fn(|r| std::array::from_fn(|c| hsum(simd, acc[r][c])))
}

/// Lane `c` of `v` in all eight lanes.
#[inline(always)]
fn lane(simd: V3, v: __m128, c: i32) -> __m256 {
    simd.avx2._mm256_permutevar8x32_ps(
        simd.avx._mm256_castps128_ps256(v),
        simd.avx._mm256_set1_epi32(c),
    )
}

/// One row by four columns, the batched workhorse: the row's block is
/// unpacked once for the four columns, and the four columns' scales
/// (`ad`, `as_`: block `i` of columns c..c+4, laid out together) are
/// multiplied by the row's in one vector operation, so the per-pair
/// work is the integer dot product, its conversion and one FMA. Per
/// (row, column) the arithmetic equals the other tiles'.
#[inline(always)]
fn q4_1_row4(
    simd: V3,
    w: &[BlockQ4_1],
    a: [&[BlockAct]; 4],
    ad: &[[f32; 4]],
    as_: &[[f32; 4]],
) -> [f32; 4] {
    let ones = simd.avx._mm256_set1_epi16(1);
    let mut acc = [simd.avx._mm256_setzero_ps(); 4];
    let mut macc = simd.sse._mm_setzero_ps();
    for (i, b) in w.iter().enumerate() {
        let x = nibbles(simd, b.qs);
        let sc = simd.sse._mm_mul_ps(simd.sse._mm_set1_ps(b.d), cast(ad[i]));
        macc = simd
            .fma
            ._mm_fmadd_ps(simd.sse._mm_set1_ps(b.m), cast(as_[i]), macc);
        for (c, acc) in acc.iter_mut().enumerate() {
            let y: __m256i = cast(a[c][i].qs);
            let p16 = simd.avx2._mm256_maddubs_epi16(x, y);
            let p32 = simd.avx2._mm256_madd_epi16(p16, ones);
            let f = simd.avx._mm256_cvtepi32_ps(p32);
            *acc = simd.fma._mm256_fmadd_ps(lane(simd, sc, c as i32), f, *acc);
        }
    }
    let m: [f32; 4] = cast(macc);
    std::array::from_fn(|c| hsum(simd, acc[c]) + m[c])
}

#[inline(always)]
fn q8_0_row4(
    simd: V3,
    w: &[BlockQ8_0],
    a: [&[BlockAct]; 4],
    ad: &[[f32; 4]],
    _as: &[[f32; 4]],
) -> [f32; 4] {
    let ones = simd.avx._mm256_set1_epi16(1);
    let mut acc = [simd.avx._mm256_setzero_ps(); 4];
    for (i, b) in w.iter().enumerate() {
        let x: __m256i = cast(b.qs);
        let ax = simd.avx2._mm256_sign_epi8(x, x);
        let sc = simd.sse._mm_mul_ps(simd.sse._mm_set1_ps(b.d), cast(ad[i]));
        for (c, acc) in acc.iter_mut().enumerate() {
            let sy = simd.avx2._mm256_sign_epi8(cast(a[c][i].qs), x);
            let p16 = simd.avx2._mm256_maddubs_epi16(ax, sy);
            let p32 = simd.avx2._mm256_madd_epi16(p16, ones);
            let f = simd.avx._mm256_cvtepi32_ps(p32);
            *acc = simd.fma._mm256_fmadd_ps(lane(simd, sc, c as i32), f, *acc);
        }
    }
    std::array::from_fn(|c| hsum(simd, acc[c]))
}

/// Rows ahead whose weights a product asks the cache for.
const PREFETCH: usize = 8;

/// Tiles a row range: columns four at a time as 1x4 tiles (their
/// scales gathered once per call), the remaining columns one by one as
/// 4x1 tiles, leftover rows as 1x1 tiles.
macro_rules! tiled {
    ($name:ident, $block:ty, $tile:ident, $row4:ident) => {
        #[inline(always)]
        #[allow(clippy::too_many_arguments)]
        fn $name(
            simd: V3,
            w: &[$block],
            kb: usize,
            rows: Range<usize>,
            act: &[BlockAct],
            n: usize,
            out: &mut [f32],
            ld: usize,
        ) {
            let row = |r: usize| &w[r * kb..(r + 1) * kb];
            let col = |c: usize| &act[c * kb..(c + 1) * kb];
            let row_bytes = kb * std::mem::size_of::<$block>();
            // The weights of row `r`, into the cache ahead of use (a hint:
            // past the end it does nothing).
            let prefetch = |r: usize| {
                let at = w.as_ptr().wrapping_add(r * kb).cast::<i8>();
                for line in (0..row_bytes).step_by(64) {
                    simd.sse._mm_prefetch::<3>(at.wrapping_add(line));
                }
            };
            let r0 = rows.start;
            let groups = n / 4;
            // Scales and sums of four columns' block i side by side.
            let mut ad = vec![[0f32; 4]; groups * kb];
            let mut as_ = vec![[0f32; 4]; groups * kb];
            for g in 0..groups {
                for i in 0..kb {
                    for j in 0..4 {
                        let blk = &act[(4 * g + j) * kb + i];
                        ad[g * kb + i][j] = blk.d;
                        as_[g * kb + i][j] = blk.s;
                    }
                }
            }
            for r in rows.clone() {
                if groups > 0 {
                    prefetch(r + PREFETCH);
                }
                for g in 0..groups {
                    let c = 4 * g;
                    let cols = [col(c), col(c + 1), col(c + 2), col(c + 3)];
                    let sc = &ad[g * kb..(g + 1) * kb];
                    let sm = &as_[g * kb..(g + 1) * kb];
                    let t = $row4(simd, row(r), cols, sc, sm);
                    for (dc, v) in t.iter().enumerate() {
                        out[(c + dc) * ld + r - r0] = *v;
                    }
                }
            }
            let mut r = rows.start;
            while r + 4 <= rows.end {
                if groups == 0 {
                    for dr in 0..4 {
                        prefetch(r + dr + PREFETCH);
                    }
                }
                for c in 4 * groups..n {
                    let t =
                        $tile::<4, 1>(simd, [row(r), row(r + 1), row(r + 2), row(r + 3)], [col(c)]);
                    for (dr, tr) in t.iter().enumerate() {
                        out[c * ld + r + dr - r0] = tr[0];
                    }
                }
                r += 4;
            }
            while r < rows.end {
                for c in 4 * groups..n {
                    out[c * ld + r - r0] = $tile::<1, 1>(simd, [row(r)], [col(c)])[0][0];
                }
                r += 1;
            }
        }
    };
}
tiled!(matmul_q4_1_v3, BlockQ4_1, q4_1_tile, q4_1_row4);

/// A product to run with the CPU's features enabled. Unlike a closure,
/// its `call` is forced inline into pulp's `target_feature` function
/// (down to the kernel, chosen statically by `K`), so the kernels and
/// their intrinsics are compiled with AVX2 however large they grow.
struct Product<'a, B, K> {
    simd: V3,
    w: &'a [B],
    kb: usize,
    rows: Range<usize>,
    act: &'a [BlockAct],
    n: usize,
    out: &'a mut [f32],
    ld: usize,
    kernel: K,
}

trait Kernel<B> {
    #[allow(clippy::too_many_arguments)]
    fn run(
        simd: V3,
        w: &[B],
        kb: usize,
        rows: Range<usize>,
        act: &[BlockAct],
        n: usize,
        out: &mut [f32],
        ld: usize,
    );
}

struct Q41;
struct Q80;

impl Kernel<BlockQ4_1> for Q41 {
    #[inline(always)]
    fn run(
        simd: V3,
        w: &[BlockQ4_1],
        kb: usize,
        rows: Range<usize>,
        act: &[BlockAct],
        n: usize,
        out: &mut [f32],
        ld: usize,
    ) {
        matmul_q4_1_v3(simd, w, kb, rows, act, n, out, ld)
    }
}

impl Kernel<BlockQ8_0> for Q80 {
    #[inline(always)]
    fn run(
        simd: V3,
        w: &[BlockQ8_0],
        kb: usize,
        rows: Range<usize>,
        act: &[BlockAct],
        n: usize,
        out: &mut [f32],
        ld: usize,
    ) {
        matmul_q8_0_v3(simd, w, kb, rows, act, n, out, ld)
    }
}

impl<B, K: Kernel<B>> pulp::NullaryFnOnce for Product<'_, B, K> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        let _ = self.kernel;
        K::run(
            self.simd, self.w, self.kb, self.rows, self.act, self.n, self.out, self.ld,
        )
    }
}

tiled!(matmul_q8_0_v3, BlockQ8_0, q8_0_tile, q8_0_row4);

/// The kernels a product can run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// AVX-512 with VNNI.
    Avx512Vnni,
    Avx512,
    Avx2,
    Portable,
}

impl Level {
    /// Whether the AVX-512 kernels run (with VNNI or not).
    pub fn avx512(self) -> bool {
        matches!(self, Level::Avx512Vnni | Level::Avx512)
    }
}

/// The fastest kernels this CPU runs, or slower ones that
/// `OPTIROUTE_SIMD` asks for (`avx512` without VNNI, `avx2`, `portable`:
/// to compare them).
pub fn best() -> Level {
    static CAP: OnceLock<Level> = OnceLock::new();
    let cap = *CAP.get_or_init(|| match std::env::var("OPTIROUTE_SIMD").as_deref() {
        Ok("avx512") => Level::Avx512,
        Ok("avx2") => Level::Avx2,
        Ok("portable") => Level::Portable,
        Ok("") | Err(_) => Level::Avx512Vnni,
        Ok(other) => {
            tracing::warn!(
                value = other,
                "OPTIROUTE_SIMD is not `avx512`, `avx2` or `portable`: using the best kernels this CPU has"
            );
            Level::Avx512Vnni
        }
    });
    if cap == Level::Avx512Vnni && Vnni::try_new().is_some() {
        Level::Avx512Vnni
    } else if cap.avx512() && V4::try_new().is_some() {
        Level::Avx512
    } else if cap != Level::Portable && V3::try_new().is_some() {
        Level::Avx2
    } else {
        Level::Portable
    }
}

/// Whether the weights are regrouped for the VNNI kernels (they run).
pub fn grouped() -> bool {
    best() == Level::Avx512Vnni
}

pub fn matmul_q4_1(
    w: &[BlockQ4_1],
    kb: usize,
    rows: Range<usize>,
    act: &[BlockAct],
    n: usize,
    out: &mut [f32],
    ld: usize,
) {
    matmul_q4_1_at(best(), w, kb, rows, act, n, out, ld)
}

pub fn matmul_q8_0(
    w: &[BlockQ8_0],
    kb: usize,
    rows: Range<usize>,
    act: &[BlockAct],
    n: usize,
    out: &mut [f32],
    ld: usize,
) {
    matmul_q8_0_at(best(), w, kb, rows, act, n, out, ld)
}

/// The product with the kernels of `level` (or the next slower ones
/// this CPU has).
#[allow(clippy::too_many_arguments)]
pub fn matmul_q4_1_at(
    level: Level,
    w: &[BlockQ4_1],
    kb: usize,
    rows: Range<usize>,
    act: &[BlockAct],
    n: usize,
    out: &mut [f32],
    ld: usize,
) {
    if level.avx512() && avx512::matmul_q4_1(w, kb, rows.clone(), act, n, out, ld) {
        return;
    }
    avx2_or_portable(level, w, kb, rows, act, n, out, ld, Q41, dot_q4_1_portable)
}

#[allow(clippy::too_many_arguments)]
pub fn matmul_q8_0_at(
    level: Level,
    w: &[BlockQ8_0],
    kb: usize,
    rows: Range<usize>,
    act: &[BlockAct],
    n: usize,
    out: &mut [f32],
    ld: usize,
) {
    if level.avx512() && avx512::matmul_q8_0(w, kb, rows.clone(), act, n, out, ld) {
        return;
    }
    avx2_or_portable(level, w, kb, rows, act, n, out, ld, Q80, dot_q8_0_portable)
}

/// The AVX2 product with `kernel` unless `level` is portable or the CPU
/// lacks AVX2, then the portable loop with `dot`.
#[allow(clippy::too_many_arguments)]
fn avx2_or_portable<B, K: Kernel<B>>(
    level: Level,
    w: &[B],
    kb: usize,
    rows: Range<usize>,
    act: &[BlockAct],
    n: usize,
    out: &mut [f32],
    ld: usize,
    kernel: K,
    dot: fn(&[B], &[BlockAct]) -> f32,
) {
    match V3::try_new().filter(|_| level != Level::Portable) {
        Some(simd) => simd.vectorize(Product {
            simd,
            w,
            kb,
            rows,
            act,
            n,
            out,
            ld,
            kernel,
        }),
        None => matmul_portable(w, kb, rows, act, n, out, ld, dot),
    }
}

pub fn quantize(x: &[f32], out: &mut [BlockAct]) {
    quantize_at(best(), x, out)
}

pub fn quantize_at(level: Level, x: &[f32], out: &mut [BlockAct]) {
    if level.avx512() && avx512::quantize(x, out) {
        return;
    }
    match V3::try_new().filter(|_| level != Level::Portable) {
        // The portable loop, compiled with AVX2 enabled.
        Some(simd) => simd.vectorize(move || quantize_portable(x, out)),
        None => quantize_portable(x, out),
    }
}
