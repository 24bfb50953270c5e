//! The routing decision the handler asks for: the configured router
//! (`router.routing.kind`), and the feature router whenever the learned one
//! cannot run (no weights file, a corrupt one, no embedding model, or an
//! embedding that failed), with the reason in `route_reason`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use optiroute_common::config::{RouterKind, RoutingConfig};
use optiroute_common::wire::{GenerateRequest, ProviderChoice};
use sha2::{Digest, Sha256};

use crate::embedding::{Embeddings, RequestEmbedding};
use crate::learned::{LearnedRouter, Scored, Weights, BUILT_IN, DIMS};
use crate::routing::{Decision, Router};

pub struct Routing {
    features: Router,
    learned: Option<LearnedRouter>,
    /// Why the configured learned router is not in use (logged once).
    unavailable: Option<String>,
    memo: Memo,
}

/// Recently scored prompts, by SHA-256 of the caller's cache scope (so
/// one tenant cannot time whether another asked the same), `max_tokens`,
/// the last user turn (what is embedded) and the whole text (what the
/// features read), so a repeated prompt, as most cache hits are (routing
/// comes before the cache lookup), is not embedded again. Bounded: emptied
/// when full. A std mutex: the critical sections are a map lookup or
/// insert, never held across an await.
#[derive(Default)]
struct Memo(Mutex<HashMap<[u8; 32], Arc<Scored>>>);

/// Entries kept (each about 150 bytes).
pub const MEMO_ENTRIES: usize = 10_000;

impl Memo {
    fn key(req: &GenerateRequest, scope: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        let question = req.params.last_user_text();
        h.update((scope.len() as u64).to_le_bytes());
        h.update(scope.as_bytes());
        h.update(req.params.max_tokens.to_le_bytes());
        h.update((question.len() as u64).to_le_bytes());
        h.update(question.as_bytes());
        h.update(req.text().as_bytes());
        h.finalize().into()
    }

    fn get(&self, key: &[u8; 32]) -> Option<Arc<Scored>> {
        self.0.lock().ok()?.get(key).cloned()
    }

    fn put(&self, key: [u8; 32], s: Arc<Scored>) {
        if let Ok(mut m) = self.0.lock() {
            if m.len() >= MEMO_ENTRIES {
                m.clear();
            }
            m.insert(key, s);
        }
    }
}

/// The configured weights file, or the built-in weights.
fn load_weights(cfg: &RoutingConfig) -> Result<Weights, String> {
    match &cfg.learned.weights_file {
        Some(path) => Weights::load(path),
        None => Weights::parse(BUILT_IN).map_err(|e| format!("built in: {e}")),
    }
}

impl Routing {
    /// Fails only on an invalid feature configuration; a learned router
    /// that cannot load leaves the feature router in charge.
    pub fn new(cfg: &RoutingConfig) -> Result<Self, optiroute_common::Error> {
        let features = Router::new(cfg)?;
        let (learned, unavailable) = match cfg.kind {
            RouterKind::Features => (None, None),
            RouterKind::Learned => match load_weights(cfg) {
                Ok(w) => {
                    let l = LearnedRouter::new(w, cfg);
                    tracing::info!(
                        weights = cfg.learned.weights_file.as_deref().unwrap_or("built in"),
                        threshold = l.threshold(),
                        "learned router loaded"
                    );
                    (Some(l), None)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "learned router unavailable; routing with features");
                    (None, Some(format!("weights {e}")))
                }
            },
        };
        Ok(Routing {
            features,
            learned,
            unavailable,
            memo: Memo::default(),
        })
    }

    /// Whether routing needs the prompt's embedding (load the model then).
    pub fn needs_embedding(&self) -> bool {
        self.learned.is_some()
    }

    /// Drops the learned router when the embedding model did not load.
    pub fn require_embeddings(mut self, embeddings: &Embeddings) -> Self {
        if self.learned.is_some() && !embeddings.available() {
            let why = embeddings.missing().unwrap_or("unknown");
            tracing::warn!(error = %why, "learned router unavailable (no embedding model); routing with features");
            self.learned = None;
            self.unavailable = Some(format!("embedding model: {why}"));
        }
        self
    }

    /// Why the configured learned router is not in use, if it is not.
    pub fn unavailable(&self) -> Option<&str> {
        self.unavailable.as_deref()
    }

    pub fn features(&self) -> &Router {
        &self.features
    }

    pub fn learned(&self) -> Option<&LearnedRouter> {
        self.learned.as_ref()
    }

    /// The pool for `req`; the embedding is computed only when the learned
    /// router needs it (and then shared with whatever else asks for it).
    /// A prompt scored recently in the same cache `scope` is not embedded again.
    pub async fn decide(
        &self,
        req: &GenerateRequest,
        embedding: &RequestEmbedding<'_>,
        scope: &str,
    ) -> Decision {
        let Some(learned) = self
            .learned
            .as_ref()
            .filter(|_| req.provider == ProviderChoice::Auto)
        else {
            return self.decide_with(req, None);
        };
        let key = Memo::key(req, scope);
        if let Some(s) = self.memo.get(&key) {
            return learned.decision(&s, req.route_bias);
        }
        match embedding.get().await {
            Ok(v) if v.len() != DIMS => self.wrong_size(req, v.len()),
            Ok(v) => {
                let s = Arc::new(learned.scored(&self.features, req, &v));
                self.memo.put(key, s.clone());
                learned.decision(&s, req.route_bias)
            }
            Err(e) => self.fallback(req, &format!("embedding failed: {}", e.message)),
        }
    }

    /// The decision for a request whose embedding is `embedding` (when the
    /// learned router is in use and the request is `auto`, it must be known).
    pub fn decide_with(&self, req: &GenerateRequest, embedding: Option<&[f32]>) -> Decision {
        if req.provider != ProviderChoice::Auto {
            return self.features.decide(req);
        }
        match (&self.learned, embedding) {
            (Some(_), Some(v)) if v.len() != DIMS => self.wrong_size(req, v.len()),
            (Some(l), Some(v)) => l.decide(&self.features, req, v),
            (Some(_), None) => self.fallback(req, "no embedding"),
            (None, _) => match &self.unavailable {
                Some(why) => self.fallback(req, why),
                None => self.features.decide(req),
            },
        }
    }

    /// An embedding of another model's size: the weights cannot read it.
    fn wrong_size(&self, req: &GenerateRequest, dims: usize) -> Decision {
        self.fallback(
            req,
            &format!("the embedding has {dims} dimensions, the weights expect {DIMS}"),
        )
    }

    fn fallback(&self, req: &GenerateRequest, why: &str) -> Decision {
        let mut d = self.features.decide(req);
        d.reason = format!("learned router unavailable ({why}), features: {}", d.reason);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use optiroute_common::wire::Pool;

    /// An embedding of another size (another model configured) is not
    /// read by the weights: the feature router decides and says why.
    #[test]
    fn an_embedding_of_the_wrong_size_falls_back_with_the_reason() {
        let cfg = RoutingConfig {
            kind: RouterKind::Learned,
            ..RoutingConfig::default()
        };
        let r = Routing::new(&cfg).unwrap();
        assert!(r.learned().is_some());
        let req = GenerateRequest::new("Prove that sqrt(2) is irrational.");
        let want = Router::new(&RoutingConfig::default()).unwrap().decide(&req);
        let d = r.decide_with(&req, Some(&[0.1; 768]));
        assert_eq!(d.target, want.target);
        assert!(
            d.reason
                .starts_with("learned router unavailable (the embedding has 768 dimensions, the weights expect 384)"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn features_kind_routes_as_the_feature_router() {
        let cfg = RoutingConfig {
            kind: RouterKind::Features,
            ..RoutingConfig::default()
        };
        let r = Routing::new(&cfg).unwrap();
        assert!(!r.needs_embedding());
        let req = GenerateRequest::new("Prove that sqrt(2) is irrational.");
        let d = r.decide_with(&req, None);
        assert_eq!(
            d,
            Router::new(&RoutingConfig::default()).unwrap().decide(&req)
        );
        assert_eq!(d.target, Pool::Cloud);
    }
}
