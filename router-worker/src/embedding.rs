//! The prompt's sentence embedding, for the features that need one (the
//! semantic cache, the learned router): the model is loaded once per
//! router, each request's embedding is computed at most once and only when
//! first asked for, on the blocking pool with bounded concurrency.

use std::sync::Arc;
use std::time::Instant;

use optiroute_common::config::EmbeddingConfig;
use optiroute_common::{Error, ErrorKind};
use optiroute_embed::Embedder;
use tokio::sync::{OnceCell, Semaphore};

/// The router's embedding model, if loaded.
pub struct Embeddings {
    model: Option<Arc<Embedder>>,
    /// Why there is no model (logged once at startup, shown in errors).
    missing: Option<String>,
    /// Held by each embedding until it has run (not just until its caller
    /// stops waiting), so at most this many run at once.
    permits: Arc<Semaphore>,
    /// Seconds per embedding (`llm_embedding_seconds` when registered).
    pub seconds: Option<prometheus::Histogram>,
}

impl Embeddings {
    /// Loads the model when `needed`; a missing or unreadable model leaves
    /// the embeddings unavailable (with the reason), not the router down.
    pub fn load(cfg: &EmbeddingConfig, needed: bool) -> Self {
        let (model, missing) = if !needed {
            (
                None,
                Some("no feature that needs embeddings is on".to_string()),
            )
        } else {
            match Embedder::load(&cfg.model_dir) {
                Ok(m) => {
                    tracing::info!(dir = %cfg.model_dir, "embedding model loaded");
                    (Some(Arc::new(m)), None)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "embedding model unavailable");
                    (None, Some(e.to_string()))
                }
            }
        };
        Embeddings {
            model,
            missing,
            permits: Arc::new(Semaphore::new(cfg.max_concurrent.max(1))),
            seconds: None,
        }
    }

    /// Embeddings of a model already loaded (tests, benches).
    pub fn with_model(model: Arc<Embedder>, max_concurrent: usize) -> Self {
        Embeddings {
            model: Some(model),
            missing: None,
            permits: Arc::new(Semaphore::new(max_concurrent.max(1))),
            seconds: None,
        }
    }

    pub fn available(&self) -> bool {
        self.model.is_some()
    }

    /// Whether `text` is longer than the model reads (its end would not
    /// count in its vector). False without a model.
    pub fn too_long(&self, text: &str) -> bool {
        self.model
            .as_ref()
            .is_some_and(|m| m.count_tokens(text) > optiroute_embed::MAX_TOKENS)
    }

    /// Why embeddings are unavailable, when they are.
    pub fn missing(&self) -> Option<&str> {
        self.missing.as_deref()
    }

    /// The L2-normalised embedding of `text` (384 dimensions).
    pub async fn embed(&self, text: &str) -> Result<Arc<Vec<f32>>, Error> {
        self.embed_with(text, true)
            .await?
            .ok_or_else(|| Error::internal("no embedding"))
    }

    /// [`Self::embed`] only if a slot is free now (`Ok(None)` otherwise):
    /// for work nobody waits for, which must not queue behind requests.
    pub async fn embed_if_idle(&self, text: &str) -> Result<Option<Arc<Vec<f32>>>, Error> {
        self.embed_with(text, false).await
    }

    async fn embed_with(&self, text: &str, wait: bool) -> Result<Option<Arc<Vec<f32>>>, Error> {
        let Some(model) = self.model.clone() else {
            return Err(Error::new(
                ErrorKind::NotConfigured,
                format!(
                    "the embedding model is not loaded: {}",
                    self.missing.as_deref().unwrap_or("unknown")
                ),
            ));
        };
        let permit = if wait {
            self.permits
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| Error::internal("embedding permits closed"))?
        } else {
            match self.permits.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => return Ok(None),
            }
        };
        let text = text.to_string();
        let started = Instant::now();
        let v = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            model.embed(&text)
        })
        .await
        .map_err(|e| Error::internal(format!("embedding task: {e}")))?;
        if let Some(h) = &self.seconds {
            h.observe(started.elapsed().as_secs_f64());
        }
        Ok(Some(Arc::new(v)))
    }
}

/// One request's embedding: computed on first [`RequestEmbedding::get`],
/// then shared by every feature that asks.
pub struct RequestEmbedding<'a> {
    embeddings: &'a Embeddings,
    text: &'a str,
    cell: OnceCell<Arc<Vec<f32>>>,
}

impl<'a> RequestEmbedding<'a> {
    pub fn new(embeddings: &'a Embeddings, text: &'a str) -> Self {
        RequestEmbedding {
            embeddings,
            text,
            cell: OnceCell::new(),
        }
    }

    pub fn available(&self) -> bool {
        self.embeddings.available()
    }

    /// The text embedded.
    pub fn text(&self) -> &'a str {
        self.text
    }

    /// See [`Embeddings::too_long`].
    pub fn too_long(&self) -> bool {
        self.embeddings.too_long(self.text)
    }

    pub async fn get(&self) -> Result<Arc<Vec<f32>>, Error> {
        self.cell
            .get_or_try_init(|| self.embeddings.embed(self.text))
            .await
            .cloned()
    }

    /// The embedding if some feature computed it already.
    pub fn computed(&self) -> Option<Arc<Vec<f32>>> {
        self.cell.get().cloned()
    }
}
