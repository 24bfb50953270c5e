//! The BERT encoder (as Hugging Face's `BertModel`, without the pooler):
//! word + absolute position + token type embeddings and a LayerNorm, then
//! post-norm layers of multi-head self-attention and a GELU (erf) feed
//! forward. One sequence at a time, so no padding and no attention mask.

use serde::Deserialize;

use crate::kernels::{exp_in_place, gelu_in_place, matmul_t};
use crate::safetensors::{SafeTensors, SafetensorsError};

/// The fields of the model's `config.json` the forward pass uses.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    #[serde(default = "gelu")]
    pub hidden_act: String,
    #[serde(default = "absolute")]
    pub position_embedding_type: String,
}

fn gelu() -> String {
    "gelu".into()
}

fn absolute() -> String {
    "absolute".into()
}

impl Config {
    /// What this implementation does not compute, said plainly.
    pub fn check(&self) -> Result<(), String> {
        if self.hidden_act != "gelu" {
            return Err(format!(
                "hidden_act {:?}, only \"gelu\" is implemented",
                self.hidden_act
            ));
        }
        if self.position_embedding_type != "absolute" {
            return Err(format!(
                "position_embedding_type {:?}, only \"absolute\" is implemented",
                self.position_embedding_type
            ));
        }
        let h = self.hidden_size;
        if self.num_attention_heads == 0 || h == 0 || !h.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {h} is not a multiple of num_attention_heads {}",
                self.num_attention_heads
            ));
        }
        if self.max_position_embeddings < 2 || self.type_vocab_size == 0 {
            return Err("max_position_embeddings < 2 or type_vocab_size 0".into());
        }
        Ok(())
    }
}

struct Layer {
    /// Query, key and value stacked: `3h × h`, and their biases.
    qkv_w: Vec<f32>,
    qkv_b: Vec<f32>,
    out_w: Vec<f32>,
    out_b: Vec<f32>,
    ln1_w: Vec<f32>,
    ln1_b: Vec<f32>,
    up_w: Vec<f32>,
    up_b: Vec<f32>,
    down_w: Vec<f32>,
    down_b: Vec<f32>,
    ln2_w: Vec<f32>,
    ln2_b: Vec<f32>,
}

pub struct Bert {
    pub config: Config,
    word: Vec<f32>,
    position: Vec<f32>,
    token_type: Vec<f32>,
    ln_w: Vec<f32>,
    ln_b: Vec<f32>,
    layers: Vec<Layer>,
}

impl Bert {
    /// Takes the weights from `st` (names as `BertModel` saves them, with or
    /// without a `bert.` prefix), checking every shape against `config`.
    pub fn load(config: Config, st: &SafeTensors<'_>) -> Result<Self, SafetensorsError> {
        let prefix = if st.info("embeddings.word_embeddings.weight").is_none()
            && st.info("bert.embeddings.word_embeddings.weight").is_some()
        {
            "bert."
        } else {
            ""
        };
        let get = |name: &str, shape: &[usize]| st.f32(&format!("{prefix}{name}"), shape);
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{l}.");
            let t = |name: &str, shape: &[usize]| get(&format!("{p}{name}"), shape);
            let mut qkv_w = t("attention.self.query.weight", &[h, h])?;
            qkv_w.extend(t("attention.self.key.weight", &[h, h])?);
            qkv_w.extend(t("attention.self.value.weight", &[h, h])?);
            let mut qkv_b = t("attention.self.query.bias", &[h])?;
            qkv_b.extend(t("attention.self.key.bias", &[h])?);
            qkv_b.extend(t("attention.self.value.bias", &[h])?);
            layers.push(Layer {
                qkv_w,
                qkv_b,
                out_w: t("attention.output.dense.weight", &[h, h])?,
                out_b: t("attention.output.dense.bias", &[h])?,
                ln1_w: t("attention.output.LayerNorm.weight", &[h])?,
                ln1_b: t("attention.output.LayerNorm.bias", &[h])?,
                up_w: t("intermediate.dense.weight", &[i, h])?,
                up_b: t("intermediate.dense.bias", &[i])?,
                down_w: t("output.dense.weight", &[h, i])?,
                down_b: t("output.dense.bias", &[h])?,
                ln2_w: t("output.LayerNorm.weight", &[h])?,
                ln2_b: t("output.LayerNorm.bias", &[h])?,
            });
        }
        Ok(Bert {
            word: get("embeddings.word_embeddings.weight", &[config.vocab_size, h])?,
            position: get(
                "embeddings.position_embeddings.weight",
                &[config.max_position_embeddings, h],
            )?,
            token_type: get(
                "embeddings.token_type_embeddings.weight",
                &[config.type_vocab_size, h],
            )?,
            ln_w: get("embeddings.LayerNorm.weight", &[h])?,
            ln_b: get("embeddings.LayerNorm.bias", &[h])?,
            layers,
            config,
        })
    }

    /// The last hidden state, `ids.len() × hidden_size` row-major. Ids past
    /// the vocabulary read as 0 (`[PAD]`) and positions past
    /// `max_position_embeddings` are not reached: the caller truncates.
    pub fn forward(&self, ids: &[u32]) -> Vec<f32> {
        let c = &self.config;
        let (h, n) = (c.hidden_size, ids.len().min(c.max_position_embeddings));
        let eps = c.layer_norm_eps as f32;
        let mut x = vec![0f32; n * h];
        for (p, (row, &id)) in x.chunks_exact_mut(h).zip(ids).enumerate() {
            let id = if (id as usize) < c.vocab_size {
                id as usize
            } else {
                0
            };
            let w = &self.word[id * h..(id + 1) * h];
            let pos = &self.position[p * h..(p + 1) * h];
            let typ = &self.token_type[..h];
            for (((o, a), b), t) in row.iter_mut().zip(w).zip(pos).zip(typ) {
                *o = a + b + t;
            }
        }
        layer_norm(&mut x, &self.ln_w, &self.ln_b, eps);

        let heads = c.num_attention_heads;
        let d = h / heads;
        let scale = 1.0 / (d as f32).sqrt();
        let mut qkv = vec![0f32; n * 3 * h];
        let mut ctx = vec![0f32; n * h];
        let mut proj = vec![0f32; n * h];
        let mut up = vec![0f32; n * c.intermediate_size];
        let mut qh = vec![0f32; n * d];
        let mut kh = vec![0f32; n * d];
        let mut vt = vec![0f32; d * n];
        let mut scores = vec![0f32; n * n];
        let mut ch = vec![0f32; n * d];
        for layer in &self.layers {
            matmul_t(&x, &layer.qkv_w, h, Some(&layer.qkv_b), &mut qkv);
            for head in 0..heads {
                for (t, row) in qkv.chunks_exact(3 * h).enumerate() {
                    let q = &row[head * d..(head + 1) * d];
                    let k = &row[h + head * d..h + (head + 1) * d];
                    let v = &row[2 * h + head * d..2 * h + (head + 1) * d];
                    for (o, q) in qh[t * d..(t + 1) * d].iter_mut().zip(q) {
                        *o = q * scale;
                    }
                    kh[t * d..(t + 1) * d].copy_from_slice(k);
                    for (e, v) in v.iter().enumerate() {
                        vt[e * n + t] = *v;
                    }
                }
                matmul_t(&qh, &kh, d, None, &mut scores);
                for row in scores.chunks_exact_mut(n) {
                    softmax(row);
                }
                matmul_t(&scores, &vt, n, None, &mut ch);
                for (t, row) in ch.chunks_exact(d).enumerate() {
                    ctx[t * h + head * d..t * h + (head + 1) * d].copy_from_slice(row);
                }
            }
            matmul_t(&ctx, &layer.out_w, h, Some(&layer.out_b), &mut proj);
            for (a, b) in x.iter_mut().zip(&proj) {
                *a += b;
            }
            layer_norm(&mut x, &layer.ln1_w, &layer.ln1_b, eps);

            matmul_t(&x, &layer.up_w, h, Some(&layer.up_b), &mut up);
            gelu_in_place(&mut up);
            matmul_t(
                &up,
                &layer.down_w,
                c.intermediate_size,
                Some(&layer.down_b),
                &mut proj,
            );
            for (a, b) in x.iter_mut().zip(&proj) {
                *a += b;
            }
            layer_norm(&mut x, &layer.ln2_w, &layer.ln2_b, eps);
        }
        x
    }
}

/// LayerNorm over each row (biased variance, as PyTorch), statistics in f64.
fn layer_norm(x: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
    let h = w.len();
    for row in x.chunks_exact_mut(h) {
        let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / h as f64;
        let var = row
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / h as f64;
        let inv = 1.0 / (var + f64::from(eps)).sqrt();
        for ((v, w), b) in row.iter_mut().zip(w).zip(b) {
            *v = ((f64::from(*v) - mean) * inv) as f32 * w + b;
        }
    }
}

fn softmax(row: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for v in row.iter_mut() {
        *v -= max;
    }
    exp_in_place(row);
    let inv = 1.0 / row.iter().sum::<f32>();
    for v in row.iter_mut() {
        *v *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_norm_and_softmax() {
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        layer_norm(&mut x, &[1.0, 1.0, 2.0, 2.0], &[0.0, 0.0, 0.0, 1.0], 1e-12);
        let s = 1.0 / 1.25f32.sqrt();
        let want = [-1.5 * s, -0.5 * s, 1.0 * s, 3.0 * s + 1.0];
        for (a, b) in x.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{x:?}");
        }
        let mut r = vec![1.0, 2.0, 3.0];
        softmax(&mut r);
        assert!((r.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((r[2] - 0.665_240_94).abs() < 1e-6, "{r:?}");
    }
}
