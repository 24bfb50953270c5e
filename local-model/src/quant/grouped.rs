//! Weights regrouped sixteen blocks at a time, in the order the VNNI
//! kernels read them (`avx512/vnni_kernels.rs`): a group's quants are
//! whole 64-byte vectors (4 bytes of each of the 16 blocks), its scales one
//! vector, so a row group loads in a few instructions instead of being
//! gathered from 16 blocks' fields. Built once at load time in place of the
//! blocks (the same bytes), when those kernels run; each row keeps its last
//! `kb % 16` blocks as blocks.

use super::{dot_q4_1_portable, dot_q8_0_portable, matmul_portable, BlockAct};
use super::{BlockQ4_1, BlockQ8_0};
use std::ops::Range;

/// Blocks a group holds.
pub const GROUP: usize = 16;

/// Sixteen Q4_1 blocks.
#[derive(Clone, Copy)]
pub struct GroupQ4_1 {
    /// `qs[p][4b..4b + 4]`: bytes `4p..4p + 4` of block `b`'s nibbles.
    pub qs: [[u8; 64]; 4],
    pub d: [f32; GROUP],
    pub m: [f32; GROUP],
}

/// Sixteen Q8_0 blocks.
#[derive(Clone, Copy)]
pub struct GroupQ8_0 {
    /// `qs[k][4b..4b + 4]`: quants `4k..4k + 4` of block `b`.
    pub qs: [[i8; 64]; 8],
    pub d: [f32; GROUP],
}

/// Block `b`'s bytes `q` into a group's parts, in the order the VNNI
/// kernels read weights and activations alike: bytes `4k..4k + 4` into
/// part `k`, at `4b..4b + 4`.
pub fn scatter<T: Copy, const P: usize>(parts: &mut [[T; 64]; P], b: usize, q: &[T]) {
    for (part, q) in parts.iter_mut().zip(q.chunks_exact(4)) {
        part[4 * b..4 * (b + 1)].copy_from_slice(q);
    }
}

/// Block `b`'s bytes back out of a group's parts ([`scatter`] undone).
fn gather<T: Copy, const P: usize>(parts: &[[T; 64]; P], b: usize, q: &mut [T]) {
    for (part, q) in parts.iter().zip(q.chunks_exact_mut(4)) {
        q.copy_from_slice(&part[4 * b..4 * (b + 1)]);
    }
}

/// A block type and its group.
pub trait Regroup: Copy {
    type Group: Copy;
    fn group(blocks: &[Self; GROUP]) -> Self::Group;
    fn ungroup(g: &Self::Group) -> [Self; GROUP];
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

    fn group(blocks: &[Self; GROUP]) -> GroupQ4_1 {
        let mut g = GroupQ4_1 {
            qs: [[0; 64]; 4],
            d: [0.0; GROUP],
            m: [0.0; GROUP],
        };
        for (b, blk) in blocks.iter().enumerate() {
            scatter(&mut g.qs, b, &blk.qs);
            (g.d[b], g.m[b]) = (blk.d, blk.m);
        }
        g
    }

    fn ungroup(g: &GroupQ4_1) -> [Self; GROUP] {
        std::array::from_fn(|b| {
            let mut qs = [0u8; 16];
            gather(&g.qs, b, &mut qs);
            BlockQ4_1 {
                d: g.d[b],
                m: g.m[b],
                qs,
            }
        })
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
        return super::avx512::matmul_grouped_q4_1(w, rows, act, n, out, ld);
        #[cfg(not(target_arch = "x86_64"))]
        false
    }
}

impl Regroup for BlockQ8_0 {
    type Group = GroupQ8_0;

    fn group(blocks: &[Self; GROUP]) -> GroupQ8_0 {
        let mut g = GroupQ8_0 {
            qs: [[0; 64]; 8],
            d: [0.0; GROUP],
        };
        for (b, blk) in blocks.iter().enumerate() {
            scatter(&mut g.qs, b, &blk.qs);
            g.d[b] = blk.d;
        }
        g
    }

    fn ungroup(g: &GroupQ8_0) -> [Self; GROUP] {
        std::array::from_fn(|b| {
            let mut qs = [0i8; 32];
            gather(&g.qs, b, &mut qs);
            BlockQ8_0 { d: g.d[b], qs }
        })
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
        return super::avx512::matmul_grouped_q8_0(w, rows, act, n, out, ld);
        #[cfg(not(target_arch = "x86_64"))]
        false
    }
}

/// A matrix's rows, each as `per_row` groups then `tail` blocks.
#[derive(Clone)]
pub struct Grouped<B: Regroup> {
    pub groups: Vec<B::Group>,
    pub blocks: Vec<B>,
    pub per_row: usize,
    pub tail: usize,
}

impl<B: Regroup> Grouped<B> {
    /// Regroups `rows` rows of `kb` blocks each.
    pub fn new(blocks: &[B], kb: usize) -> Self {
        let (per_row, tail) = (kb / GROUP, kb % GROUP);
        let rows = blocks.len().checked_div(kb).unwrap_or(0);
        let mut g = Grouped {
            groups: Vec::with_capacity(rows * per_row),
            blocks: Vec::with_capacity(rows * tail),
            per_row,
            tail,
        };
        for row in blocks.chunks_exact(kb.max(1)).take(rows) {
            let (whole, rest) = row.split_at(per_row * GROUP);
            g.groups
                .extend(whole.as_chunks::<GROUP>().0.iter().map(B::group));
            g.blocks.extend_from_slice(rest);
        }
        g
    }

    /// Row `r`'s groups and remaining blocks.
    pub fn row(&self, r: usize) -> (&[B::Group], &[B]) {
        (
            &self.groups[r * self.per_row..(r + 1) * self.per_row],
            &self.blocks[r * self.tail..(r + 1) * self.tail],
        )
    }

    /// Row `r` as blocks again.
    pub fn row_blocks(&self, r: usize) -> Vec<B> {
        let mut out = Vec::with_capacity(self.per_row * GROUP + self.tail);
        self.row_parts(r, |blocks| out.extend_from_slice(blocks));
        out
    }

    /// Row `r` as blocks, a group (on the stack) or the tail at a time,
    /// in order, without allocating.
    pub fn row_parts(&self, r: usize, mut f: impl FnMut(&[B])) {
        let (groups, rest) = self.row(r);
        for g in groups {
            f(&B::ungroup(g));
        }
        f(rest);
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
        if B::vnni(self, rows.clone(), act, n, out, ld) {
            return;
        }
        for r in rows.clone() {
            let row = self.row_blocks(r);
            let out = &mut out[r - rows.start..];
            matmul_portable(&row, row.len(), 0..1, act, n, out, ld, B::dot);
        }
    }

    /// Bytes the weights take.
    pub fn bytes(&self) -> usize {
        self.groups.len() * std::mem::size_of::<B::Group>()
            + self.blocks.len() * std::mem::size_of::<B>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::testdata::{blocks, pseudo};
    use crate::quant::{quantize_act, QData, QMatrix};

    /// Regrouped weights give what the portable loops give on the blocks
    /// (rows of fewer than one group, exactly one, groups and a tail),
    /// each column of a batch bit for bit what it gets alone, and the
    /// blocks back unchanged.
    #[test]
    fn regrouped_weights_match_the_portable_loops() {
        if crate::quant::simd_kernels() != "avx512vnni" {
            eprintln!("no AVX-512 VNNI here: the regrouped weights run the portable fallback");
        }
        // Fewer blocks than a group, exactly one, one and an odd or even
        // tail, two, two and a tail, and down projection's 48 blocks.
        for (cols, range) in [
            (96, 0..40),
            (512, 3..29),
            (544, 0..17),
            (736, 2..40),
            (576, 5..37),
            (1024, 1..9),
            (1120, 0..17),
            (1536, 0..20),
        ] {
            let (all, kb) = (40, cols / 32);
            let rows = range.len();
            let (q41, q80) = blocks(all * kb);
            let (g41, g80) = (Grouped::new(&q41, kb), Grouped::new(&q80, kb));
            assert_eq!((g41.per_row, g41.tail), (kb / GROUP, kb % GROUP));
            // The embedding lookup reads regrouped rows as the blocks'.
            let (m41, m80) = (
                QMatrix {
                    rows: all,
                    cols,
                    data: QData::Q4_1(q41.clone()),
                },
                QMatrix {
                    rows: all,
                    cols,
                    data: QData::Q8_0(q80.clone()),
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
                let back = g41.row_blocks(r);
                for (a, b) in back.iter().zip(&q41[r * kb..(r + 1) * kb]) {
                    assert_eq!((a.d, a.m, a.qs), (b.d, b.m, b.qs));
                }
                let back = g80.row_blocks(r);
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
