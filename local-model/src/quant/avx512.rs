//! The AVX-512 kernels (x86-64; pulp's `V4`: F, BW, CD, DQ, VL), picked at
//! run time before the AVX2 ones when the CPU has them.
//!
//! A 512-bit register holds two quantization blocks, so each integer
//! multiply-add covers two blocks of a (row, column) pair. The
//! activations of a call are first regrouped two blocks at a time per
//! column (quants side by side, each block's scale in its eight lanes), so
//! the inner loop per (row, column, pair of blocks) is one load, the two
//! integer multiply-adds, one conversion, one scale product and one FMA;
//! a row's pair is unpacked once for all the columns of a tile (up to 8).
//!
//! With AVX-512 VNNI the weights are interleaved at load time and run
//! their own kernels (`vnni_kernels`).
//!
//! Per (row, column) the arithmetic is the same whatever the number of
//! columns, the tile and the row range, so a sequence gets bit-identical
//! results alone or in a batch, on any thread. The integer dot products
//! are exact on every path; the VNNI kernels over interleaved weights
//! (`vnni_kernels`) add their floats in another order (block after block,
//! sixteen rows per register), so they agree with the others to rounding,
//! not bit for bit.

use super::{BlockAct, BlockQ4_1, BlockQ8_0};
/// The VNNI product over interleaved weights.
pub(crate) use vnni_kernels::matmul_grouped;

mod vnni_kernels;
use pulp::bytemuck::cast;
use pulp::x86::V4;
use std::arch::x86_64::{__m128i, __m512, __m512i};
use std::cell::RefCell;
use std::ops::Range;

/// Columns a tile serves with one unpacking of a row's blocks.
const TILE: usize = 8;

/// A call's activations per column, two blocks at a time.
#[derive(Default)]
struct Packed {
    /// Columns.
    n: usize,
    /// Pairs per column (rounded up).
    pairs: usize,
    /// Per pair and column (`p * n + c`): the 64 quants (zero past the
    /// last block).
    q: Vec<[i8; 64]>,
    /// Per pair and column: each block's scale in its eight lanes.
    d: Vec<[f32; 16]>,
    /// Per column: each block's `s` (Q4_1's offset term),
    /// zero-padded to a multiple of 16 blocks.
    s: Vec<f32>,
    /// Blocks per column in `s`.
    spad: usize,
    /// Scratch: a row's offsets `m`, and per column the extra term.
    m: Vec<f32>,
    ex: Vec<__m512>,
}

impl Packed {
    fn fill(&mut self, act: &[BlockAct], kb: usize, n: usize) {
        self.n = n;
        self.pairs = kb.div_ceil(2);
        self.spad = kb.div_ceil(16) * 16;
        self.q.clear();
        self.q.resize(self.pairs * n, [0; 64]);
        self.d.clear();
        self.d.resize(self.pairs * n, [0.0; 16]);
        self.s.clear();
        self.s.resize(n * self.spad, 0.0);
        for c in 0..n {
            let col = &act[c * kb..(c + 1) * kb];
            for (i, blk) in col.iter().enumerate() {
                let (at, h) = ((i / 2) * n + c, i % 2);
                self.q[at][32 * h..32 * (h + 1)].copy_from_slice(&blk.qs);
                self.d[at][8 * h..8 * (h + 1)].fill(blk.d);
            }
            for (s, blk) in self.s[c * self.spad..].iter_mut().zip(col) {
                *s = blk.s;
            }
        }
    }
}

thread_local! {
    static PACKED: RefCell<Packed> = RefCell::new(Packed::default());
}

/// Runs `f` with this thread's scratch (a fresh one if it is in use).
fn with_packed<T>(f: impl FnOnce(&mut Packed) -> T) -> T {
    PACKED.with(|p| match p.try_borrow_mut() {
        Ok(mut p) => f(&mut p),
        Err(_) => f(&mut Packed::default()),
    })
}

/// Two blocks' scales: `a` in lanes 0..8, `b` in 8..16.
#[inline(always)]
fn scales(simd: V4, a: f32, b: f32) -> __m512 {
    simd.avx512dq._mm512_insertf32x8::<1>(
        simd.avx512f
            ._mm512_castps256_ps512(simd.avx._mm256_set1_ps(a)),
        simd.avx._mm256_set1_ps(b),
    )
}

/// A row's pair of blocks, unpacked once for a tile's columns.
trait Pair: Copy {
    type Block;
    /// Blocks `i` and `i + 1` of `row` (the second absent: zero).
    fn load(simd: V4, row: &[Self::Block], i: usize) -> Self;
    /// The two blocks' weight scales (lanes as in [`scales`]).
    fn d(self) -> __m512;
    /// Per 4-element group, the integer dot product with `y`.
    fn dot(self, simd: V4, y: __m512i) -> __m512i;
    /// Per column `c0 + c`, a term to add to the row's products (16
    /// lanes), into `ex[c]`; `m` is scratch of `pk.spad` floats.
    fn extra(
        simd: V4,
        row: &[Self::Block],
        pk: &Packed,
        c0: usize,
        m: &mut [f32],
        ex: &mut [__m512],
    );
}

#[derive(Clone, Copy)]
struct Q41Pair {
    /// 64 unsigned nibbles in element order.
    x: __m512i,
    d: __m512,
}

impl Pair for Q41Pair {
    type Block = BlockQ4_1;

    /// The offset term `sum_i m_i * s_i`.
    #[inline(always)]
    fn extra(
        simd: V4,
        row: &[BlockQ4_1],
        pk: &Packed,
        c0: usize,
        m: &mut [f32],
        ex: &mut [__m512],
    ) {
        let f = simd.avx512f;
        for (m, b) in m.iter_mut().zip(row) {
            *m = b.m;
        }
        for (c, e) in ex.iter_mut().enumerate() {
            let s = &pk.s[(c0 + c) * pk.spad..(c0 + c + 1) * pk.spad];
            let mut acc = f._mm512_setzero_ps();
            for (mc, sc) in m.chunks_exact(16).zip(s.chunks_exact(16)) {
                let mv: [f32; 16] = mc.try_into().unwrap_or([0.0; 16]);
                let sv: [f32; 16] = sc.try_into().unwrap_or([0.0; 16]);
                acc = f._mm512_fmadd_ps(cast(mv), cast(sv), acc);
            }
            *e = acc;
        }
    }

    #[inline(always)]
    fn load(simd: V4, row: &[BlockQ4_1], i: usize) -> Self {
        let a = &row[i];
        let (bq, bd) = row.get(i + 1).map_or(([0u8; 16], 0.0), |b| (b.qs, b.d));
        let raw = simd
            .avx
            ._mm256_set_m128i(cast::<_, __m128i>(bq), cast::<_, __m128i>(a.qs));
        let hi = simd.avx2._mm256_srli_epi16::<4>(raw);
        // [a.qs, b.qs, a.qs >> 4, b.qs >> 4] → [a lo, a hi, b lo, b hi].
        let both = simd
            .avx512f
            ._mm512_inserti64x4::<1>(simd.avx512f._mm512_castsi256_si512(raw), hi);
        let ordered = simd
            .avx512f
            ._mm512_shuffle_i64x2::<0b11_01_10_00>(both, both);
        Q41Pair {
            x: simd
                .avx512f
                ._mm512_and_si512(ordered, simd.avx512f._mm512_set1_epi8(0x0f)),
            d: scales(simd, a.d, bd),
        }
    }

    #[inline(always)]
    fn d(self) -> __m512 {
        self.d
    }

    #[inline(always)]
    fn dot(self, simd: V4, y: __m512i) -> __m512i {
        let p16 = simd.avx512bw._mm512_maddubs_epi16(self.x, y);
        simd.avx512bw
            ._mm512_madd_epi16(p16, simd.avx512f._mm512_set1_epi16(1))
    }
}

#[derive(Clone, Copy)]
struct Q80Pair {
    /// |x| as unsigned bytes; y is negated where x < 0.
    ax: __m512i,
    neg: u64,
    d: __m512,
}

impl Pair for Q80Pair {
    type Block = BlockQ8_0;

    #[inline(always)]
    fn extra(simd: V4, _: &[BlockQ8_0], _: &Packed, _: usize, _: &mut [f32], ex: &mut [__m512]) {
        ex.fill(simd.avx512f._mm512_setzero_ps());
    }

    #[inline(always)]
    fn load(simd: V4, row: &[BlockQ8_0], i: usize) -> Self {
        let (x, d) = q8_0_pair(simd, row, i);
        Q80Pair {
            ax: simd.avx512bw._mm512_abs_epi8(x),
            neg: simd.avx512bw._mm512_movepi8_mask(x),
            d,
        }
    }

    #[inline(always)]
    fn d(self) -> __m512 {
        self.d
    }

    #[inline(always)]
    fn dot(self, simd: V4, y: __m512i) -> __m512i {
        let zero = simd.avx512f._mm512_setzero_si512();
        let sy = simd.avx512bw._mm512_mask_sub_epi8(y, self.neg, zero, y);
        let p16 = simd.avx512bw._mm512_maddubs_epi16(self.ax, sy);
        simd.avx512bw
            ._mm512_madd_epi16(p16, simd.avx512f._mm512_set1_epi16(1))
    }
}

/// Blocks `i` and `i + 1` of a Q8_0 row (the second absent: zero): the
/// 64 signed quants and the scales.
#[inline(always)]
fn q8_0_pair(simd: V4, row: &[BlockQ8_0], i: usize) -> (__m512i, __m512) {
    let a = &row[i];
    let (bq, bd) = row.get(i + 1).map_or(([0i8; 32], 0.0), |b| (b.qs, b.d));
    let mut both = [0i8; 64];
    both[..32].copy_from_slice(&a.qs);
    both[32..].copy_from_slice(&bq);
    (cast(both), scales(simd, a.d, bd))
}

/// The sums of the 16 lanes of each of 8 vectors, by the same additions
/// for each vector whatever the others hold (a tile of fewer columns pads
/// with zeros and gets the same bits).
#[inline(always)]
fn reduce8(simd: V4, v: [__m512; 8]) -> [f32; 8] {
    let f = simd.avx512f;
    // Quarters [x.q0 + x.q2, x.q1 + x.q3, y.q0 + y.q2, y.q1 + y.q3].
    let halve = |x, y| {
        f._mm512_add_ps(
            f._mm512_shuffle_f32x4::<0x44>(x, y),
            f._mm512_shuffle_f32x4::<0xee>(x, y),
        )
    };
    // Quarter k: four lanes of column k (of the four).
    let quarter = |xy, zw| {
        f._mm512_add_ps(
            f._mm512_shuffle_f32x4::<0x88>(xy, zw),
            f._mm512_shuffle_f32x4::<0xdd>(xy, zw),
        )
    };
    let lo = quarter(halve(v[0], v[1]), halve(v[2], v[3]));
    let hi = quarter(halve(v[4], v[5]), halve(v[6], v[7]));
    let t = f._mm512_add_ps(f._mm512_unpacklo_ps(lo, hi), f._mm512_unpackhi_ps(lo, hi));
    // Lane 4k: column k's sum, lane 4k + 1: column k + 4's.
    let t: [f32; 16] = cast(f._mm512_add_ps(t, f._mm512_permute_ps::<0b01_00_11_10>(t)));
    [t[0], t[4], t[8], t[12], t[1], t[5], t[9], t[13]]
}

/// A matrix's rows of `kb` blocks as the kernels read them.
struct Rows<'a, P: Pair> {
    blocks: &'a [P::Block],
    kb: usize,
}

impl<P: Pair> Clone for Rows<'_, P> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<P: Pair> Copy for Rows<'_, P> {}

impl<'a, P: Pair> Rows<'a, P> {
    #[inline(always)]
    fn row(&self, r: usize) -> &'a [P::Block] {
        &self.blocks[r * self.kb..(r + 1) * self.kb]
    }

    /// Asks the cache for row `r`'s weights (a hint: past the end it does
    /// nothing).
    #[inline(always)]
    fn prefetch(&self, simd: V4, r: usize) {
        let at = self.blocks.as_ptr().wrapping_add(r * self.kb).cast::<i8>();
        for line in (0..self.kb * std::mem::size_of::<P::Block>()).step_by(64) {
            simd.sse._mm_prefetch::<3>(at.wrapping_add(line));
        }
    }
}

/// One row by `C` (at most 8) columns `c0..c0 + C`: per column, starting
/// from `extra` (Q4_1's offset term), the sum over the pairs of
/// `convert(int dot) * (weight scale * activation scale)` in 16 lanes,
/// then the lanes summed.
#[inline(always)]
fn row_tile<P: Pair, const C: usize>(
    isa: V4,
    row: &[P::Block],
    pk: &Packed,
    c0: usize,
    extra: &[__m512],
) -> [f32; C] {
    let simd = isa;
    let f = simd.avx512f;
    let mut acc: [__m512; C] = std::array::from_fn(|c| extra[c]);
    for p in 0..pk.pairs {
        let x = P::load(isa, row, 2 * p);
        let at = p * pk.n + c0;
        let (qs, ds) = (&pk.q[at..at + C], &pk.d[at..at + C]);
        for ((acc, q), d) in acc.iter_mut().zip(qs).zip(ds) {
            let dot = x.dot(isa, cast(*q));
            let sc = f._mm512_mul_ps(x.d(), cast(*d));
            *acc = f._mm512_fmadd_ps(f._mm512_cvtepi32_ps(dot), sc, *acc);
        }
    }
    let zero = f._mm512_setzero_ps();
    let sums = reduce8(
        simd,
        std::array::from_fn(|c| acc.get(c).copied().unwrap_or(zero)),
    );
    std::array::from_fn(|c| sums[c])
}

/// Columns `c0..c0 + C` of the product over a row range:
/// `out[c * ld + r - rows.start] = row r · column c`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn group<P: Pair, const C: usize>(
    isa: V4,
    w: Rows<P>,
    rows: &Range<usize>,
    pk: &Packed,
    c0: usize,
    out: &mut [f32],
    ld: usize,
    m: &mut [f32],
    ex: &mut [__m512],
) {
    let ex = &mut ex[..C];
    for r in rows.clone() {
        let row = w.row(r);
        if c0 == 0 {
            // The weights of a row [`PREFETCH`] rows on, into the cache
            // while this one computes.
            w.prefetch(isa, r + PREFETCH);
        }
        P::extra(isa, row, pk, c0, m, ex);
        let t = row_tile::<P, C>(isa, row, pk, c0, ex);
        for (dc, v) in t.iter().enumerate() {
            out[(c0 + dc) * ld + r - rows.start] = *v;
        }
    }
}

/// Rows ahead whose weights a product asks the cache for.
const PREFETCH: usize = 8;

/// Rows a block of the product covers: their weights stay in the L1
/// cache while every column group passes over them.
const ROW_BLOCK: usize = 16;

/// The product over a row range, in blocks of [`ROW_BLOCK`] rows, each
/// [`TILE`] columns at a time (then 4, 2, 1).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn product<P: Pair>(
    isa: V4,
    w: Rows<P>,
    rows: Range<usize>,
    pk: &Packed,
    n: usize,
    out: &mut [f32],
    ld: usize,
    m: &mut [f32],
    ex: &mut [__m512],
) {
    let mut r0 = rows.start;
    while r0 < rows.end {
        let block = r0..(r0 + ROW_BLOCK).min(rows.end);
        let out = &mut out[r0 - rows.start..];
        let mut c0 = 0;
        while c0 + TILE <= n {
            group::<P, TILE>(isa, w, &block, pk, c0, out, ld, m, ex);
            c0 += TILE;
        }
        if c0 + 4 <= n {
            group::<P, 4>(isa, w, &block, pk, c0, out, ld, m, ex);
            c0 += 4;
        }
        if c0 + 2 <= n {
            group::<P, 2>(isa, w, &block, pk, c0, out, ld, m, ex);
            c0 += 2;
        }
        if c0 < n {
            group::<P, 1>(isa, w, &block, pk, c0, out, ld, m, ex);
        }
        r0 = block.end;
    }
}

/// A product to run with the CPU's features enabled (a struct, not a
/// closure, so that `call` is forced inline into pulp's `target_feature`
/// function down to the kernel, chosen statically by `P`).
struct Run<'a, P: Pair> {
    isa: V4,
    w: Rows<'a, P>,
    rows: Range<usize>,
    pk: &'a mut Packed,
    n: usize,
    out: &'a mut [f32],
    ld: usize,
}

impl<P: Pair> pulp::NullaryFnOnce for Run<'_, P> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        let Run {
            isa,
            w,
            rows,
            pk,
            n,
            out,
            ld,
        } = self;
        let (mut m, mut ex) = (std::mem::take(&mut pk.m), std::mem::take(&mut pk.ex));
        m.clear();
        m.resize(pk.spad, 0.0);
        ex.clear();
        ex.resize(TILE, isa.avx512f._mm512_setzero_ps());
        product::<P>(isa, w, rows, pk, n, out, ld, &mut m, &mut ex);
        (pk.m, pk.ex) = (m, ex);
    }
}

/// The AVX-512 product over plain blocks, when the CPU has AVX-512
/// F/BW/DQ/VL (`false`: nothing done, use another kernel).
pub fn matmul_q4_1(
    w: &[BlockQ4_1],
    kb: usize,
    rows: Range<usize>,
    act: &[BlockAct],
    n: usize,
    out: &mut [f32],
    ld: usize,
) -> bool {
    matmul::<Q41Pair>(Rows { blocks: w, kb }, rows, act, n, out, ld)
}

pub fn matmul_q8_0(
    w: &[BlockQ8_0],
    kb: usize,
    rows: Range<usize>,
    act: &[BlockAct],
    n: usize,
    out: &mut [f32],
    ld: usize,
) -> bool {
    matmul::<Q80Pair>(Rows { blocks: w, kb }, rows, act, n, out, ld)
}

/// Every kernel's product: the activations packed once, then the tiles.
fn matmul<P: Pair>(
    w: Rows<P>,
    rows: Range<usize>,
    act: &[BlockAct],
    n: usize,
    out: &mut [f32],
    ld: usize,
) -> bool {
    let Some(isa) = V4::try_new() else {
        return false;
    };
    with_packed(|pk| {
        pk.fill(act, w.kb, n);
        isa.vectorize(Run {
            isa,
            w,
            rows,
            pk,
            n,
            out,
            ld,
        })
    });
    true
}

/// Quantizes finite activations as the portable loop does, bit for bit
/// (the largest magnitude, the same scale, rounding half away from zero);
/// a NaN or an infinity, which a sound model never produces, may quantize
/// differently.
struct Quantize<'a> {
    simd: V4,
    x: &'a [f32],
    out: &'a mut [BlockAct],
}

impl pulp::NullaryFnOnce for Quantize<'_> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        let Quantize { simd, x, out } = self;
        let f = simd.avx512f;
        let (half, one, lo, hi) = (
            f._mm512_set1_ps(0.5),
            f._mm512_set1_ps(1.0),
            f._mm512_set1_ps(-127.0),
            f._mm512_set1_ps(127.0),
        );
        for (blk, xs) in out.iter_mut().zip(x.as_chunks::<32>().0) {
            let v: [__m512; 2] = cast(*xs);
            let amax = f._mm512_reduce_max_ps(
                f._mm512_max_ps(f._mm512_abs_ps(v[0]), f._mm512_abs_ps(v[1])),
            );
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = f._mm512_setzero_si512();
            let mut qs = [0i8; 32];
            for (h, v) in v.iter().enumerate() {
                let v = f._mm512_mul_ps(*v, f._mm512_set1_ps(id));
                // Truncate, then one step away from zero when the
                // fraction dropped is at least a half.
                let t = f._mm512_roundscale_ps::<0x0b>(v);
                let up = f._mm512_cmp_ps_mask::<29>(f._mm512_abs_ps(f._mm512_sub_ps(v, t)), half);
                let neg = f._mm512_cmp_ps_mask::<17>(v, f._mm512_setzero_ps());
                let step =
                    f._mm512_mask_blend_ps(neg, one, f._mm512_sub_ps(f._mm512_setzero_ps(), one));
                let r = f._mm512_mask_add_ps(t, up, t, step);
                let q = f._mm512_cvttps_epi32(f._mm512_min_ps(f._mm512_max_ps(r, lo), hi));
                sum = f._mm512_add_epi32(sum, q);
                let b: [i8; 16] = cast(f._mm512_cvtepi32_epi8(q));
                qs[16 * h..16 * (h + 1)].copy_from_slice(&b);
            }
            blk.qs = qs;
            blk.d = d;
            blk.s = d * f._mm512_reduce_add_epi32(sum) as f32;
        }
    }
}

/// Quantizes `x` into `out` (`false`: no AVX-512, nothing done).
pub fn quantize(x: &[f32], out: &mut [BlockAct]) -> bool {
    let Some(simd) = V4::try_new() else {
        return false;
    };
    simd.vectorize(Quantize { simd, x, out });
    true
}
