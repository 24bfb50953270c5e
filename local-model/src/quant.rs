//! Quantized weights and the matrix-vector products that dominate
//! generation, with SIMD kernels chosen at run time.
//!
//! Weights keep the file's own quantization (Q4_1, Q8_0: 32 values a block)
//! with the f16 scales widened to f32 at load time, so the inner loops do no
//! f16 conversion. Activations are quantized to 8 bits per block (like
//! ggml's Q8_1) and dotted with integer multiply-adds.
//!
//! On x86-64 the AVX-512 (F/BW/DQ/VL) kernels run when the CPU has them,
//! with VNNI's one-instruction byte dot products where it has that too,
//! else the AVX2+FMA ones (checked once, through `pulp`; the one `unsafe`
//! block, VNNI's instruction behind its token, is in `quant/vnni.rs`;
//! `OPTIROUTE_SIMD=avx512`, `avx2` or `portable` caps them, to compare);
//! elsewhere portable loops do the same arithmetic. One binary is fast on
//! modern CPUs and still correct on old ones, without `-C target-cpu`
//! flags. The products ask the cache for the weights a few rows ahead: a
//! lone generation's step is otherwise bound by memory latency.

use std::fmt;

use crate::pages::{Pack, Slab};
pub use grouped::{Grouped, GROUP};

/// Values per quantization block.
pub const BLOCK: usize = 32;

/// A Q4_1 block: value = d * q + m, q in 0..16. `qs[j]` holds element j in
/// its low nibble and element j + 16 in its high nibble.
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct BlockQ4_1 {
    pub d: f32,
    pub m: f32,
    pub qs: [u8; 16],
}

/// A Q8_0 block: value = d * q.
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
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
    Q4_1(Slab<BlockQ4_1>),
    Q8_0(Slab<BlockQ8_0>),
    /// Regrouped for the VNNI kernels ([`grouped`]).
    Q4_1Grouped(Grouped<BlockQ4_1>),
    Q8_0Grouped(Grouped<BlockQ8_0>),
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
            QData::Q4_1Grouped(_) => "Q4_1 (grouped)",
            QData::Q8_0Grouped(_) => "Q8_0 (grouped)",
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
                        .collect::<Vec<_>>()
                        .into(),
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
                        .collect::<Vec<_>>()
                        .into(),
                ),
            ),
        };
        if raw.len() < size {
            return Err(format!(
                "tensor data is {} bytes, expected {size}",
                raw.len()
            ));
        }
        Ok(QMatrix { rows, cols, data }.for_kernels())
    }

    /// The weights in the layout this CPU's kernels read: interleaved
    /// sixteen rows at a time for the VNNI kernels, else as they are.
    fn for_kernels(self) -> Self {
        let kb = self.cols / BLOCK;
        if !simd::grouped() {
            return self;
        }
        let data = match self.data {
            QData::Q4_1(b) => QData::Q4_1Grouped(Grouped::new(&b, kb)),
            QData::Q8_0(b) => QData::Q8_0Grouped(Grouped::new(&b, kb)),
            other => other,
        };
        QMatrix { data, ..self }
    }

    /// The quantized weights' items, for [`crate::pages::pack`] (`None`:
    /// floats, which stay in their vector).
    pub(crate) fn slab_mut(&mut self) -> Option<&mut dyn Pack> {
        match &mut self.data {
            QData::Q4_1(b) => Some(b),
            QData::Q8_0(b) => Some(b),
            QData::Q4_1Grouped(g) => Some(&mut g.groups),
            QData::Q8_0Grouped(g) => Some(&mut g.groups),
            QData::F32(_) => None,
        }
    }

    /// Whether the quantized weights were moved to shared memory (floats
    /// never are, and count as moved, as does an empty matrix).
    pub(crate) fn moved(&self) -> bool {
        let owned = match &self.data {
            QData::Q4_1(b) => b.owned_bytes(),
            QData::Q8_0(b) => b.owned_bytes(),
            QData::Q4_1Grouped(g) => g.groups.owned_bytes(),
            QData::Q8_0Grouped(g) => g.groups.owned_bytes(),
            QData::F32(_) => None,
        };
        owned.is_none_or(<[u8]>::is_empty)
    }

    /// Bytes the weights take in memory.
    pub fn bytes(&self) -> usize {
        match &self.data {
            QData::Q4_1(b) => b.len() * std::mem::size_of::<BlockQ4_1>(),
            QData::Q8_0(b) => b.len() * std::mem::size_of::<BlockQ8_0>(),
            QData::Q4_1Grouped(g) => g.bytes(),
            QData::Q8_0Grouped(g) => g.bytes(),
            QData::F32(v) => v.len() * 4,
        }
    }

    /// Row `r` as floats (embedding lookup).
    pub fn row(&self, r: usize, out: &mut [f32]) {
        let kb = self.cols / BLOCK;
        match &self.data {
            QData::F32(v) => out.copy_from_slice(&v[r * self.cols..(r + 1) * self.cols]),
            QData::Q4_1Grouped(g) => Self::dequant_grouped(g, r, out, Self::dequant_q4_1),
            QData::Q8_0Grouped(g) => Self::dequant_grouped(g, r, out, Self::dequant_q8_0),
            QData::Q8_0(b) => Self::dequant_q8_0(&b[r * kb..(r + 1) * kb], out),
            QData::Q4_1(b) => Self::dequant_q4_1(&b[r * kb..(r + 1) * kb], out),
        }
    }

    /// Row `r` of regrouped weights, a block at a time (no allocation).
    fn dequant_grouped<B: grouped::Regroup>(
        g: &Grouped<B>,
        r: usize,
        out: &mut [f32],
        dequant: fn(&[B], &mut [f32]),
    ) {
        for (blk, out) in g.row_blocks(r).zip(out.chunks_exact_mut(BLOCK)) {
            dequant(&[blk], out);
        }
    }

    fn dequant_q8_0(blocks: &[BlockQ8_0], out: &mut [f32]) {
        for (blk, o) in blocks.iter().zip(out.chunks_exact_mut(BLOCK)) {
            for (x, q) in o.iter_mut().zip(blk.qs) {
                *x = blk.d * f32::from(q);
            }
        }
    }

    fn dequant_q4_1(blocks: &[BlockQ4_1], out: &mut [f32]) {
        for (blk, o) in blocks.iter().zip(out.chunks_exact_mut(BLOCK)) {
            for j in 0..16 {
                o[j] = blk.d * f32::from(blk.qs[j] & 0x0f) + blk.m;
                o[j + 16] = blk.d * f32::from(blk.qs[j] >> 4) + blk.m;
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
            QData::Q4_1Grouped(w) => w.matmul(rows, act, n, out, ld),
            QData::Q8_0Grouped(w) => w.matmul(rows, act, n, out, ld),
        }
    }
}

/// Quantizes `x` to 8-bit blocks (`x.len()` a multiple of 32).
pub fn quantize_act(x: &[f32], out: &mut Vec<BlockAct>) {
    out.resize(x.len() / BLOCK, BlockAct::default());
    simd::quantize(x, out);
}

#[cfg(target_arch = "x86_64")]
mod avx512;
mod grouped;
mod portable;
use portable::{dot_q4_1_portable, dot_q8_0_portable, matmul_portable, quantize_portable};
#[cfg(target_arch = "x86_64")]
mod simd;
#[cfg(target_arch = "x86_64")]
mod vnni;

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

    pub fn grouped() -> bool {
        false
    }
}

/// Runs `op` compiled with the best SIMD features this CPU has (its `call`
/// must be `#[inline(always)]`). For plain float code the results are the
/// same on every CPU: Rust does not fuse or reorder float operations.
/// Whether [`vectorized`] compiles with AVX-512: 32 vector registers of
/// 16 floats (AVX2 has 16 of 8), so loops may keep more sums in them.
pub(crate) fn wide_vectors() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        simd::best().avx512() && pulp::x86::V4::try_new().is_some()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

pub fn vectorized<F: pulp::NullaryFnOnce>(op: F) -> F::Output {
    #[cfg(target_arch = "x86_64")]
    {
        // The same level as the kernels (`OPTIROUTE_SIMD` caps both).
        match simd::best() {
            simd::Level::Avx512Vnni | simd::Level::Avx512 => {
                if let Some(simd) = pulp::x86::V4::try_new() {
                    return simd.vectorize(op);
                }
            }
            simd::Level::Avx2 => {
                if let Some(simd) = pulp::x86::V3::try_new() {
                    return simd.vectorize(op);
                }
            }
            simd::Level::Portable => {}
        }
    }
    op.call()
}

/// Whether the SIMD kernels run on this CPU.
pub fn simd_kernels() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        match simd::best() {
            simd::Level::Avx512Vnni => return "avx512vnni",
            simd::Level::Avx512 => return "avx512bw",
            simd::Level::Avx2 => return "avx2+fma",
            simd::Level::Portable => {}
        }
    }
    "portable"
}

#[cfg(test)]
pub(crate) mod testdata {
    use super::{BlockQ4_1, BlockQ8_0};

    /// `n` pseudo-random floats in [-0.5, 0.5).
    pub fn pseudo(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                ((s >> 8) as f32 / (1u32 << 24) as f32) - 0.5
            })
            .collect()
    }

    /// `len` Q4_1 and Q8_0 blocks with varied scales and every quant value.
    pub fn blocks(len: usize) -> (Vec<BlockQ4_1>, Vec<BlockQ8_0>) {
        let q41 = (0..len)
            .map(|i| BlockQ4_1 {
                d: 0.01 + (i % 17) as f32 * 0.001,
                m: -0.05 + (i % 23) as f32 * 0.002,
                qs: std::array::from_fn(|j| ((i * 7 + j * 13) % 256) as u8),
            })
            .collect();
        let q80 = (0..len)
            .map(|i| BlockQ8_0 {
                d: 0.003 + (i % 19) as f32 * 0.0001,
                qs: std::array::from_fn(|j| (((i * 31 + j * 17) % 256) as i32 - 128) as i8),
            })
            .collect();
        (q41, q80)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::testdata::pseudo;
    use super::*;

    /// A matrix counts as moved to shared memory once its quantized blocks
    /// are there, or when it has none to move (no rows); floats never
    /// move and count as moved.
    #[test]
    fn a_matrix_is_moved_once_its_blocks_are_shared() {
        let block = BlockQ4_1 {
            d: 0.5,
            m: -1.0,
            qs: [0x21; 16],
        };
        let mut full = QMatrix {
            rows: 2,
            cols: BLOCK,
            data: QData::Q4_1(vec![block; 2].into()),
        };
        assert!(!full.moved());
        let mut slabs: Vec<&mut dyn Pack> = full.slab_mut().into_iter().collect();
        crate::pages::pack(&mut slabs).unwrap();
        assert!(full.moved());
        let empty = QMatrix {
            rows: 0,
            cols: BLOCK,
            data: QData::Q8_0(Vec::new().into()),
        };
        assert!(empty.moved(), "nothing to move");
        let floats = QMatrix {
            rows: 1,
            cols: 2,
            data: QData::F32(vec![1.0, 2.0]),
        };
        assert!(floats.moved());
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
            data: QData::Q4_1(q41.clone().into()),
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
            data: QData::Q8_0(q80.clone().into()),
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
                    .collect::<Vec<_>>()
                    .into(),
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
                    .collect::<Vec<_>>()
                    .into(),
            ),
        };
        // And as this CPU's kernels read them (interleaved for VNNI).
        let (k41, k80) = (q41.clone().for_kernels(), q80.clone().for_kernels());
        for m in [&q41, &q80, &k41, &k80] {
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

    /// Every kernel this CPU has (AVX-512, AVX2, portable) gives what the
    /// portable loops give, for odd and even block counts and every tile
    /// width, and each gives a batch bit for bit what it gives one column.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_kernel_level_matches_the_portable_loops() {
        use simd::Level;
        let levels = [
            Level::Avx512Vnni,
            Level::Avx512,
            Level::Avx2,
            Level::Portable,
        ];
        if pulp::x86::V4::try_new().is_none() {
            eprintln!("no AVX-512 here: Level::Avx512 runs the AVX2 kernels");
        }
        if simd::best() != Level::Avx512Vnni {
            eprintln!("no AVX-512 VNNI here: Level::Avx512Vnni runs the kernels below it");
        }
        // Past one row block (16), and a part not starting at row 0, as
        // the thread team hands out.
        for (cols, range) in [(96, 0..40), (576, 0..40), (576, 5..37)] {
            let (all, kb) = (40, cols / BLOCK);
            let rows = range.len();
            let (q41, q80) = testdata::blocks(all * kb);
            for n in 1..=17 {
                let x = pseudo(n * cols, 11 + n as u32);
                let mut act = Vec::new();
                quantize_act(&x, &mut act);
                let mut want41 = vec![0f32; n * rows];
                let mut want80 = vec![0f32; n * rows];
                matmul_portable(
                    &q41,
                    kb,
                    range.clone(),
                    &act,
                    n,
                    &mut want41,
                    rows,
                    dot_q4_1_portable,
                );
                matmul_portable(
                    &q80,
                    kb,
                    range.clone(),
                    &act,
                    n,
                    &mut want80,
                    rows,
                    dot_q8_0_portable,
                );
                for level in levels {
                    let mut got41 = vec![0f32; n * rows];
                    let mut got80 = vec![0f32; n * rows];
                    simd::matmul_q4_1_at(level, &q41, kb, range.clone(), &act, n, &mut got41, rows);
                    simd::matmul_q8_0_at(level, &q80, kb, range.clone(), &act, n, &mut got80, rows);
                    for (got, want) in [(&got41, &want41), (&got80, &want80)] {
                        for (g, w) in got.iter().zip(want.iter()) {
                            assert!(
                                (g - w).abs() < 1e-3 * w.abs().max(1.0),
                                "{level:?} cols={cols} rows={range:?} n={n}: {g} vs {w}"
                            );
                        }
                    }
                    for c in 0..n {
                        let col = &act[c * kb..(c + 1) * kb];
                        let mut one41 = vec![0f32; rows];
                        let mut one80 = vec![0f32; rows];
                        simd::matmul_q4_1_at(
                            level,
                            &q41,
                            kb,
                            range.clone(),
                            col,
                            1,
                            &mut one41,
                            rows,
                        );
                        simd::matmul_q8_0_at(
                            level,
                            &q80,
                            kb,
                            range.clone(),
                            col,
                            1,
                            &mut one80,
                            rows,
                        );
                        for r in 0..rows {
                            assert_eq!(got41[c * rows + r].to_bits(), one41[r].to_bits());
                            assert_eq!(got80[c * rows + r].to_bits(), one80[r].to_bits());
                        }
                    }
                }
            }
        }
    }

    /// The SIMD quantizers give the portable loop's blocks bit for bit,
    /// halves (rounded away from zero) and saturation included.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_quantizer_matches_the_portable_loop_bit_for_bit() {
        use simd::Level;
        // Block 0: amax 127, so the scale is 1 and values ending in .5
        // are exact halves; the rest arbitrary, one block all zero.
        let mut x: Vec<f32> = (0..32).map(|j| (j as f32 - 16.0) * 3.5 + 0.5).collect();
        x[0] = -127.0;
        x[1] = 0.5;
        x[2] = -0.5;
        x[3] = -2.5;
        x.extend(std::iter::repeat_n(0.0, 32));
        x.extend(pseudo(32 * 40, 5).iter().map(|v| v * 7.0));
        let mut want = vec![BlockAct::default(); x.len() / BLOCK];
        quantize_portable(&x, &mut want);
        assert_eq!(want[0].qs[1], 1);
        assert_eq!(want[0].qs[2], -1);
        assert_eq!(want[0].qs[3], -3);
        for level in [
            Level::Avx512Vnni,
            Level::Avx512,
            Level::Avx2,
            Level::Portable,
        ] {
            let mut got = vec![BlockAct::default(); x.len() / BLOCK];
            simd::quantize_at(level, &x, &mut got);
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g.qs, w.qs, "{level:?}");
                assert_eq!(g.d.to_bits(), w.d.to_bits(), "{level:?}");
                assert_eq!(g.s.to_bits(), w.s.to_bits(), "{level:?}");
            }
        }
    }
}
