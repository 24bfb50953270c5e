//! The AVX-512 VNNI kernels: sixteen blocks share each accumulator.
//!
//! `vpdpbusd` adds four byte products into each 32-bit lane, and several
//! of them can add into the same lanes. So for each group of sixteen
//! blocks of a row (512 weights) eight of them, one per eighth of every
//! block (elements `4k..4k + 4`), build 16 lanes, lane `b` holding block
//! `b`'s whole integer dot product, and the float work (convert, scale,
//! add) is done once per 512 products instead of once per 64. The weights
//! are stored in that order ([`crate::quant::grouped`], built at load
//! time), so a row group is a few whole-vector loads; the activations are
//! packed the same way per call ([`Packed::fill`]). A row's blocks past
//! its last whole group go two at a time, as in the other AVX-512 kernels.
//!
//! Q4_1's nibbles are unsigned and the activations signed, as `vpdpbusd`
//! wants; its offset term (`m * s` per block) is added per group too.
//! Q8_0's weights are signed, so its activations are packed plus 128
//! (unsigned) and each lane starts from minus 128 times its weights' sum
//! (computed once per row group), which leaves the sums exact.

use super::{q8_0_pair, Packed, Pair, Q41Pair};
use crate::quant::grouped::{GroupQ4_1, GroupQ8_0};
use crate::quant::vnni::Vnni;
use crate::quant::{BlockQ4_1, BlockQ8_0};
use pulp::bytemuck::cast;
use std::arch::x86_64::{__m512, __m512i};

/// Adds one row group's products with columns `c0..c0 + C` into `acc`:
/// per column, Q4_1's offset term (`m`: the blocks' offsets, times their
/// `s`), then the eight `vpdpbusd` from `start` (`unsigned_weights`: the
/// weights are the unsigned operand), converted, scaled and added.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn accumulate<const C: usize>(
    v: Vnni,
    x: &[__m512i; 8],
    start: __m512i,
    unsigned_weights: bool,
    wd: __m512,
    m: Option<__m512>,
    pk: &Packed,
    at: usize,
    acc: &mut [__m512; C],
) {
    let f = v.v4.avx512f;
    let (qs, ds, ss) = (
        &pk.q16[at..at + C],
        &pk.d16[at..at + C],
        &pk.s16[at..at + C],
    );
    for (((acc, q), d), s) in acc.iter_mut().zip(qs).zip(ds).zip(ss) {
        if let Some(m) = m {
            *acc = f._mm512_fmadd_ps(m, cast(*s), *acc);
        }
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

/// Q4_1 with VNNI: groups of sixteen blocks, then pairs (one `vpdpbusd`).
#[derive(Clone, Copy)]
pub(super) struct Q41Vnni(Q41Pair);

impl Pair for Q41Vnni {
    type Block = BlockQ4_1;
    type Group = GroupQ4_1;
    type Isa = Vnni;

    #[inline(always)]
    fn groups<const C: usize>(
        v: Vnni,
        groups: &[GroupQ4_1],
        pk: &Packed,
        c0: usize,
        acc: &mut [__m512; C],
    ) {
        let simd = v.v4;
        let low = simd.avx512f._mm512_set1_epi8(0x0f);
        let nibbles = |v: __m512i| simd.avx512f._mm512_and_si512(v, low);
        let high = |v: __m512i| nibbles(simd.avx512bw._mm512_srli_epi16::<4>(v));
        for (g, grp) in groups.iter().enumerate() {
            // Bytes 4p..4p + 4 of each block's nibbles hold elements
            // 4p..4p + 4 (low) and 16 + 4p..20 + 4p (high).
            let h: [__m512i; 4] = [
                cast(grp.qs[0]),
                cast(grp.qs[1]),
                cast(grp.qs[2]),
                cast(grp.qs[3]),
            ];
            let x = [
                nibbles(h[0]),
                nibbles(h[1]),
                nibbles(h[2]),
                nibbles(h[3]),
                high(h[0]),
                high(h[1]),
                high(h[2]),
                high(h[3]),
            ];
            let (wd, m) = (cast(grp.d), cast(grp.m));
            let zero = simd.avx512f._mm512_setzero_si512();
            accumulate(v, &x, zero, true, wd, Some(m), pk, g * pk.n + c0, acc);
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
    type Group = GroupQ8_0;
    type Isa = Vnni;
    const SHIFTED: bool = true;

    #[inline(always)]
    fn groups<const C: usize>(
        v: Vnni,
        groups: &[GroupQ8_0],
        pk: &Packed,
        c0: usize,
        acc: &mut [__m512; C],
    ) {
        for (g, grp) in groups.iter().enumerate() {
            let x: [__m512i; 8] = [
                cast(grp.qs[0]),
                cast(grp.qs[1]),
                cast(grp.qs[2]),
                cast(grp.qs[3]),
                cast(grp.qs[4]),
                cast(grp.qs[5]),
                cast(grp.qs[6]),
                cast(grp.qs[7]),
            ];
            let wd = cast(grp.d);
            let start = minus_128_sums(v, &x);
            accumulate(v, &x, start, false, wd, None, pk, g * pk.n + c0, acc);
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
