//! The AVX-512 VNNI kernels.
//!
//! Over interleaved weights ([`crate::quant::grouped`], built at load
//! time): `vpdpbusd` adds four byte products into each 32-bit lane, so for
//! a group of sixteen rows at one block position, eight of them (one per
//! four elements, the column's four activation bytes broadcast) leave row
//! `r`'s whole integer dot product with the block in lane `r`. Then one
//! conversion, one scale product and one FMA per block serve sixteen rows,
//! the weights are unpacked once for up to eight columns, and a row
//! group's result is one register per column: no sum across lanes, and no
//! leftover blocks whatever the row length.
//!
//! Per (row, column) the float work is the same sequence over the blocks in
//! order (Q4_1's offset `m * s`, then `convert(dot) * (d * dx)`), whatever
//! the number of columns, the tile and the row range: a sequence gets
//! bit-identical results alone or in a batch, on any thread.
//!
//! Q4_1's nibbles are unsigned and the activations signed, as `vpdpbusd`
//! wants. Q8_0's weights are stored plus 128 (unsigned), so each sum
//! starts from minus 128 times the activation block's quants summed, which
//! leaves it exact.

use super::TILE;
use crate::quant::grouped::{GroupQ4_1, GroupQ8_0, Grouped, Regroup, GROUP};
use crate::quant::vnni::Vnni;
use crate::quant::{BlockAct, BlockQ4_1, BlockQ8_0};
use pulp::bytemuck::cast;
use std::arch::x86_64::{__m512, __m512i};
use std::cell::RefCell;
use std::ops::Range;

/// The cache level prefetches fill: L2 (and the last level).
const PREFETCH_HINT: i32 = std::arch::x86_64::_MM_HINT_T1;

/// A block position of sixteen rows, unpacked for the kernel.
pub(crate) trait Unpack: Regroup {
    /// Whether each sum starts from minus 128 times the activations'
    /// quants summed (weights stored plus 128).
    const SHIFTED: bool;
    /// The eight vectors of unsigned weight bytes (vector `k`: elements
    /// `4k..4k + 4` of each row), the rows' scales and offsets (Q4_1).
    fn unpack(v: Vnni, g: &Self::Group) -> ([__m512i; 8], __m512, Option<__m512>);
}

impl Unpack for BlockQ4_1 {
    const SHIFTED: bool = false;

    #[inline(always)]
    fn unpack(v: Vnni, g: &GroupQ4_1) -> ([__m512i; 8], __m512, Option<__m512>) {
        let simd = v.v4;
        let low = simd.avx512f._mm512_set1_epi8(0x0f);
        let nibbles = |v: __m512i| simd.avx512f._mm512_and_si512(v, low);
        let high = |v: __m512i| nibbles(simd.avx512bw._mm512_srli_epi16::<4>(v));
        // Bytes 4p..4p + 4 of a row's nibbles hold elements 4p..4p + 4
        // (low) and 16 + 4p..20 + 4p (high).
        let h: [__m512i; 4] = cast(g.qs);
        (
            [
                nibbles(h[0]),
                nibbles(h[1]),
                nibbles(h[2]),
                nibbles(h[3]),
                high(h[0]),
                high(h[1]),
                high(h[2]),
                high(h[3]),
            ],
            cast(g.d),
            Some(cast(g.m)),
        )
    }
}

impl Unpack for BlockQ8_0 {
    const SHIFTED: bool = true;

    #[inline(always)]
    fn unpack(_: Vnni, g: &GroupQ8_0) -> ([__m512i; 8], __m512, Option<__m512>) {
        (cast(g.qs), cast(g.d), None)
    }
}

/// One row group by columns `c0..c0 + C`: per column, the sixteen rows'
/// products (lane `r`: row `r`).
#[inline(always)]
fn tile<B: Unpack, const C: usize>(
    v: Vnni,
    groups: &[B::Group],
    act: &[BlockAct],
    starts: &[i32],
    kb: usize,
    c0: usize,
    ahead: &[B::Group],
) -> [__m512; C] {
    let f = v.v4.avx512f;
    let mut acc = [f._mm512_setzero_ps(); C];
    for (b, g) in groups.iter().enumerate() {
        if let Some(next) = ahead.get(b) {
            // The next row group's block into the cache while this one
            // computes (the hardware's own prefetch runs too short a
            // distance ahead when the columns keep the core busy).
            let at = (next as *const B::Group).cast::<i8>();
            for line in (0..std::mem::size_of::<B::Group>()).step_by(64) {
                v.v4.sse
                    ._mm_prefetch::<PREFETCH_HINT>(at.wrapping_add(line));
            }
        }
        let (w, d, m) = B::unpack(v, g);
        for (c, acc) in acc.iter_mut().enumerate() {
            let at = (c0 + c) * kb + b;
            let a = &act[at];
            if let Some(m) = m {
                *acc = f._mm512_fmadd_ps(m, f._mm512_set1_ps(a.s), *acc);
            }
            let q: [i32; 8] = cast(a.qs);
            let mut dot = if B::SHIFTED {
                f._mm512_set1_epi32(starts[at])
            } else {
                f._mm512_setzero_si512()
            };
            for (w, q) in w.iter().zip(q) {
                dot = v.dpbusd(dot, *w, f._mm512_set1_epi32(q));
            }
            let sc = f._mm512_mul_ps(d, f._mm512_set1_ps(a.d));
            *acc = f._mm512_fmadd_ps(f._mm512_cvtepi32_ps(dot), sc, *acc);
        }
    }
    acc
}

/// Writes a tile's rows that fall in `rows` (group `g`) to `out`.
#[inline(always)]
fn store<const C: usize>(
    t: [__m512; C],
    g: usize,
    rows: &Range<usize>,
    c0: usize,
    out: &mut [f32],
    ld: usize,
) {
    let (lo, hi) = (
        (g * GROUP).max(rows.start),
        (g * GROUP + GROUP).min(rows.end),
    );
    for (c, t) in t.iter().enumerate() {
        let t: [f32; GROUP] = cast(*t);
        let at = (c0 + c) * ld + lo - rows.start;
        out[at..at + hi - lo].copy_from_slice(&t[lo - g * GROUP..hi - g * GROUP]);
    }
}

/// The product over a row range, a row group at a time, [`TILE`] columns
/// at a time (then 4, 2, 1).
struct Run<'a, B: Unpack> {
    v: Vnni,
    w: &'a Grouped<B>,
    rows: Range<usize>,
    act: &'a [BlockAct],
    starts: &'a [i32],
    n: usize,
    out: &'a mut [f32],
    ld: usize,
}

impl<B: Unpack> pulp::NullaryFnOnce for Run<'_, B> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        let Run {
            v,
            w,
            rows,
            act,
            starts,
            n,
            out,
            ld,
        } = self;
        let kb = w.kb;
        let end = rows.end.div_ceil(GROUP);
        for g in rows.start / GROUP..end {
            let groups = w.group(g);
            let next = if g + 1 < end { w.group(g + 1) } else { &[] };
            let mut ahead = next;
            let mut c0 = 0;
            while c0 + TILE <= n {
                let t = tile::<B, TILE>(v, groups, act, starts, kb, c0, std::mem::take(&mut ahead));
                store(t, g, &rows, c0, out, ld);
                c0 += TILE;
            }
            if c0 + 4 <= n {
                let t = tile::<B, 4>(v, groups, act, starts, kb, c0, std::mem::take(&mut ahead));
                store(t, g, &rows, c0, out, ld);
                c0 += 4;
            }
            if c0 + 2 <= n {
                let t = tile::<B, 2>(v, groups, act, starts, kb, c0, std::mem::take(&mut ahead));
                store(t, g, &rows, c0, out, ld);
                c0 += 2;
            }
            if c0 < n {
                let t = tile::<B, 1>(v, groups, act, starts, kb, c0, ahead);
                store(t, g, &rows, c0, out, ld);
            }
        }
    }
}

thread_local! {
    /// Per call, Q8_0's sum starts (per column and block).
    static STARTS: RefCell<Vec<i32>> = const { RefCell::new(Vec::new()) };
}

/// The VNNI product over interleaved weights (`false`: no VNNI, nothing
/// done).
pub(crate) fn matmul_grouped<B: Unpack>(
    w: &Grouped<B>,
    rows: Range<usize>,
    act: &[BlockAct],
    n: usize,
    out: &mut [f32],
    ld: usize,
) -> bool {
    let Some(v) = Vnni::try_new() else {
        return false;
    };
    let act = &act[..n * w.kb];
    let run = |starts: &[i32]| {
        v.vectorize(Run {
            v,
            w,
            rows,
            act,
            starts,
            n,
            out,
            ld,
        })
    };
    if !B::SHIFTED {
        run(&[]);
        return true;
    }
    let mut fresh = Vec::new();
    STARTS.with(|s| {
        let mut held = s.try_borrow_mut();
        let starts = match held.as_deref_mut() {
            Ok(s) => s,
            Err(_) => &mut fresh,
        };
        starts.clear();
        // Minus 128 times each activation block's quants summed.
        starts.extend(
            act.iter()
                .map(|a| -128 * a.qs.iter().map(|q| i32::from(*q)).sum::<i32>()),
        );
        run(starts);
    });
    true
}
