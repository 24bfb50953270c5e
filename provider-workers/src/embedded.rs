//! The embedded engine: SmolLM2-135M-Instruct in this process, on CPU
//! (`local.engine = "embedded"`, or `"auto"` when the model file exists).
//!
//! One continuous-batching loop ([`BatchEngine`]) runs on its own thread:
//! every active sequence advances in each step (one weight read serves them
//! all, the products split across the cores), new sequences join between
//! steps with their prompts read in chunks, finished ones leave. At most
//! `local.embedded.max_concurrent` sequences are active and their KV caches
//! reserve at most `max_kv_cache_mib`; the rest wait in line until their
//! deadline (`max_queue` of them, then requests are refused as overloaded).
//! A deadline, a cancelled stream or a dropped request stops a sequence
//! without touching the others.

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use optiroute_common::config::EmbeddedConfig;
use optiroute_common::nats::RequestMeta;
use optiroute_common::wire::{ProviderRequest, Role as WireRole, Usage};
use optiroute_common::{Error, ErrorKind};
use optiroute_local_model::{
    BatchEngine, EmbeddedModel, GenerateError, GenerateParams, Role, SchedulerConfig, Turn,
    MODEL_NAME,
};

use crate::engine::{ChunkSink, Engine, Generation};
use crate::metrics::ProviderMetrics;

pub use optiroute_local_model::MODEL_NAME as EMBEDDED_MODEL;

/// The model crate names its model; the protocol's catalogue (what the
/// ingress lists) must say the same, checked when this crate compiles.
const _: () = assert!(
    same_str(
        MODEL_NAME,
        optiroute_common::protocol::models::EMBEDDED_MODEL
    ),
    "protocol::models::EMBEDDED_MODEL differs from the local model's MODEL_NAME"
);

const fn same_str(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Active sequences when `max_concurrent` is 0.
const DEFAULT_MAX_ACTIVE: usize = 16;

pub struct EmbeddedEngine {
    model: Arc<EmbeddedModel>,
    batch: BatchEngine,
    cfg: EmbeddedConfig,
    speed: prometheus::Histogram,
    queue_wait: prometheus::Histogram,
}

/// Sets the flag when dropped: a request future that goes away (the
/// requester cancelled, the worker shut down) stops its generation.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn to_error(e: GenerateError) -> Error {
    match e {
        GenerateError::DeadlineExceeded { completion_tokens } => Error::new(
            ErrorKind::Timeout,
            format!("the deadline passed during generation ({completion_tokens} tokens generated)"),
        ),
        GenerateError::QueueTimeout { .. } => Error::new(
            ErrorKind::Timeout,
            "the deadline passed while waiting for a free embedded-model slot",
        ),
        GenerateError::QueueFull { queued } => Error::new(
            ErrorKind::Overloaded,
            format!("the embedded model is busy: {queued} generations are already waiting"),
        ),
        GenerateError::Cancelled => Error::new(ErrorKind::Cancelled, "generation was cancelled"),
        GenerateError::PromptTooLong { tokens, limit } => Error::bad_request(format!(
            "the prompt is {tokens} tokens; the embedded model takes at most {limit} (prompt and answer)"
        )),
        // Not the caller's fault: this pool's memory cap. Overloaded lets
        // the router take it to the other pool.
        GenerateError::TooBigForCache { needed, cap } => Error::new(
            ErrorKind::Overloaded,
            format!(
                "the prompt and max_tokens need {} MiB of KV cache; local.embedded.max_kv_cache_mib is {} (lower max_tokens)",
                needed.div_ceil(1 << 20),
                cap >> 20
            ),
        ),
        other => Error::internal(format!("embedded model: {other}")),
    }
}

impl EmbeddedEngine {
    /// Loads the model file and starts the batching loop (blocking: call
    /// it off the async runtime, e.g. in `spawn_blocking`). The error names
    /// the file and how to fetch it.
    pub fn load(cfg: &EmbeddedConfig, metrics: &ProviderMetrics) -> Result<Self, Error> {
        let model = EmbeddedModel::load(Path::new(&cfg.model_path))
            .map_err(|e| Error::new(ErrorKind::NotConfigured, e.to_string()))?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let sched = SchedulerConfig {
            max_active: if cfg.max_concurrent == 0 {
                DEFAULT_MAX_ACTIVE
            } else {
                cfg.max_concurrent
            },
            max_queue: cfg.max_queue,
            max_kv_bytes: cfg.max_kv_cache_mib.saturating_mul(1 << 20),
            prefill_chunk: cfg.prefill_chunk,
            threads: if cfg.threads == 0 { cores } else { cfg.threads },
        };
        let info = model.info();
        tracing::info!(
            path = %info.path.display(),
            load_ms = info.load_time.as_millis() as u64,
            weights_mib = info.weight_bytes >> 20,
            kernels = info.kernels,
            huge_pages = info.huge_pages,
            max_active = sched.max_active,
            max_kv_cache_mib = cfg.max_kv_cache_mib,
            threads = sched.threads,
            "embedded model {MODEL_NAME} loaded"
        );
        let model = Arc::new(model);
        let batch = BatchEngine::start(Arc::clone(&model), sched)
            .map_err(|e| Error::internal(format!("cannot start the embedded engine: {e}")))?;
        Ok(EmbeddedEngine {
            model,
            batch,
            cfg: cfg.clone(),
            speed: metrics
                .generation_speed
                .with_label_values(&["local", MODEL_NAME]),
            queue_wait: metrics.queue_wait.with_label_values(&["local"]),
        })
    }

    async fn run(
        &self,
        meta: &RequestMeta,
        req: &ProviderRequest,
        sink: Option<&mut ChunkSink>,
    ) -> Result<Generation, Error> {
        let remaining = meta.remaining();
        // The requester's deadline, fixed now: tokenizing takes from it.
        let deadline = Instant::now() + remaining;
        if remaining.is_zero() {
            return Err(to_error(GenerateError::QueueTimeout {
                waited: Duration::ZERO,
            }));
        }
        // Tokenizing a long prompt takes a while: off the async runtime.
        let messages = req.conversation().into_owned();
        let model = Arc::clone(&self.model);
        let prompt = tokio::task::spawn_blocking(move || {
            let turns: Vec<Turn<'_>> = messages
                .iter()
                .map(|m| {
                    let role = match m.role {
                        WireRole::System => Role::System,
                        WireRole::User => Role::User,
                        WireRole::Assistant => Role::Assistant,
                    };
                    Turn::new(role, &m.content)
                })
                .collect();
            model.tokenizer().chat_prompt(&turns)
        })
        .await
        .map_err(|e| Error::internal(format!("embedded model tokenizer task: {e}")))?
        .map_err(|e| Error::internal(format!("embedded model tokenizer: {e}")))?;

        let cancel = Arc::new(AtomicBool::new(false));
        let _stop_on_drop = CancelOnDrop(Arc::clone(&cancel));
        let params = GenerateParams {
            max_tokens: req.max_tokens,
            temperature: req.temperature,
            top_p: req.top_p,
            stop: req.stop.clone(),
            repeat_penalty: self.cfg.repeat_penalty,
            repeat_last_n: self.cfg.repeat_last_n,
            seed: self.cfg.seed,
            deadline: Some(deadline),
            cancel: Some(Arc::clone(&cancel)),
        };
        // Pieces are at most max_tokens (bounded by the request).
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let streaming = sink.is_some();
        self.batch.submit(
            prompt,
            params,
            Box::new(move |piece| {
                if streaming && tx.send(piece.to_string()).is_err() {
                    return ControlFlow::Break(());
                }
                ControlFlow::Continue(())
            }),
            Box::new(move |result| {
                let _ = done_tx.send(result);
            }),
        );
        if let Some(sink) = sink {
            // Ends when the sequence ends (its callback, the sender, is dropped).
            while let Some(piece) = rx.recv().await {
                if let Err(e) = sink.send(&piece).await {
                    cancel.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
        let completion = done_rx
            .await
            .map_err(|_| Error::internal("the embedded engine stopped"))?
            .map_err(to_error)?;
        self.queue_wait.observe(completion.queued.as_secs_f64());
        let speed = completion.tokens_per_second();
        if speed > 0.0 {
            self.speed.observe(speed);
        }
        Ok(Generation {
            text: completion.text,
            usage: Usage::new(
                completion.prompt_tokens,
                completion.completion_tokens,
                false,
            ),
            model: MODEL_NAME.to_string(),
            finish_reason: Some(completion.finish_reason.as_str().to_string()),
            // Prompt processing and decoding; not the wait in line.
            compute_seconds: Some(completion.compute.as_secs_f64()),
        })
    }

    /// Free places in the batch right now (active and waiting sequences
    /// both take one).
    pub fn free_slots(&self) -> usize {
        let load = self.batch.load();
        load.max_active.saturating_sub(load.active + load.queued)
    }

    /// The load, for the NATS service stats (`$SRV.STATS`): active
    /// sequences, queue length, tokens/s.
    pub fn stats(&self) -> serde_json::Value {
        let l = self.batch.load();
        serde_json::json!({
            "engine": "embedded",
            "model": MODEL_NAME,
            "active_sequences": l.active,
            "max_active_sequences": l.max_active,
            "queued_sequences": l.queued,
            "tokens_per_second": (l.tokens_per_second * 10.0).round() / 10.0,
            "generated_tokens_total": l.generated_total,
            "kv_cache_bytes": l.kv_bytes,
            "kv_cache_max_bytes": l.max_kv_bytes,
        })
    }

    pub fn model(&self) -> &EmbeddedModel {
        &self.model
    }
}

impl Engine for EmbeddedEngine {
    async fn generate(
        &self,
        meta: &RequestMeta,
        req: &ProviderRequest,
        sink: Option<&mut ChunkSink>,
    ) -> Result<Generation, Error> {
        self.run(meta, req, sink).await
    }

    fn ready(&self) -> Result<(), String> {
        if self.batch.is_running() {
            Ok(())
        } else {
            Err("the embedded engine's loop has stopped".into())
        }
    }
}

/// Loads the engine off the async runtime.
pub async fn load(
    cfg: &EmbeddedConfig,
    metrics: &ProviderMetrics,
) -> Result<EmbeddedEngine, Error> {
    let cfg = cfg.clone();
    let metrics = metrics.clone();
    let started = Instant::now();
    let engine = tokio::task::spawn_blocking(move || EmbeddedEngine::load(&cfg, &metrics))
        .await
        .map_err(|e| Error::internal(format!("loading the embedded model: {e}")))??;
    if started.elapsed() > Duration::from_secs(10) {
        tracing::warn!(
            seconds = started.elapsed().as_secs_f64(),
            "loading the embedded model was slow"
        );
    }
    Ok(engine)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The real model file, fetched by `scripts/fetch-model.sh` when missing.
    fn config(max_concurrent: usize) -> EmbeddedConfig {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = std::process::Command::new("bash")
            .arg(root.join("scripts/fetch-model.sh"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        EmbeddedConfig {
            model_path: root
                .join(optiroute_local_model::DEFAULT_MODEL_PATH)
                .to_string_lossy()
                .into_owned(),
            max_concurrent,
            ..EmbeddedConfig::default()
        }
    }

    fn meta(deadline: Duration) -> RequestMeta {
        RequestMeta::new("t".into(), deadline)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn answers_with_real_tokens_and_honours_deadlines() {
        let metrics = ProviderMetrics::new("local-test");
        let engine = load(&config(1), &metrics).await.unwrap();
        let mut req = ProviderRequest::new("What is the capital of France?");
        req.max_tokens = 96;
        let g = engine
            .generate(&meta(Duration::from_secs(60)), &req, None)
            .await
            .unwrap();
        assert_eq!(g.model, "SmolLM2-135M-Instruct");
        assert!(g.text.contains("Paris"), "{:?}", g.text);
        assert_eq!(g.finish_reason.as_deref(), Some("stop"));
        assert!(
            g.usage.prompt_tokens > 20 && !g.usage.estimated,
            "{:?}",
            g.usage
        );
        assert!(g.usage.completion_tokens > 0 && g.usage.completion_tokens < 96);

        // A deadline during generation stops it with a timeout.
        let mut long = ProviderRequest::new("Write a long story about the sea.");
        long.max_tokens = 2000;
        let started = Instant::now();
        let e = engine
            .generate(&meta(Duration::from_millis(400)), &long, None)
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Timeout, "{}", e.message);
        assert!(started.elapsed() < Duration::from_secs(3));

        // With one slot, a second request queues; past its deadline it
        // times out without generating.
        let engine = Arc::new(engine);
        let first = {
            let engine = Arc::clone(&engine);
            let mut req = req.clone();
            req.max_tokens = 48;
            tokio::spawn(async move {
                engine
                    .generate(&meta(Duration::from_secs(60)), &req, None)
                    .await
            })
        };
        // Until the first holds the only slot (bounded).
        for _ in 0..2000 {
            if engine.free_slots() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(engine.free_slots(), 0, "the first generation never started");
        let e = engine
            .generate(&meta(Duration::from_millis(100)), &req, None)
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Timeout, "{}", e.message);
        assert!(e.message.contains("slot"), "{}", e.message);
        assert!(first.await.unwrap().is_ok());
        assert_eq!(engine.free_slots(), 1);

        // A request that waited for the slot is charged for its compute
        // only: the wait behind a long generation is not in compute_seconds.
        let first = {
            let engine = Arc::clone(&engine);
            let mut long = long.clone();
            long.max_tokens = 64;
            tokio::spawn(async move {
                engine
                    .generate(&meta(Duration::from_secs(60)), &long, None)
                    .await
            })
        };
        // Until the long generation holds the only slot (bounded).
        for _ in 0..2000 {
            if engine.free_slots() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(engine.free_slots(), 0, "the long generation never started");
        let mut short = req.clone();
        short.max_tokens = 4;
        let started = Instant::now();
        let g = engine
            .generate(&meta(Duration::from_secs(60)), &short, None)
            .await
            .unwrap();
        let wall = started.elapsed().as_secs_f64();
        let first = first.await.unwrap().unwrap();
        let compute = g.compute_seconds.unwrap();
        assert!(compute > 0.0);
        // It waited about the whole first generation, and that wait is
        // not in its compute.
        let first_compute = first.compute_seconds.unwrap();
        assert!(
            wall - compute > 0.5 * first_compute,
            "wall {wall:.3} s, compute {compute:.3} s, first's compute {first_compute:.3} s"
        );
        assert!(
            metrics
                .queue_wait
                .with_label_values(&["local"])
                .get_sample_count()
                >= 3
        );
    }

    #[tokio::test]
    async fn a_missing_model_file_is_a_clear_error() {
        let metrics = ProviderMetrics::new("local-test");
        let cfg = EmbeddedConfig {
            model_path: "/nonexistent/model.gguf".into(),
            ..EmbeddedConfig::default()
        };
        let e = load(&cfg, &metrics).await.err().unwrap();
        assert!(
            e.message.contains("/nonexistent/model.gguf"),
            "{}",
            e.message
        );
        assert!(
            e.message.contains("scripts/fetch-model.sh"),
            "{}",
            e.message
        );
    }
}
