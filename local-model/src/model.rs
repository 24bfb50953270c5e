//! The llama forward pass (SmolLM2 is a llama) over the quantized weights
//! in [`crate::quant`], for a batch of rows at once: prompt chunks and one
//! new token of every decoding sequence go through each layer together, so
//! every weight read serves the whole batch (matrix-matrix products), and
//! the products are split by rows across a [`Team`] of threads.
//! Weights are read-only and shared; each sequence owns a [`KvCache`].

use std::io::{Read, Seek};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use crate::attention::KvCache;
use crate::attention::{Attend, AttnInput};
use crate::gguf::{Content, DType};
use crate::pages::{Pack, Paging};

use crate::quant::{quantize_act, BlockAct, FileType, QData, QMatrix, BLOCK, GROUP};
use crate::team::{Job, Part, Team};

#[derive(Debug, Clone)]
pub struct Config {
    pub dim: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub context: usize,
    pub rms_eps: f32,
    pub rope_base: f32,
}

struct Layer {
    attn_norm: Vec<f32>,
    wq: QMatrix,
    wk: QMatrix,
    wv: QMatrix,
    wo: QMatrix,
    ffn_norm: Vec<f32>,
    w_gate: QMatrix,
    w_up: QMatrix,
    w_down: QMatrix,
}

impl Layer {
    /// The layer's seven matrices.
    fn all(&self) -> [&QMatrix; 7] {
        [
            &self.wq,
            &self.wk,
            &self.wv,
            &self.wo,
            &self.w_gate,
            &self.w_up,
            &self.w_down,
        ]
    }

    fn mats(&mut self) -> [&mut QMatrix; 7] {
        [
            &mut self.wq,
            &mut self.wk,
            &mut self.wv,
            &mut self.wo,
            &mut self.w_gate,
            &mut self.w_up,
            &mut self.w_down,
        ]
    }
}

/// Quantized weights that load before they move to huge pages: the most
/// extra memory loading takes (checked after each layer, so up to one
/// layer more).
const PACK_BYTES: usize = 32 << 20;

/// Where the weights went as they loaded ([`crate::pages`]).
#[derive(Default)]
struct Packing {
    paging: Paging,
}

impl Packing {
    /// Moves `mats`' quantized weights into one mapping on huge pages; if
    /// it cannot be made, they stay where they are (small pages).
    fn add(&mut self, mats: Vec<&mut QMatrix>) {
        let mut slabs: Vec<&mut dyn Pack> =
            mats.into_iter().filter_map(QMatrix::slab_mut).collect();
        let now = match crate::pages::pack(&mut slabs) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "weights stay on small pages: no mapping for them");
                Paging::SmallPages
            }
        };
        // Huge pages asked for only if they were for every part.
        self.paging = match (self.paging, now) {
            (Paging::SmallPages, _) | (_, Paging::SmallPages) => Paging::SmallPages,
            (Paging::Empty, p) | (p, Paging::Empty) => p,
            (Paging::Advised, Paging::Advised) => Paging::Advised,
        };
    }
}

/// Names a weight matrix, so a `'static` job on a helper thread can find
/// it in the shared weights.
#[derive(Debug, Clone, Copy)]
enum Mat {
    Q(usize),
    K(usize),
    V(usize),
    O(usize),
    Gate(usize),
    Up(usize),
    Down(usize),
    Output,
}

pub struct Weights {
    pub cfg: Config,
    embed: QMatrix,
    /// `None`: tied to the embeddings.
    output: Option<QMatrix>,
    out_norm: Vec<f32>,
    layers: Vec<Layer>,
    /// RoPE inverse frequencies, one per pair of a head's dimensions.
    inv_freq: Vec<f32>,
    /// Where the quantized weights live.
    paging: Paging,
}

fn md_u32(ct: &Content, key: &str) -> Result<usize, String> {
    ct.get_u32(key).map(|v| v as usize)
}

fn md_f32(ct: &Content, key: &str) -> Option<f32> {
    ct.get_f32(key)
}

impl Weights {
    pub fn from_gguf<R: Read + Seek>(ct: &Content, file: &mut R) -> Result<Self, String> {
        let dim = md_u32(ct, "llama.embedding_length")?;
        let heads = md_u32(ct, "llama.attention.head_count")?;
        let cfg = Config {
            dim,
            hidden: md_u32(ct, "llama.feed_forward_length")?,
            layers: md_u32(ct, "llama.block_count")?,
            heads,
            kv_heads: md_u32(ct, "llama.attention.head_count_kv")?,
            head_dim: dim / heads.max(1),
            vocab: 0,
            context: md_u32(ct, "llama.context_length").unwrap_or(2048),
            rms_eps: md_f32(ct, "llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_base: md_f32(ct, "llama.rope.freq_base").unwrap_or(10_000.0),
        };
        if heads == 0
            || cfg.kv_heads == 0
            || !heads.is_multiple_of(cfg.kv_heads)
            || !dim.is_multiple_of(heads)
        {
            return Err(format!(
                "unsupported attention shape: {heads} heads, {} kv heads, dim {dim}",
                cfg.kv_heads
            ));
        }
        let mut read = |name: &str| -> Result<QMatrix, String> {
            let (info, raw) = ct.tensor_bytes(file, name)?;
            let kind = match info.dtype {
                DType::F32 => FileType::F32,
                DType::Q4_1 => FileType::Q4_1,
                DType::Q8_0 => FileType::Q8_0,
                other => {
                    return Err(format!(
                        "tensor `{name}` is {other:?}; supported: F32, Q4_1, Q8_0"
                    ))
                }
            };
            let (rows, cols) = match info.dims[..] {
                [n] => (1, n),
                [r, c] => (r, c),
                _ => return Err(format!("tensor `{name}` has shape {:?}", info.dims)),
            };
            QMatrix::from_raw(kind, rows, cols, &raw).map_err(|e| format!("tensor `{name}`: {e}"))
        };
        let vector = |m: QMatrix, name: &str| -> Result<Vec<f32>, String> {
            let mut v = vec![0f32; m.cols * m.rows];
            if m.rows != 1 {
                return Err(format!("`{name}` is not a vector"));
            }
            m.row(0, &mut v);
            Ok(v)
        };
        // The quantized weights move to memory on huge pages as they load,
        // a few tens of MB at a time, so loading never holds two copies of
        // them all.
        let mut packing = Packing::default();
        let mut embed = read("token_embd.weight")?;
        packing.add(vec![&mut embed]);
        let mut output = if ct.tensors.contains_key("output.weight") {
            Some(read("output.weight")?)
        } else {
            None
        };
        packing.add(output.iter_mut().collect());
        let out_norm = vector(read("output_norm.weight")?, "output_norm.weight")?;
        let mut layers: Vec<Layer> = Vec::with_capacity(cfg.layers);
        let (mut first, mut pending) = (0, 0);
        for i in 0..cfg.layers {
            let p = format!("blk.{i}");
            let n = |s: &str| format!("{p}.{s}.weight");
            let layer = Layer {
                attn_norm: vector(read(&n("attn_norm"))?, "attn_norm")?,
                wq: read(&n("attn_q"))?,
                wk: read(&n("attn_k"))?,
                wv: read(&n("attn_v"))?,
                wo: read(&n("attn_output"))?,
                ffn_norm: vector(read(&n("ffn_norm"))?, "ffn_norm")?,
                w_gate: read(&n("ffn_gate"))?,
                w_up: read(&n("ffn_up"))?,
                w_down: read(&n("ffn_down"))?,
            };
            pending += layer.all().iter().map(|m| m.bytes()).sum::<usize>();
            layers.push(layer);
            if pending >= PACK_BYTES || i + 1 == cfg.layers {
                packing.add(layers[first..].iter_mut().flat_map(Layer::mats).collect());
                (first, pending) = (i + 1, 0);
            }
        }
        let kv_dim = cfg.kv_heads * cfg.head_dim;
        for (i, l) in layers.iter().enumerate() {
            let shapes = [
                (&l.wq, dim, dim),
                (&l.wk, kv_dim, dim),
                (&l.wv, kv_dim, dim),
                (&l.wo, dim, dim),
                (&l.w_gate, cfg.hidden, dim),
                (&l.w_up, cfg.hidden, dim),
                (&l.w_down, dim, cfg.hidden),
            ];
            for (m, r, c) in shapes {
                if m.rows != r || m.cols != c {
                    return Err(format!("layer {i}: {m:?}, expected {r}x{c}"));
                }
            }
        }
        if embed.cols != dim || output.as_ref().is_some_and(|o| o.cols != dim) {
            return Err("embedding width differs from llama.embedding_length".into());
        }
        let vocab = output.as_ref().map_or(embed.rows, |o| o.rows);
        let half = cfg.head_dim / 2;
        let inv_freq = (0..half)
            .map(|i| 1.0 / cfg.rope_base.powf(2.0 * i as f32 / cfg.head_dim as f32))
            .collect();
        Ok(Weights {
            cfg: Config { vocab, ..cfg },
            embed,
            output,
            out_norm,
            layers,
            inv_freq,
            paging: packing.paging,
        })
    }

    /// Whether the weights, all of them, were moved to memory advised for
    /// huge pages.
    pub fn huge_pages(&self) -> bool {
        let mut mats = [&self.embed]
            .into_iter()
            .chain(&self.output)
            .chain(self.layers.iter().flat_map(Layer::all));
        self.paging == Paging::Advised && mats.all(QMatrix::moved)
    }

    fn mat(&self, m: Mat) -> &QMatrix {
        match m {
            Mat::Q(l) => &self.layers[l].wq,
            Mat::K(l) => &self.layers[l].wk,
            Mat::V(l) => &self.layers[l].wv,
            Mat::O(l) => &self.layers[l].wo,
            Mat::Gate(l) => &self.layers[l].w_gate,
            Mat::Up(l) => &self.layers[l].w_up,
            Mat::Down(l) => &self.layers[l].w_down,
            Mat::Output => self.output.as_ref().unwrap_or(&self.embed),
        }
    }

    /// The weight products of one decoding step for `n` sequences alone,
    /// on the calling thread: every layer's seven matrices and the output
    /// head, `reps` times over fixed pseudo-random activations. The time it
    /// takes bounds what batching can gain (attention, norms, sampling and
    /// the thread hand-off come on top).
    pub fn time_products(&self, n: usize, reps: usize) -> std::time::Duration {
        let c = &self.cfg;
        let mut seed = 0x2545_f491_u32;
        let mut pseudo = |len: usize| -> Vec<f32> {
            (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    ((seed >> 8) as f32 / (1u32 << 24) as f32) - 0.5
                })
                .collect()
        };
        let (x, h) = (pseudo(n * c.dim), pseudo(n * c.hidden));
        let (mut ax, mut ah) = (Vec::new(), Vec::new());
        quantize_act(&x, &mut ax);
        quantize_act(&h, &mut ah);
        let mut out = vec![0f32; n * c.vocab.max(c.hidden)];
        let started = std::time::Instant::now();
        for _ in 0..reps {
            for l in 0..c.layers {
                for m in [
                    Mat::Q(l),
                    Mat::K(l),
                    Mat::V(l),
                    Mat::O(l),
                    Mat::Gate(l),
                    Mat::Up(l),
                ] {
                    let m = self.mat(m);
                    m.matmul_rows(&x, &ax, n, 0..m.rows, &mut out, m.rows);
                }
                let m = self.mat(Mat::Down(l));
                m.matmul_rows(&h, &ah, n, 0..m.rows, &mut out, m.rows);
            }
            let m = self.mat(Mat::Output);
            m.matmul_rows(&x, &ax, n, 0..m.rows, &mut out, m.rows);
        }
        started.elapsed()
    }

    /// Bytes a KV cache for `tokens` positions reserves (every layer,
    /// keys and values).
    pub fn kv_bytes(&self, tokens: usize) -> usize {
        KvCache::bytes(&self.cfg, tokens)
    }

    /// Bytes the weights take in memory.
    pub fn bytes(&self) -> usize {
        let l: usize = self
            .layers
            .iter()
            .flat_map(Layer::all)
            .map(QMatrix::bytes)
            .sum();
        l + self.embed.bytes() + self.output.as_ref().map_or(0, QMatrix::bytes)
    }
}

/// One row of a batch: a token of a sequence at that sequence's next
/// position. Rows of one sequence are consecutive and in order.
#[derive(Debug, Clone, Copy)]
pub struct Row {
    /// Index into the caches passed to [`Forward::step`].
    pub seq: usize,
    pub token: u32,
    /// Compute the logits after this token.
    pub logits: bool,
}

/// Products smaller than this many weight blocks × columns run on the
/// calling thread alone: splitting them costs more than it saves.
const SPLIT_MIN: usize = 4096;

/// Runs batches through the model: the thread team and the scratch
/// buffers (rows × width), reused from step to step.
pub struct Forward {
    weights: Arc<Weights>,
    team: Team,
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    /// Each row's query, position and layer cache, shared with helpers.
    attn: Arc<AttnInput>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    scores: Vec<f32>,
    /// Per row, (cos, sin) of each rotary frequency at the row's position.
    rot: Vec<(f32, f32)>,
    pos: Vec<usize>,
    acts: Arc<Vec<BlockAct>>,
    /// Logits of the rows that asked for them, in row order, `vocab` each.
    pub logits: Vec<f32>,
    times: StepTimes,
}

/// Runs `f`, adding the time it took to `spent`.
fn timed<T>(spent: &mut Duration, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let out = f();
    *spent += started.elapsed();
    out
}

/// Where the time of [`Forward::step`] went, summed over the steps so far
/// (the rest of `total`: norms, rotary, quantizing, SwiGLU, KV writes).
#[derive(Debug, Clone, Copy, Default)]
pub struct StepTimes {
    /// Steps, and the rows they fed.
    pub steps: u64,
    pub rows: u64,
    pub total: Duration,
    /// The weight products, every layer's and the output head's.
    pub products: Duration,
    /// Attention over the KV caches.
    pub attention: Duration,
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let scale = 1.0 / (ms + eps).sqrt();
    for ((o, v), g) in out.iter_mut().zip(x).zip(w) {
        *o = v * scale * g;
    }
}

/// llama's (interleaved) rotary embedding: pairs (2i, 2i+1) of each head.
fn rope(x: &mut [f32], head_dim: usize, rot: &[(f32, f32)]) {
    for head in x.chunks_exact_mut(head_dim) {
        for (pair, (cos, sin)) in head.chunks_exact_mut(2).zip(rot) {
            let (a, b) = (pair[0], pair[1]);
            pair[0] = a * cos - b * sin;
            pair[1] = a * sin + b * cos;
        }
    }
}

/// Every row's attention for one layer into `att`, the rows split across
/// the team when there are several (each row's arithmetic is the same on
/// any thread).
fn attention(
    team: &mut Team,
    w: &Arc<Weights>,
    input: &Arc<AttnInput>,
    scores: &mut Vec<f32>,
    att: &mut [f32],
) {
    let (n, dim, parts) = (input.pos.len(), w.cfg.dim, team.parts());
    if parts == 1 || n < 2 {
        crate::quant::vectorized(Attend {
            input,
            rows: 0..n,
            scores,
            att: &mut att[..n * dim],
            cfg: &w.cfg,
        });
        return;
    }
    let cut = move |p: usize| n * p / parts;
    let job: Job = {
        let (w, input) = (Arc::clone(w), Arc::clone(input));
        Arc::new(move |part, buf: &mut Vec<f32>| {
            let rows = cut(part)..cut(part + 1);
            buf.clear();
            buf.resize(rows.len() * dim, 0.0);
            let mut scores = Vec::new();
            crate::quant::vectorized(Attend {
                input: &input,
                rows,
                scores: &mut scores,
                att: buf,
                cfg: &w.cfg,
            });
        })
    };
    team.run_with(&job, |p| match p {
        Part::Own(part) => crate::quant::vectorized(Attend {
            input,
            rows: cut(part)..cut(part + 1),
            scores: &mut *scores,
            att: &mut att[cut(part) * dim..cut(part + 1) * dim],
            cfg: &w.cfg,
        }),
        Part::Done(part, buf) => {
            att[cut(part) * dim..cut(part + 1) * dim].copy_from_slice(buf);
        }
    });
}

/// The part of `rows` that part `part` of `parts` computes: equal shares,
/// cut at multiples of 16 (the interleaved weights' row groups).
fn share(rows: usize, part: usize, parts: usize) -> std::ops::Range<usize> {
    let cut = |p: usize| {
        if p >= parts {
            rows
        } else {
            (rows * p / parts) / GROUP * GROUP
        }
    };
    cut(part)..cut(part + 1)
}

/// `outs[i] = mats[i] · columns` for `n` columns: `x` quantized into the
/// shared activation buffer `acts` (helpers have released it by the time a
/// product returns), then each product split by rows across the team, its
/// time (not the quantizing's) added to `spent`.
#[allow(clippy::too_many_arguments)]
fn products(
    team: &mut Team,
    spent: &mut Duration,
    w: &Arc<Weights>,
    acts: &mut Arc<Vec<BlockAct>>,
    x: &[f32],
    n: usize,
    mats: &[Mat],
    outs: &mut [&mut Vec<f32>],
) {
    quantize_act(x, Arc::make_mut(acts));
    timed(spent, || split_products(team, w, acts, x, n, mats, outs));
}

/// [`products`] once `x` is quantized in `acts`.
fn split_products(
    team: &mut Team,
    w: &Arc<Weights>,
    acts: &Arc<Vec<BlockAct>>,
    x: &[f32],
    n: usize,
    mats: &[Mat],
    outs: &mut [&mut Vec<f32>],
) {
    let rows: Vec<usize> = mats.iter().map(|m| w.mat(*m).rows).collect();
    for (o, r) in outs.iter_mut().zip(&rows) {
        o.resize(n * r, 0.0);
    }
    let work: usize = mats
        .iter()
        .map(|m| w.mat(*m).rows * w.mat(*m).cols / BLOCK)
        .sum::<usize>()
        * n;
    let any_f32 = mats.iter().any(|m| matches!(w.mat(*m).data, QData::F32(_)));
    let parts = team.parts();
    if parts == 1 || work < SPLIT_MIN || any_f32 {
        for ((m, o), r) in mats.iter().zip(outs.iter_mut()).zip(&rows) {
            w.mat(*m).matmul_rows(x, acts, n, 0..*r, o, *r);
        }
        return;
    }
    let job: Job = {
        let (w, acts, mats) = (Arc::clone(w), Arc::clone(acts), mats.to_vec());
        Arc::new(move |part, buf: &mut Vec<f32>| {
            buf.clear();
            for m in &mats {
                let mat = w.mat(*m);
                let range = share(mat.rows, part, parts);
                let len = range.len();
                let at = buf.len();
                buf.resize(at + n * len, 0.0);
                mat.matmul_rows(&[], &acts, n, range, &mut buf[at..], len);
            }
        })
    };
    team.run_with(&job, |p| match p {
        // The caller's parts straight into place (row `i` of column `c` at
        // `c * r + i`), the helpers' copied from their buffers.
        Part::Own(part) => {
            for ((m, o), r) in mats.iter().zip(outs.iter_mut()).zip(&rows) {
                let range = share(*r, part, parts);
                let start = range.start;
                w.mat(*m)
                    .matmul_rows(&[], acts, n, range, &mut o[start..], *r);
            }
        }
        Part::Done(part, buf) => {
            let mut at = 0;
            for (o, r) in outs.iter_mut().zip(&rows) {
                let range = share(*r, part, parts);
                let len = range.len();
                for c in 0..n {
                    o[c * r + range.start..c * r + range.end]
                        .copy_from_slice(&buf[at + c * len..at + (c + 1) * len]);
                }
                at += n * len;
            }
        }
    });
}

impl Forward {
    /// `threads` work on each product (the caller's included).
    pub fn new(weights: Arc<Weights>, threads: usize) -> Self {
        Forward {
            weights,
            team: Team::new(threads),
            x: Vec::new(),
            xn: Vec::new(),
            q: Vec::new(),
            attn: Arc::new(AttnInput::default()),
            k: Vec::new(),
            v: Vec::new(),
            att: Vec::new(),
            proj: Vec::new(),
            gate: Vec::new(),
            up: Vec::new(),
            scores: Vec::new(),
            rot: Vec::new(),
            pos: Vec::new(),
            acts: Arc::new(Vec::new()),
            logits: Vec::new(),
            times: StepTimes::default(),
        }
    }

    /// Where the steps' time went so far.
    pub fn times(&self) -> StepTimes {
        self.times
    }

    pub fn weights(&self) -> &Arc<Weights> {
        &self.weights
    }

    /// Feeds `rows` (each at its sequence's next position) through the
    /// model, appending to the sequences' caches; fills [`Self::logits`]
    /// for the rows that ask for them.
    pub fn step(&mut self, rows: &[Row], caches: &mut [&mut KvCache]) {
        let started = Instant::now();
        self.feed(rows, caches);
        if !rows.is_empty() {
            self.times.steps += 1;
            self.times.rows += rows.len() as u64;
            self.times.total += started.elapsed();
        }
    }

    fn feed(&mut self, rows: &[Row], caches: &mut [&mut KvCache]) {
        let w = Arc::clone(&self.weights);
        let c = &w.cfg;
        let n = rows.len();
        let (dim, hd, kv_dim) = (c.dim, c.head_dim, c.kv_heads * c.head_dim);
        let half = hd / 2;
        self.logits.clear();
        if n == 0 {
            return;
        }
        // Positions, and the rotary table of each row (shared by layers).
        self.pos.clear();
        let mut fed = vec![0usize; caches.len()];
        for r in rows {
            self.pos.push(caches[r.seq].len + fed[r.seq]);
            fed[r.seq] += 1;
        }
        self.rot.clear();
        for &p in &self.pos {
            self.rot.extend(
                w.inv_freq
                    .iter()
                    .map(|f| (p as f32 * f).sin_cos())
                    .map(|(s, c)| (c, s)),
            );
        }
        self.x.resize(n * dim, 0.0);
        self.xn.resize(n * dim, 0.0);
        self.att.resize(n * dim, 0.0);
        for (r, x) in rows.iter().zip(self.x.chunks_exact_mut(dim)) {
            w.embed.row((r.token as usize).min(w.embed.rows - 1), x);
        }
        for (li, l) in w.layers.iter().enumerate() {
            // Attention.
            for (x, xn) in self.x.chunks_exact(dim).zip(self.xn.chunks_exact_mut(dim)) {
                rms_norm(x, &l.attn_norm, c.rms_eps, xn);
            }
            products(
                &mut self.team,
                &mut self.times.products,
                &w,
                &mut self.acts,
                &self.xn,
                n,
                &[Mat::Q(li), Mat::K(li), Mat::V(li)],
                &mut [&mut self.q, &mut self.k, &mut self.v],
            );
            for i in 0..n {
                let rot = &self.rot[i * half..(i + 1) * half];
                rope(&mut self.q[i * dim..(i + 1) * dim], hd, rot);
                rope(&mut self.k[i * kv_dim..(i + 1) * kv_dim], hd, rot);
            }
            for (i, r) in rows.iter().enumerate() {
                caches[r.seq].push(
                    li,
                    self.pos[i],
                    &self.k[i * kv_dim..(i + 1) * kv_dim],
                    &self.v[i * kv_dim..(i + 1) * kv_dim],
                );
            }
            {
                let input = Arc::make_mut(&mut self.attn);
                input.q.clear();
                input.q.extend_from_slice(&self.q[..n * dim]);
                input.pos.clear();
                input.pos.extend_from_slice(&self.pos);
                input.kv.clear();
                input
                    .kv
                    .extend(rows.iter().map(|r| Arc::clone(caches[r.seq].layer(li))));
            }
            timed(&mut self.times.attention, || {
                attention(
                    &mut self.team,
                    &w,
                    &self.attn,
                    &mut self.scores,
                    &mut self.att,
                );
            });
            // Let go of the batch's caches at once: a sequence that ends
            // after this step must not keep a layer alive past its
            // reservation (the KV cap counts only live sequences). A late
            // helper still holding the input gets to keep its copy; ours
            // starts afresh rather than being cloned.
            match Arc::get_mut(&mut self.attn) {
                Some(input) => input.kv.clear(),
                None => self.attn = Arc::default(),
            }
            products(
                &mut self.team,
                &mut self.times.products,
                &w,
                &mut self.acts,
                &self.att,
                n,
                &[Mat::O(li)],
                &mut [&mut self.proj],
            );
            for (x, p) in self.x.iter_mut().zip(&self.proj) {
                *x += p;
            }
            // Feed-forward (SwiGLU).
            for (x, xn) in self.x.chunks_exact(dim).zip(self.xn.chunks_exact_mut(dim)) {
                rms_norm(x, &l.ffn_norm, c.rms_eps, xn);
            }
            products(
                &mut self.team,
                &mut self.times.products,
                &w,
                &mut self.acts,
                &self.xn,
                n,
                &[Mat::Gate(li), Mat::Up(li)],
                &mut [&mut self.gate, &mut self.up],
            );
            crate::quant::vectorized(crate::mathf::SwiGlu {
                gate: &mut self.gate,
                up: &self.up,
            });
            products(
                &mut self.team,
                &mut self.times.products,
                &w,
                &mut self.acts,
                &self.gate,
                n,
                &[Mat::Down(li)],
                &mut [&mut self.proj],
            );
            for (x, p) in self.x.iter_mut().zip(&self.proj) {
                *x += p;
            }
        }
        for r in rows {
            caches[r.seq].len += 1;
        }
        // Logits, only for the rows that want them.
        let mut m = 0;
        for (r, x) in rows.iter().zip(self.x.chunks_exact(dim)) {
            if r.logits {
                rms_norm(
                    x,
                    &w.out_norm,
                    c.rms_eps,
                    &mut self.xn[m * dim..(m + 1) * dim],
                );
                m += 1;
            }
        }
        if m == 0 {
            return;
        }
        let xl = &self.xn[..m * dim];
        products(
            &mut self.team,
            &mut self.times.products,
            &w,
            &mut self.acts,
            xl,
            m,
            &[Mat::Output],
            &mut [&mut self.logits],
        );
    }
}
