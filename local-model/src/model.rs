//! The llama forward pass (SmolLM2 is a llama), one token at a time, over
//! the quantized weights in [`crate::quant`]. Weights are read-only and
//! shared; each generation owns a [`State`] (its KV cache and scratch).

use std::io::{Read, Seek};
use std::sync::Arc;

use crate::gguf::{Content, DType};

use crate::quant::{quantize_act, BlockAct, FileType, QMatrix};

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

pub struct Weights {
    pub cfg: Config,
    embed: QMatrix,
    /// `None`: tied to the embeddings.
    output: Option<QMatrix>,
    out_norm: Vec<f32>,
    layers: Vec<Layer>,
    /// RoPE inverse frequencies, one per pair of a head's dimensions.
    inv_freq: Vec<f32>,
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
        let embed = read("token_embd.weight")?;
        let output = if ct.tensors.contains_key("output.weight") {
            Some(read("output.weight")?)
        } else {
            None
        };
        let out_norm = vector(read("output_norm.weight")?, "output_norm.weight")?;
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let p = format!("blk.{i}");
            let n = |s: &str| format!("{p}.{s}.weight");
            layers.push(Layer {
                attn_norm: vector(read(&n("attn_norm"))?, "attn_norm")?,
                wq: read(&n("attn_q"))?,
                wk: read(&n("attn_k"))?,
                wv: read(&n("attn_v"))?,
                wo: read(&n("attn_output"))?,
                ffn_norm: vector(read(&n("ffn_norm"))?, "ffn_norm")?,
                w_gate: read(&n("ffn_gate"))?,
                w_up: read(&n("ffn_up"))?,
                w_down: read(&n("ffn_down"))?,
            });
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
        })
    }

    /// Bytes the weights take in memory.
    pub fn bytes(&self) -> usize {
        let l: usize = self
            .layers
            .iter()
            .map(|l| {
                [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]
                    .iter()
                    .map(|m| m.bytes())
                    .sum::<usize>()
            })
            .sum();
        l + self.embed.bytes() + self.output.as_ref().map_or(0, QMatrix::bytes)
    }
}

/// One generation's KV cache and scratch buffers.
pub struct State {
    weights: Arc<Weights>,
    /// Per layer, positions × kv_dim.
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    pos: usize,
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att_out: Vec<f32>,
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    scores: Vec<f32>,
    act: Vec<BlockAct>,
    pub logits: Vec<f32>,
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let scale = 1.0 / (ms + eps).sqrt();
    for ((o, v), g) in out.iter_mut().zip(x).zip(w) {
        *o = v * scale * g;
    }
}

/// llama's (interleaved) rotary embedding: pairs (2i, 2i+1) of each head.
fn rope(x: &mut [f32], head_dim: usize, pos: usize, inv_freq: &[f32]) {
    for head in x.chunks_exact_mut(head_dim) {
        for (pair, f) in head.chunks_exact_mut(2).zip(inv_freq) {
            let (sin, cos) = (pos as f32 * f).sin_cos();
            let (a, b) = (pair[0], pair[1]);
            pair[0] = a * cos - b * sin;
            pair[1] = a * sin + b * cos;
        }
    }
}

impl State {
    pub fn new(weights: Arc<Weights>) -> Self {
        let c = weights.cfg.clone();
        let kv_dim = c.kv_heads * c.head_dim;
        State {
            keys: vec![Vec::new(); c.layers],
            values: vec![Vec::new(); c.layers],
            pos: 0,
            x: vec![0.0; c.dim],
            xn: vec![0.0; c.dim],
            q: vec![0.0; c.dim],
            k: vec![0.0; kv_dim],
            v: vec![0.0; kv_dim],
            att_out: vec![0.0; c.dim],
            proj: vec![0.0; c.dim],
            gate: vec![0.0; c.hidden],
            up: vec![0.0; c.hidden],
            scores: Vec::new(),
            act: Vec::new(),
            logits: vec![0.0; c.vocab],
            weights,
        }
    }

    /// Tokens processed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Feeds one token at the next position; computes `self.logits` when
    /// `want_logits` (the last prompt token and every generated one).
    pub fn forward(&mut self, token: u32, want_logits: bool) {
        let w = Arc::clone(&self.weights);
        let c = &w.cfg;
        let (hd, kv_dim) = (c.head_dim, c.kv_heads * c.head_dim);
        let group = c.heads / c.kv_heads;
        let pos = self.pos;
        let scale = 1.0 / (hd as f32).sqrt();
        w.embed
            .row((token as usize).min(w.embed.rows - 1), &mut self.x);
        for (li, l) in w.layers.iter().enumerate() {
            // Attention.
            rms_norm(&self.x, &l.attn_norm, c.rms_eps, &mut self.xn);
            quantize_act(&self.xn, &mut self.act);
            l.wq.matvec(&self.xn, &self.act, &mut self.q);
            l.wk.matvec(&self.xn, &self.act, &mut self.k);
            l.wv.matvec(&self.xn, &self.act, &mut self.v);
            rope(&mut self.q, hd, pos, &w.inv_freq);
            rope(&mut self.k, hd, pos, &w.inv_freq);
            let keys = &mut self.keys[li];
            let values = &mut self.values[li];
            keys.extend_from_slice(&self.k);
            values.extend_from_slice(&self.v);
            let n = pos + 1;
            self.scores.resize(n, 0.0);
            for h in 0..c.heads {
                let kvh = h / group;
                let q = &self.q[h * hd..(h + 1) * hd];
                let mut max = f32::NEG_INFINITY;
                for (t, s) in self.scores.iter_mut().enumerate() {
                    let k = &keys[t * kv_dim + kvh * hd..t * kv_dim + (kvh + 1) * hd];
                    *s = q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale;
                    max = max.max(*s);
                }
                let mut sum = 0.0;
                for s in self.scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let out = &mut self.att_out[h * hd..(h + 1) * hd];
                out.fill(0.0);
                for (t, s) in self.scores.iter().enumerate() {
                    let p = s / sum;
                    let v = &values[t * kv_dim + kvh * hd..t * kv_dim + (kvh + 1) * hd];
                    for (o, x) in out.iter_mut().zip(v) {
                        *o += p * x;
                    }
                }
            }
            quantize_act(&self.att_out, &mut self.act);
            l.wo.matvec(&self.att_out, &self.act, &mut self.proj);
            for (x, p) in self.x.iter_mut().zip(&self.proj) {
                *x += p;
            }
            // Feed-forward (SwiGLU).
            rms_norm(&self.x, &l.ffn_norm, c.rms_eps, &mut self.xn);
            quantize_act(&self.xn, &mut self.act);
            l.w_gate.matvec(&self.xn, &self.act, &mut self.gate);
            l.w_up.matvec(&self.xn, &self.act, &mut self.up);
            for (g, u) in self.gate.iter_mut().zip(&self.up) {
                *g = *g / (1.0 + (-*g).exp()) * u;
            }
            quantize_act(&self.gate, &mut self.act);
            l.w_down.matvec(&self.gate, &self.act, &mut self.proj);
            for (x, p) in self.x.iter_mut().zip(&self.proj) {
                *x += p;
            }
        }
        self.pos += 1;
        if want_logits {
            rms_norm(&self.x, &w.out_norm, c.rms_eps, &mut self.xn);
            quantize_act(&self.xn, &mut self.act);
            let head = w.output.as_ref().unwrap_or(&w.embed);
            head.matvec(&self.xn, &self.act, &mut self.logits);
        }
    }
}
