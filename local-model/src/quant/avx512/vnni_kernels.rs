//! The AVX-512 VNNI kernels: eight blocks share each accumulator.
//!
//! `vpdpbusd` adds four byte products into each 32-bit lane, and several
//! of them can add into the same lanes. So for each group of eight blocks
//! of a row (256 weights) four of them, one per eighth of every block
//! (elements `8k..8k + 8`), build 16 lanes that each belong to one block
//! (lanes `2b`, `2b + 1`: block `b`), and the float work (convert, scale,
//! add) is done once per 256 products instead of once per 64. The
//! activations are packed in the same order ([`Packed::fill`]); the
//! weights are regrouped once per row group for all the columns of a
//! tile. Blocks past the last whole group go two at a time, as in the
//! other AVX-512 kernels.
//!
//! Q4_1's nibbles are unsigned and the activations signed, as `vpdpbusd`
//! wants. Q8_0's weights are signed, so its activations are packed plus
//! 128 (unsigned) and each lane starts from minus 128 times its weights'
//! sum (computed once per row group), which leaves the sums exact.

use super::{q8_0_pair, Packed, Pair, Q41Pair};
use crate::quant::vnni::Vnni;
use crate::quant::{BlockQ4_1, BlockQ8_0};
use pulp::bytemuck::cast;
use pulp::x86::V4;
use std::arch::x86_64::{__m512, __m512i};

/// Eight 8-byte pieces side by side, `piece(b)` in bytes `8b..8b + 8`
/// (built in registers: eight scalar stores read back as one vector
/// would stall on store forwarding).
#[inline(always)]
fn pieces(simd: V4, piece: impl Fn(usize) -> [u8; 8]) -> __m512i {
    let q = |b: usize| i64::from_le_bytes(piece(b));
    simd.avx512f
        ._mm512_set_epi64(q(7), q(6), q(5), q(4), q(3), q(2), q(1), q(0))
}

/// The row group's blocks' scales, block `b`'s in lanes `2b`, `2b + 1`.
#[inline(always)]
fn group_scales(simd: V4, d: [f32; 8]) -> __m512 {
    let [a, b, c, e, f, g, h, i] = d;
    simd.avx512f
        ._mm512_set_ps(i, i, h, h, g, g, f, f, e, e, c, c, b, b, a, a)
}

/// Adds one row group's products with columns `c0..c0 + C` into `acc`:
/// per column, the four `vpdpbusd` from `start` (`unsigned_weights`: the
/// weights are the unsigned operand), then convert, scale and add.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn accumulate<const C: usize>(
    v: Vnni,
    x: &[__m512i; 4],
    start: __m512i,
    unsigned_weights: bool,
    wd: __m512,
    pk: &Packed,
    at: usize,
    acc: &mut [__m512; C],
) {
    let f = v.v4.avx512f;
    let (qs, ds) = (&pk.q8[at..at + C], &pk.d8[at..at + C]);
    for ((acc, q), d) in acc.iter_mut().zip(qs).zip(ds) {
        let mut dot = start;
        for (x, q) in x.iter().zip(q) {
            let q: __m512i = cast(*q);
            dot = if unsigned_weights {
                v.dpbusd(dot, *x, q)
            } else {
                v.dpbusd(dot, q, *x)
            };
        }
        let sc = f._mm512_mul_ps(wd, cast(*d));
        *acc = f._mm512_fmadd_ps(f._mm512_cvtepi32_ps(dot), sc, *acc);
    }
}

/// Q4_1 with VNNI: groups of eight blocks, then pairs (one `vpdpbusd`).
#[derive(Clone, Copy)]
pub(super) struct Q41Vnni(Q41Pair);

impl Pair for Q41Vnni {
    type Block = BlockQ4_1;
    type Isa = Vnni;
    const GROUPED: bool = true;

    #[inline(always)]
    fn groups<const C: usize>(
        v: Vnni,
        row: &[BlockQ4_1],
        pk: &Packed,
        c0: usize,
        acc: &mut [__m512; C],
    ) {
        let simd = v.v4;
        let low = simd.avx512f._mm512_set1_epi8(0x0f);
        for g in 0..pk.groups {
            let blocks = &row[8 * g..8 * (g + 1)];
            // Bytes 0..8 (elements 0..8 low, 16..24 high) and 8..16
            // (8..16 low, 24..32 high) of each block's nibbles.
            let halves: [__m512i; 2] =
                std::array::from_fn(|h| pieces(simd, |b| blocks[b].qs.as_chunks::<8>().0[h]));
            let nibbles = |v: __m512i| simd.avx512f._mm512_and_si512(v, low);
            let x = [
                nibbles(halves[0]),
                nibbles(halves[1]),
                nibbles(simd.avx512bw._mm512_srli_epi16::<4>(halves[0])),
                nibbles(simd.avx512bw._mm512_srli_epi16::<4>(halves[1])),
            ];
            let wd = group_scales(simd, std::array::from_fn(|b| blocks[b].d));
            let zero = simd.avx512f._mm512_setzero_si512();
            accumulate(v, &x, zero, true, wd, pk, g * pk.n + c0, acc);
        }
    }

    #[inline(always)]
    fn extra(v: Vnni, row: &[BlockQ4_1], pk: &Packed, c0: usize, m: &mut [f32], ex: &mut [__m512]) {
        Q41Pair::extra(v.v4, row, pk, c0, m, ex)
    }

    #[inline(always)]
    fn load(v: Vnni, row: &[BlockQ4_1], i: usize) -> Self {
        Q41Vnni(Q41Pair::load(v.v4, row, i))
    }

    #[inline(always)]
    fn d(self) -> __m512 {
        self.0.d
    }

    #[inline(always)]
    fn dot(self, v: Vnni, y: __m512i) -> __m512i {
        v.dpbusd(v.v4.avx512f._mm512_setzero_si512(), self.0.x, y)
    }
}

/// Q8_0 with VNNI: against activations plus 128 (unsigned), each sum
/// starts from minus 128 times its weights' sum, so it ends exact.
#[derive(Clone, Copy)]
pub(super) struct Q80Vnni {
    x: __m512i,
    /// Per lane, -128 * (the lane's four weights summed).
    start: __m512i,
    d: __m512,
}

/// Per lane, minus 128 times the sum of the lane's weights in `x`.
#[inline(always)]
fn minus_128_sums(v: Vnni, x: &[__m512i]) -> __m512i {
    let f = v.v4.avx512f;
    let zero = f._mm512_setzero_si512();
    // 128 as an unsigned byte: 0x80.
    let c128 = f._mm512_set1_epi8(i8::MIN);
    let sum = x.iter().fold(zero, |acc, x| v.dpbusd(acc, c128, *x));
    f._mm512_sub_epi32(zero, sum)
}

impl Pair for Q80Vnni {
    type Block = BlockQ8_0;
    type Isa = Vnni;
    const SHIFTED: bool = true;
    const GROUPED: bool = true;

    #[inline(always)]
    fn groups<const C: usize>(
        v: Vnni,
        row: &[BlockQ8_0],
        pk: &Packed,
        c0: usize,
        acc: &mut [__m512; C],
    ) {
        for g in 0..pk.groups {
            let blocks = &row[8 * g..8 * (g + 1)];
            let x: [__m512i; 4] = std::array::from_fn(|k| {
                pieces(v.v4, |b| {
                    blocks[b].qs.as_chunks::<8>().0[k].map(|q| q as u8)
                })
            });
            let wd = group_scales(v.v4, std::array::from_fn(|b| blocks[b].d));
            let start = minus_128_sums(v, &x);
            accumulate(v, &x, start, false, wd, pk, g * pk.n + c0, acc);
        }
    }

    #[inline(always)]
    fn extra(v: Vnni, _: &[BlockQ8_0], _: &Packed, _: usize, _: &mut [f32], ex: &mut [__m512]) {
        ex.fill(v.v4.avx512f._mm512_setzero_ps());
    }

    #[inline(always)]
    fn load(v: Vnni, row: &[BlockQ8_0], i: usize) -> Self {
        let (x, d) = q8_0_pair(v.v4, row, i);
        Q80Vnni {
            x,
            start: minus_128_sums(v, &[x]),
            d,
        }
    }

    #[inline(always)]
    fn d(self) -> __m512 {
        self.d
    }

    #[inline(always)]
    fn dot(self, v: Vnni, y: __m512i) -> __m512i {
        v.dpbusd(self.start, y, self.x)
    }
}
