//! Quantized weights and the matrix-vector products that dominate
//! generation, with SIMD kernels chosen at run time.
//!
//! Weights keep the file's own quantization (Q4_1, Q8_0: 32 values a block)
//! with the f16 scales widened to f32 at load time, so the inner loops do no
//! f16 conversion. Activations are quantized to 8 bits per block (like
//! ggml's Q8_1) and dotted with integer multiply-adds.
//!
//! On x86-64 the AVX2+FMA kernels run when the CPU has them (checked once,
//! through `pulp`, with no `unsafe` here); elsewhere portable loops do the
//! same arithmetic. One binary is fast on modern CPUs and still correct on
//! old ones, without `-C target-cpu` flags.

use std::fmt;

/// Values per quantization block.
pub const BLOCK: usize = 32;

/// A Q4_1 block: value = d * q + m, q in 0..16. `qs[j]` holds element j in
/// its low nibble and element j + 16 in its high nibble.
#[derive(Clone, Copy)]
pub struct BlockQ4_1 {
    pub d: f32,
    pub m: f32,
    pub qs: [u8; 16],
}

/// A Q8_0 block: value = d * q.
#[derive(Clone, Copy)]
pub struct BlockQ8_0 {
    pub d: f32,
    pub qs: [i8; 32],
}

/// A quantized activation block: value = d * q, and `s` = d * sum(q).
#[derive(Clone, Copy)]
pub struct BlockAct {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; 32],
}

impl Default for BlockAct {
    fn default() -> Self {
        BlockAct {
            d: 0.0,
            s: 0.0,
            qs: [0; 32],
        }
    }
}

#[derive(Clone)]
pub enum QData {
    Q4_1(Vec<BlockQ4_1>),
    Q8_0(Vec<BlockQ8_0>),
    F32(Vec<f32>),
}

/// A weight matrix of `rows` outputs by `cols` inputs, row-major.
#[derive(Clone)]
pub struct QMatrix {
    pub rows: usize,
    pub cols: usize,
    pub data: QData,
}

impl fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.data {
            QData::Q4_1(_) => "Q4_1",
            QData::Q8_0(_) => "Q8_0",
            QData::F32(_) => "F32",
        };
        write!(f, "QMatrix({kind} {}x{})", self.rows, self.cols)
    }
}

/// IEEE half to single precision.
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: renormalise.
            let mut e = 127 - 15 + 1;
            let mut m = man;
            while m & 0x400 == 0 {
                m <<= 1;
                e -= 1;
            }
            sign | (e << 23) | ((m & 0x3ff) << 13)
        }
        (0x1f, _) => sign | 0x7f80_0000 | (man << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// The file's quantization types this crate reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileType {
    F32,
    Q4_1,
    Q8_0,
}

impl QMatrix {
    /// Builds a matrix from a GGUF tensor's raw bytes.
    pub fn from_raw(kind: FileType, rows: usize, cols: usize, raw: &[u8]) -> Result<Self, String> {
        if kind != FileType::F32 && !cols.is_multiple_of(BLOCK) {
            return Err(format!("{cols} columns is not a multiple of {BLOCK}"));
        }
        let n = rows * cols;
        let (size, data) = match kind {
            FileType::F32 => (
                n * 4,
                QData::F32(
                    raw.chunks_exact(4)
                        .take(n)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                ),
            ),
            FileType::Q4_1 => (
                n / BLOCK * 20,
                QData::Q4_1(
                    raw.chunks_exact(20)
                        .take(n / BLOCK)
                        .map(|c| {
                            let mut qs = [0u8; 16];
                            qs.copy_from_slice(&c[4..20]);
                            BlockQ4_1 {
                                d: f16_at(c, 0),
                                m: f16_at(c, 2),
                                qs,
                            }
                        })
                        .collect(),
                ),
            ),
            FileType::Q8_0 => (
                n / BLOCK * 34,
                QData::Q8_0(
                    raw.chunks_exact(34)
                        .take(n / BLOCK)
                        .map(|c| {
                            let mut qs = [0i8; 32];
                            for (q, b) in qs.iter_mut().zip(&c[2..34]) {
                                *q = *b as i8;
                            }
                            BlockQ8_0 {
                                d: f16_at(c, 0),
                                qs,
                            }
                        })
                        .collect(),
                ),
            ),
        };
        if raw.len() < size {
            return Err(format!(
                "tensor data is {} bytes, expected {size}",
                raw.len()
            ));
        }
        Ok(QMatrix { rows, cols, data })
    }

    /// Bytes the weights take in memory.
    pub fn bytes(&self) -> usize {
        match &self.data {
            QData::Q4_1(b) => b.len() * std::mem::size_of::<BlockQ4_1>(),
            QData::Q8_0(b) => b.len() * std::mem::size_of::<BlockQ8_0>(),
            QData::F32(v) => v.len() * 4,
        }
    }

    /// Row `r` as floats (embedding lookup).
    pub fn row(&self, r: usize, out: &mut [f32]) {
        let kb = self.cols / BLOCK;
        match &self.data {
            QData::F32(v) => out.copy_from_slice(&v[r * self.cols..(r + 1) * self.cols]),
            QData::Q8_0(b) => {
                for (blk, o) in b[r * kb..(r + 1) * kb]
                    .iter()
                    .zip(out.chunks_exact_mut(BLOCK))
                {
                    for (x, q) in o.iter_mut().zip(blk.qs) {
                        *x = blk.d * f32::from(q);
                    }
                }
            }
            QData::Q4_1(b) => {
                for (blk, o) in b[r * kb..(r + 1) * kb]
                    .iter()
                    .zip(out.chunks_exact_mut(BLOCK))
                {
                    for j in 0..16 {
                        o[j] = blk.d * f32::from(blk.qs[j] & 0x0f) + blk.m;
                        o[j + 16] = blk.d * f32::from(blk.qs[j] >> 4) + blk.m;
                    }
                }
            }
        }
    }

    /// `out = self · x`, where `act` is `x` quantized (for quantized
    /// weights) and `x` the floats (for F32 weights).
    pub fn matvec(&self, x: &[f32], act: &[BlockAct], out: &mut [f32]) {
        debug_assert_eq!(out.len(), self.rows);
        self.matmul_rows(x, act, 1, 0..self.rows, out, self.rows);
    }

    /// The product with `n` columns at once, for the rows in `rows`:
    /// `out[c * ld + (r - rows.start)] = row r · column c`. Column `c` is
    /// `x[c * cols..]` as floats (F32 weights) and `act[c * cols / 32..]`
    /// quantized. Each weight block is read once for all `n` columns.
    ///
    /// Every (row, column) pair is computed with the same arithmetic in the
    /// same order whatever `n`, `rows` and the tiling, so a sequence gets
    /// bit-identical results alone or in a batch, on any thread.
    pub fn matmul_rows(
        &self,
        x: &[f32],
        act: &[BlockAct],
        n: usize,
        rows: std::ops::Range<usize>,
        out: &mut [f32],
        ld: usize,
    ) {
        debug_assert!(rows.end <= self.rows && ld >= rows.len());
        match &self.data {
            QData::F32(w) => {
                for r in rows.clone() {
                    let row = &w[r * self.cols..(r + 1) * self.cols];
                    for c in 0..n {
                        let xc = &x[c * self.cols..(c + 1) * self.cols];
                        out[c * ld + r - rows.start] = row.iter().zip(xc).map(|(a, b)| a * b).sum();
                    }
                }
            }
            QData::Q4_1(w) => simd::matmul_q4_1(w, self.cols / BLOCK, rows, act, n, out, ld),
            QData::Q8_0(w) => simd::matmul_q8_0(w, self.cols / BLOCK, rows, act, n, out, ld),
        }
    }
}

/// The portable product over a range of rows (same layout as
/// [`QMatrix::matmul_rows`]).
#[allow(clippy::too_many_arguments)]
fn matmul_portable<B>(
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

/// Quantizes `x` to 8-bit blocks (`x.len()` a multiple of 32).
pub fn quantize_act(x: &[f32], out: &mut Vec<BlockAct>) {
    out.resize(x.len() / BLOCK, BlockAct::default());
    simd::quantize(x, out);
}

#[inline(always)]
fn quantize_portable(x: &[f32], out: &mut [BlockAct]) {
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
fn dot_q4_1_portable(w: &[BlockQ4_1], act: &[BlockAct]) -> f32 {
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
fn dot_q8_0_portable(w: &[BlockQ8_0], act: &[BlockAct]) -> f32 {
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

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{
        dot_q4_1_portable, dot_q8_0_portable, matmul_portable, quantize_portable, BlockAct,
        BlockQ4_1, BlockQ8_0,
    };
    use pulp::bytemuck::cast;
    use pulp::x86::V3;
    use std::arch::x86_64::{__m128, __m128i, __m256, __m256i};
    use std::ops::Range;

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
                    for c in 4 * groups..n {
                        let t = $tile::<4, 1>(
                            simd,
                            [row(r), row(r + 1), row(r + 2), row(r + 3)],
                            [col(c)],
                        );
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

    pub fn matmul_q4_1(
        w: &[BlockQ4_1],
        kb: usize,
        rows: Range<usize>,
        act: &[BlockAct],
        n: usize,
        out: &mut [f32],
        ld: usize,
    ) {
        match V3::try_new() {
            Some(simd) => simd.vectorize(Product {
                simd,
                w,
                kb,
                rows,
                act,
                n,
                out,
                ld,
                kernel: Q41,
            }),
            None => matmul_portable(w, kb, rows, act, n, out, ld, dot_q4_1_portable),
        }
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
        match V3::try_new() {
            Some(simd) => simd.vectorize(Product {
                simd,
                w,
                kb,
                rows,
                act,
                n,
                out,
                ld,
                kernel: Q80,
            }),
            None => matmul_portable(w, kb, rows, act, n, out, ld, dot_q8_0_portable),
        }
    }

    pub fn quantize(x: &[f32], out: &mut [BlockAct]) {
        match V3::try_new() {
            // The portable loop, compiled with AVX2 enabled.
            Some(simd) => simd.vectorize(move || quantize_portable(x, out)),
            None => quantize_portable(x, out),
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod simd {
    use super::{
        dot_q4_1_portable, dot_q8_0_portable, matmul_portable, quantize_portable, BlockAct,
        BlockQ4_1, BlockQ8_0,
    };
    use std::ops::Range;

    pub fn matmul_q4_1(
        w: &[BlockQ4_1],
        kb: usize,
        rows: Range<usize>,
        act: &[BlockAct],
        n: usize,
        out: &mut [f32],
        ld: usize,
    ) {
        matmul_portable(w, kb, rows, act, n, out, ld, dot_q4_1_portable)
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
        matmul_portable(w, kb, rows, act, n, out, ld, dot_q8_0_portable)
    }

    pub fn quantize(x: &[f32], out: &mut [BlockAct]) {
        quantize_portable(x, out)
    }
}

/// Whether the SIMD kernels run on this CPU.
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
    #![allow(clippy::unwrap_used)]
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

    #[test]
    fn f16_conversion() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0000), 0.0);
        assert_eq!(f16_to_f32(0x0001), 5.960_464_5e-8);
        assert!(f16_to_f32(0x7c00).is_infinite());
    }

    /// The SIMD kernels agree with the portable loops and with float math.
    #[test]
    fn kernels_match_reference() {
        let (rows, cols) = (10, 96);
        let x = pseudo(cols, 7);
        let mut act = Vec::new();
        quantize_act(&x, &mut act);
        let mut portable = vec![0f32; rows];
        let mut fast = vec![0f32; rows];
        let mut exact = vec![0f32; rows];

        // Q4_1 weights from arbitrary nibbles and scales.
        let kb = cols / BLOCK;
        let q41: Vec<BlockQ4_1> = (0..rows * kb)
            .map(|i| BlockQ4_1 {
                d: 0.01 + i as f32 * 0.001,
                m: -0.05 + i as f32 * 0.002,
                qs: std::array::from_fn(|j| ((i * 7 + j * 13) % 256) as u8),
            })
            .collect();
        let m = QMatrix {
            rows,
            cols,
            data: QData::Q4_1(q41.clone()),
        };
        m.matvec(&x, &act, &mut fast);
        for (r, o) in portable.iter_mut().enumerate() {
            *o = dot_q4_1_portable(&q41[r * kb..(r + 1) * kb], &act);
        }
        let mut row = vec![0f32; cols];
        for (r, e) in exact.iter_mut().enumerate() {
            m.row(r, &mut row);
            *e = row.iter().zip(&x).map(|(a, b)| a * b).sum();
        }
        for r in 0..rows {
            assert!(
                (fast[r] - portable[r]).abs() < 1e-3,
                "{fast:?} {portable:?}"
            );
            assert!(
                (fast[r] - exact[r]).abs() < 0.02 * exact[r].abs().max(1.0),
                "{fast:?} {exact:?}"
            );
        }

        let q80: Vec<BlockQ8_0> = (0..rows * kb)
            .map(|i| BlockQ8_0 {
                d: 0.003 + i as f32 * 0.0001,
                qs: std::array::from_fn(|j| (((i * 31 + j * 17) % 255) as i32 - 127) as i8),
            })
            .collect();
        let m = QMatrix {
            rows,
            cols,
            data: QData::Q8_0(q80.clone()),
        };
        m.matvec(&x, &act, &mut fast);
        for (r, o) in portable.iter_mut().enumerate() {
            *o = dot_q8_0_portable(&q80[r * kb..(r + 1) * kb], &act);
        }
        for (r, e) in exact.iter_mut().enumerate() {
            m.row(r, &mut row);
            *e = row.iter().zip(&x).map(|(a, b)| a * b).sum();
        }
        for r in 0..rows {
            assert!(
                (fast[r] - portable[r]).abs() < 1e-3,
                "{fast:?} {portable:?}"
            );
            assert!(
                (fast[r] - exact[r]).abs() < 0.02 * exact[r].abs().max(1.0),
                "{fast:?} {exact:?}"
            );
        }
    }

    /// A batched product gives, bit for bit, what one column at a time
    /// gives, for every tile shape and any row range (thread split).
    #[test]
    fn batched_products_equal_single_columns_bit_for_bit() {
        let (rows, cols) = (22, 96);
        let kb = cols / BLOCK;
        let q41 = QMatrix {
            rows,
            cols,
            data: QData::Q4_1(
                (0..rows * kb)
                    .map(|i| BlockQ4_1 {
                        d: 0.01 + i as f32 * 0.001,
                        m: -0.05 + i as f32 * 0.002,
                        qs: std::array::from_fn(|j| ((i * 7 + j * 13) % 256) as u8),
                    })
                    .collect(),
            ),
        };
        let q80 = QMatrix {
            rows,
            cols,
            data: QData::Q8_0(
                (0..rows * kb)
                    .map(|i| BlockQ8_0 {
                        d: 0.003 + i as f32 * 0.0001,
                        qs: std::array::from_fn(|j| (((i * 31 + j * 17) % 255) as i32 - 127) as i8),
                    })
                    .collect(),
            ),
        };
        for m in [&q41, &q80] {
            for n in [1, 2, 3, 4, 5, 8, 11] {
                let x = pseudo(n * cols, 3 + n as u32);
                let mut act = Vec::new();
                quantize_act(&x, &mut act);
                let mut batched = vec![0f32; n * rows];
                m.matmul_rows(&x, &act, n, 0..rows, &mut batched, rows);
                // Two row ranges, as two threads would split them.
                let mut split = vec![0f32; n * rows];
                let mut top = vec![0f32; n * 8];
                m.matmul_rows(&x, &act, n, 0..8, &mut top, 8);
                let mut bottom = vec![0f32; n * (rows - 8)];
                m.matmul_rows(&x, &act, n, 8..rows, &mut bottom, rows - 8);
                for c in 0..n {
                    split[c * rows..c * rows + 8].copy_from_slice(&top[c * 8..(c + 1) * 8]);
                    split[c * rows + 8..(c + 1) * rows]
                        .copy_from_slice(&bottom[c * (rows - 8)..(c + 1) * (rows - 8)]);
                }
                for c in 0..n {
                    let mut single = vec![0f32; rows];
                    m.matvec(
                        &x[c * cols..(c + 1) * cols],
                        &act[c * kb..(c + 1) * kb],
                        &mut single,
                    );
                    for r in 0..rows {
                        assert_eq!(
                            batched[c * rows + r].to_bits(),
                            single[r].to_bits(),
                            "{m:?} n={n} c={c} r={r}"
                        );
                        assert_eq!(split[c * rows + r].to_bits(), single[r].to_bits());
                    }
                }
            }
        }
    }
}
