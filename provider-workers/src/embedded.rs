//! The embedded engine: SmolLM2-135M-Instruct in this process, on CPU
//! (`local.engine = "embedded"`, or `"auto"` when the model file exists).
//!
//! Generation runs on tokio's blocking threads, never on the async runtime.
//! At most `local.embedded.max_concurrent` generations run at once (default:
//! one per core, each on one core); the rest wait in line until their
//! deadline. Weights are shared; each generation has its own KV cache.
//! A deadline, a cancelled stream or a dropped request stops generating.

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use optiroute_common::config::EmbeddedConfig;
use optiroute_common::nats::RequestMeta;
use optiroute_common::wire::{ProviderRequest, Role as WireRole, Usage};
use optiroute_common::{Error, ErrorKind};
use optiroute_local_model::{EmbeddedModel, GenerateError, GenerateParams, Role, Turn, MODEL_NAME};
use tokio::sync::Semaphore;

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

pub struct EmbeddedEngine {
    model: Arc<EmbeddedModel>,
    slots: Arc<Semaphore>,
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

impl EmbeddedEngine {
    /// Loads the model file (blocking: call it off the async runtime, e.g.
    /// in `spawn_blocking`). The error names the file and how to fetch it.
    pub fn load(cfg: &EmbeddedConfig, metrics: &ProviderMetrics) -> Result<Self, Error> {
        let model = EmbeddedModel::load(Path::new(&cfg.model_path))
            .map_err(|e| Error::new(ErrorKind::NotConfigured, e.to_string()))?;
        let info = model.info();
        let slots = if cfg.max_concurrent == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            cfg.max_concurrent
        };
        tracing::info!(
            path = %info.path.display(),
            load_ms = info.load_time.as_millis() as u64,
            weights_mib = info.weight_bytes >> 20,
            kernels = info.kernels,
            max_concurrent = slots,
            "embedded model {MODEL_NAME} loaded"
        );
        Ok(EmbeddedEngine {
            model: Arc::new(model),
            slots: Arc::new(Semaphore::new(slots)),
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
        let timeout = || {
            Error::new(
                ErrorKind::Timeout,
                "the deadline passed while waiting for a free embedded-model slot",
            )
        };
        let remaining = meta.remaining();
        if remaining.is_zero() {
            return Err(timeout());
        }
        let queued = Instant::now();
        let permit = tokio::time::timeout(remaining, Arc::clone(&self.slots).acquire_owned())
            .await
            .map_err(|_| timeout())?
            .map_err(|_| Error::internal("embedded-model slots closed"))?;
        self.queue_wait.observe(queued.elapsed().as_secs_f64());

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
            deadline: Some(Instant::now() + meta.remaining()),
            cancel: Some(Arc::clone(&cancel)),
        };
        let messages = req.conversation().into_owned();
        let model = Arc::clone(&self.model);
        let streaming = sink.is_some();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let task = tokio::task::spawn_blocking(move || {
            let _permit = permit;
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
            model.generate(&turns, &params, &mut |piece| {
                if streaming && tx.send(piece.to_string()).is_err() {
                    return ControlFlow::Break(());
                }
                ControlFlow::Continue(())
            })
        });
        if let Some(sink) = sink {
            // Ends when the generation ends (its sender is dropped).
            while let Some(piece) = rx.recv().await {
                if let Err(e) = sink.send(&piece).await {
                    cancel.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
        let completion = task
            .await
            .map_err(|e| Error::internal(format!("embedded generation task: {e}")))?
            .map_err(|e| match e {
                GenerateError::DeadlineExceeded { completion_tokens } => Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "the deadline passed during generation ({completion_tokens} tokens generated)"
                    ),
                ),
                GenerateError::Cancelled => {
                    Error::new(ErrorKind::Cancelled, "generation was cancelled")
                }
                GenerateError::PromptTooLong { tokens, limit } => Error::bad_request(format!(
                    "the prompt is {tokens} tokens; the embedded model takes at most {limit} (prompt and answer)"
                )),
                other => Error::internal(format!("embedded model: {other}")),
            })?;
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
            // Prompt processing and decoding; not the wait for a slot.
            compute_seconds: Some((completion.first_token + completion.decode).as_secs_f64()),
        })
    }

    /// Free generation slots right now.
    pub fn free_slots(&self) -> usize {
        self.slots.available_permits()
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
        tokio::time::sleep(Duration::from_millis(50)).await;
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
