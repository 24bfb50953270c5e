//! Weights interleaved sixteen rows at a time, in the order the VNNI
//! kernels read them (`avx512/vnni_kernels.rs`): for each group of sixteen
//! rows and each block position, the sixteen rows' blocks side by side,
//! their quants as whole 64-byte vectors (4 bytes of each row's block) and
//! their scales one vector each. One `vpdpbusd` of such a vector with four
//! activation bytes broadcast adds four products into each row's lane, so
//! a row group's product with a column is sixteen rows' sums in one
//! register, with no sum across lanes and no leftover blocks whatever the
//! row length. Built once at load time in place of the blocks (as many
//! bytes, Q8_0's quants stored plus 128; a matrix's last group is padded
//! with zero rows), when those kernels run.

use super::{dot_q4_1_portable, dot_q8_0_portable, matmul_portable, BlockAct};
use super::{BlockQ4_1, BlockQ8_0};
use crate::pages::Slab;
use std::ops::Range;

/// Rows a group holds.
pub const GROUP: usize = 16;

/// One block position of sixteen rows, Q4_1 (a whole number of cache
/// lines, aligned to them).
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(64))]
pub struct GroupQ4_1 {
    /// `qs[p][4r..4r + 4]`: bytes `4p..4p + 4` of row `r`'s nibbles.
    pub qs: [[u8; 64]; 4],
    pub d: [f32; GROUP],
    pub m: [f32; GROUP],
}

/// One block position of sixteen rows, Q8_0: the quants plus 128, as
/// unsigned bytes (`vpdpbusd` multiplies unsigned by signed); a whole
/// number of cache lines, aligned to them.
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(64))]
pub struct GroupQ8_0 {
    /// `qs[k][4r..4r + 4]`: quants `4k..4k + 4` of row `r`, plus 128.
    pub qs: [[u8; 64]; 8],
    pub d: [f32; GROUP],
}

/// Row `r`'s bytes `q` into a group's parts: bytes `4k..4k + 4` into part
/// `k`, at `4r..4r + 4`.
fn scatter<T: Copy, const P: usize>(parts: &mut [[T; 64]; P], r: usize, q: &[T]) {
    for (part, q) in parts.iter_mut().zip(q.chunks_exact(4)) {
        part[4 * r..4 * (r + 1)].copy_from_slice(q);
    }
}

/// Row `r`'s bytes back out of a group's parts ([`scatter`] undone).
fn gather<T: Copy, const P: usize>(parts: &[[T; 64]; P], r: usize, q: &mut [T]) {
    for (part, q) in parts.iter().zip(q.chunks_exact_mut(4)) {
        q.copy_from_slice(&part[4 * r..4 * (r + 1)]);
    }
}

/// A block type and its group.
pub trait Regroup: Copy {
    type Group: bytemuck::Pod;
    /// Sixteen rows' blocks at one position (`None`: a padding row).
    fn group(blocks: [Option<&Self>; GROUP]) -> Self::Group;
    /// Row `r`'s block back out of a group.
    fn lane(g: &Self::Group, r: usize) -> Self;
    /// The portable dot product of a row's blocks with a column.
    fn dot(w: &[Self], act: &[BlockAct]) -> f32;
    /// The VNNI product (`false`: not on this CPU, nothing done).
    fn vnni(
        w: &Grouped<Self>,
        rows: Range<usize>,
        act: &[BlockAct],
        n: usize,
        out: &mut [f32],
        ld: usize,
    ) -> bool;
}

impl Regroup for BlockQ4_1 {
    type Group = GroupQ4_1;

    fn group(blocks: [Option<&Self>; GROUP]) -> GroupQ4_1 {
        let mut g = GroupQ4_1 {
            qs: [[0; 64]; 4],
            d: [0.0; GROUP],
            m: [0.0; GROUP],
        };
        for (r, blk) in blocks.iter().enumerate() {
            if let Some(blk) = blk {
                scatter(&mut g.qs, r, &blk.qs);
                (g.d[r], g.m[r]) = (blk.d, blk.m);
            }
        }
        g
    }

    fn lane(g: &GroupQ4_1, r: usize) -> Self {
        let mut qs = [0u8; 16];
        gather(&g.qs, r, &mut qs);
        BlockQ4_1 {
            d: g.d[r],
            m: g.m[r],
            qs,
        }
    }

    fn dot(w: &[Self], act: &[BlockAct]) -> f32 {
        dot_q4_1_portable(w, act)
    }

    #[allow(unused_variables)]
    fn vnni(
        w: &Grouped<Self>,
        rows: Range<usize>,
        act: &[BlockAct],
        n: usize,
        out: &mut [f32],
        ld: usize,
    ) -> bool {
        #[cfg(target_arch = "x86_64")]
        return super::avx512::matmul_grouped(w, rows, act, n, out, ld);
        #[cfg(not(target_arch = "x86_64"))]
        false
    }
}

impl Regroup for BlockQ8_0 {
    type Group = GroupQ8_0;

    fn group(blocks: [Option<&Self>; GROUP]) -> GroupQ8_0 {
        let mut g = GroupQ8_0 {
            // A padding row's quants: zero, plus 128.
            qs: [[0x80; 64]; 8],
            d: [0.0; GROUP],
        };
        for (r, blk) in blocks.iter().enumerate() {
            if let Some(blk) = blk {
                // q + 128 as an unsigned byte: the sign bit flipped.
                let q: [u8; 32] = blk.qs.map(|q| q.cast_unsigned() ^ 0x80);
                scatter(&mut g.qs, r, &q);
                g.d[r] = blk.d;
            }
        }
        g
    }

    fn lane(g: &GroupQ8_0, r: usize) -> Self {
        let mut q = [0u8; 32];
        gather(&g.qs, r, &mut q);
        BlockQ8_0 {
            d: g.d[r],
            qs: q.map(|q| (q ^ 0x80).cast_signed()),
        }
    }

    fn dot(w: &[Self], act: &[BlockAct]) -> f32 {
        dot_q8_0_portable(w, act)
    }

    #[allow(unused_variables)]
    fn vnni(
        w: &Grouped<Self>,
        rows: Range<usize>,
        act: &[BlockAct],
        n: usize,
        out: &mut [f32],
        ld: usize,
    ) -> bool {
        #[cfg(target_arch = "x86_64")]
        return super::avx512::matmul_grouped(w, rows, act, n, out, ld);
        #[cfg(not(target_arch = "x86_64"))]
        false
    }
}

/// A matrix's rows sixteen at a time: group `g`'s block position `b` at
/// `groups[g * kb + b]`.
#[derive(Clone)]
pub struct Grouped<B: Regroup> {
    pub groups: Slab<B::Group>,
    /// Blocks a row holds.
    pub kb: usize,
    /// Rows (the last group's padding rows not counted).
    pub rows: usize,
}

impl<B: Regroup> Grouped<B> {
    /// Interleaves the rows of `kb` blocks each.
    pub fn new(blocks: &[B], kb: usize) -> Self {
        let rows = blocks.len().checked_div(kb).unwrap_or(0);
        let mut groups = Vec::with_capacity(rows.div_ceil(GROUP) * kb);
        for g in 0..rows.div_ceil(GROUP) {
            for b in 0..kb {
                groups.push(B::group(std::array::from_fn(|i| {
                    let r = g * GROUP + i;
                    (r < rows).then(|| &blocks[r * kb + b])
                })));
            }
        }
        Grouped {
            groups: groups.into(),
            kb,
            rows,
        }
    }

    /// Row group `g`'s block positions.
    pub fn group(&self, g: usize) -> &[B::Group] {
        &self.groups[g * self.kb..(g + 1) * self.kb]
    }

    /// Row `r`'s blocks, one at a time, in order.
    pub fn row_blocks(&self, r: usize) -> impl Iterator<Item = B> + '_ {
        debug_assert!(r < self.rows, "row {r} past the matrix");
        self.group(r / GROUP)
            .iter()
            .map(move |g| B::lane(g, r % GROUP))
    }

    /// The product over a row range (layout of `QMatrix::matmul_rows`):
    /// the VNNI kernels, or (never where the weights were regrouped for
    /// them) each row as blocks through the portable loop.
    pub fn matmul(
        &self,
        rows: Range<usize>,
        act: &[BlockAct],
        n: usize,
        out: &mut [f32],
        ld: usize,
    ) {
        debug_assert!(rows.end <= self.rows, "rows past the matrix");
        if B::vnni(self, rows.clone(), act, n, out, ld) {
            return;
        }
        for r in rows.clone() {
            let row: Vec<B> = self.row_blocks(r).collect();
            let out = &mut out[r - rows.start..];
            matmul_portable(&row, row.len(), 0..1, act, n, out, ld, B::dot);
        }
    }

    /// Bytes the weights take.
    pub fn bytes(&self) -> usize {
        self.groups.len() * std::mem::size_of::<B::Group>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::testdata::{blocks, pseudo};
    use crate::quant::{quantize_act, QData, QMatrix};

    /// Interleaved weights give what the portable loops give on the
    /// blocks (rows of 3 to 48 blocks; row ranges cut inside a group of
    /// sixteen rows; 40 rows, so the last group holds 8 padding rows),
    /// each column of a batch bit for bit what it gets alone, and the
    /// blocks back unchanged.
    #[test]
    fn regrouped_weights_match_the_portable_loops() {
        if crate::quant::simd_kernels() != "avx512vnni" {
            eprintln!("no AVX-512 VNNI here: the regrouped weights run the portable fallback");
        }
        // Row lengths in blocks: 3, 16, 17, 23, 18 (the model's 576), 32,
        // 35 and 48 (down projection's 1536).
        for (cols, range) in [
            (96, 0..40),
            (512, 3..29),
            (544, 0..17),
            (736, 2..40),
            (576, 5..37),
            (1024, 1..9),
            (1120, 0..17),
            (1536, 0..20),
            // Whole groups, as the threads' shares are cut.
            (576, 16..32),
            (576, 0..32),
        ] {
            let (all, kb) = (40, cols / 32);
            let rows = range.len();
            let (q41, q80) = blocks(all * kb);
            let (g41, g80) = (Grouped::new(&q41, kb), Grouped::new(&q80, kb));
            assert_eq!((g41.rows, g41.kb), (all, kb));
            assert_eq!(g41.groups.len(), all.div_ceil(GROUP) * kb);
            // The embedding lookup reads regrouped rows as the blocks'.
            let (m41, m80) = (
                QMatrix {
                    rows: all,
                    cols,
                    data: QData::Q4_1(q41.clone().into()),
                },
                QMatrix {
                    rows: all,
                    cols,
                    data: QData::Q8_0(q80.clone().into()),
                },
            );
            let (r41, r80) = (
                QMatrix {
                    data: QData::Q4_1Grouped(g41.clone()),
                    ..m41.clone()
                },
                QMatrix {
                    data: QData::Q8_0Grouped(g80.clone()),
                    ..m80.clone()
                },
            );
            for (plain, regrouped) in [(&m41, &r41), (&m80, &r80)] {
                let (mut want, mut got) = (vec![0f32; cols], vec![0f32; cols]);
                for r in [0, all / 2, all - 1] {
                    plain.row(r, &mut want);
                    regrouped.row(r, &mut got);
                    assert_eq!(got, want, "cols={cols} row {r}");
                }
            }
            for r in 0..all {
                let back: Vec<_> = g41.row_blocks(r).collect();
                for (a, b) in back.iter().zip(&q41[r * kb..(r + 1) * kb]) {
                    assert_eq!((a.d, a.m, a.qs), (b.d, b.m, b.qs));
                }
                let back: Vec<_> = g80.row_blocks(r).collect();
                for (a, b) in back.iter().zip(&q80[r * kb..(r + 1) * kb]) {
                    assert_eq!((a.d, a.qs), (b.d, b.qs));
                }
            }
            for n in 1..=17 {
                let x = pseudo(n * cols, 5 + n as u32);
                let mut act = Vec::new();
                quantize_act(&x, &mut act);
                let mut want = vec![0f32; n * rows];
                let mut got = vec![0f32; n * rows];
                for q8 in [false, true] {
                    if q8 {
                        matmul_portable(
                            &q80,
                            kb,
                            range.clone(),
                            &act,
                            n,
                            &mut want,
                            rows,
                            BlockQ8_0::dot,
                        );
                        g80.matmul(range.clone(), &act, n, &mut got, rows);
                    } else {
                        matmul_portable(
                            &q41,
                            kb,
                            range.clone(),
                            &act,
                            n,
                            &mut want,
                            rows,
                            BlockQ4_1::dot,
                        );
                        g41.matmul(range.clone(), &act, n, &mut got, rows);
                    }
                    for (g, w) in got.iter().zip(&want) {
                        assert!(
                            (g - w).abs() < 1e-3 * w.abs().max(1.0),
                            "q8 {q8} cols={cols} n={n}: {g} vs {w}"
                        );
                    }
                    for c in 0..n {
                        let mut one = vec![0f32; rows];
                        let col = &act[c * kb..(c + 1) * kb];
                        if q8 {
                            g80.matmul(range.clone(), col, 1, &mut one, rows);
                        } else {
                            g41.matmul(range.clone(), col, 1, &mut one, rows);
                        }
                        for r in 0..rows {
                            assert_eq!(got[c * rows + r].to_bits(), one[r].to_bits());
                        }
                    }
                }
            }
        }
    }
}
