//! The handler's use of the semantic cache: a lookup after an exact miss,
//! and, once an answer is in the exact cache, its question's vector.

use std::sync::Arc;
use std::time::Duration;

use optiroute_common::wire::CacheMatch;

use super::{Call, GenerateHandler, Reused};
use crate::cache::{key_with_question, semantic_partition, CachedAnswer};
use crate::embedding::Embeddings;
use crate::semantic::{Miss, SemanticCache};

/// The longest a semantic lookup may take (the embedding, queued behind
/// `router.embedding.max_concurrent` others, and the search).
const MAX_LOOKUP: Duration = Duration::from_secs(2);

/// What the background write after an answer needs to index its question.
pub(super) struct PendingVector {
    semantic: Arc<SemanticCache>,
    embeddings: Arc<Embeddings>,
    partition: String,
    question: String,
    vector: Option<Arc<Vec<f32>>>,
}

impl PendingVector {
    /// Stores the question's vector for the answer just written under `key`
    /// (embedding it now if the lookup did not, and only when an embedding
    /// slot is free: this work waits for nobody and must not queue behind
    /// the requests' lookups).
    pub(super) async fn write(self, key: &str) {
        let vector = match self.vector {
            Some(v) => v,
            None if !self.semantic.is_connected() => return,
            None => match self.embeddings.embed_if_idle(&self.question).await {
                Ok(Some(v)) => v,
                Ok(None) => {
                    tracing::debug!("no embedding slot free; the answer is not indexed");
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "no vector for the semantic cache");
                    return;
                }
            },
        };
        self.semantic
            .put(key, &self.partition, &self.question, &vector)
            .await;
    }
}

impl Reused {
    fn semantic(hit: &CachedAnswer, similarity: f32) -> Self {
        let mut r = Reused::from_cache(hit);
        r.matched = CacheMatch::Semantic;
        // Four decimals: enough to compare with the threshold, stable in JSON.
        r.similarity = Some((f64::from(similarity) * 1e4).round() / 1e4);
        r
    }
}

impl GenerateHandler {
    /// Why this router cannot serve the semantic cache, if it cannot.
    fn semantic_unavailable(&self) -> Option<String> {
        if !self.semantic.config().in_use() {
            return Some(
                "the semantic cache is off on this router (cache.semantic.allow_opt_in = false)"
                    .into(),
            );
        }
        if !self.embeddings.available() {
            return Some(format!(
                "the semantic cache is unavailable: {}",
                self.embeddings.missing().unwrap_or("no embedding model")
            ));
        }
        None
    }

    /// Looks for the answer of a stored question of the same meaning; a
    /// miss is counted and its reason kept for the reply.
    pub(super) async fn semantic_lookup(&self, call: &Call<'_>) -> Option<Reused> {
        let found = self.semantic_find(call).await;
        match found {
            Ok(reused) => {
                self.metrics.semantic_outcome("hit");
                Some(reused)
            }
            Err(miss) => {
                self.metrics.semantic_outcome(miss.outcome);
                let _ = call.semantic_miss.set(miss.reason);
                None
            }
        }
    }

    async fn semantic_find(&self, call: &Call<'_>) -> Result<Reused, Miss> {
        if let Some(why) = self.semantic_unavailable() {
            return Err(Miss::new("unavailable", why));
        }
        let pool = call.decision.target;
        let partition = semantic_partition(call.req, pool, call.scope);
        let same_request = |question: &str, key: &str| {
            key_with_question(call.req, pool, call.scope, question) == key
        };
        // Half the time left at most: a long embedding queue must not cost
        // the request its chance to be generated.
        let budget = (call.meta.remaining() / 2).min(MAX_LOOKUP);
        let find = self.semantic.find(
            &partition,
            call.embedding.text(),
            &call.embedding,
            same_request,
        );
        let (key, similarity) = tokio::time::timeout(budget, find).await.map_err(|_| {
            Miss::new(
                "timeout",
                format!("no embedding within {} ms", budget.as_millis()),
            )
        })??;
        match self.cache.fetch(&key).await {
            Some(answer) => Ok(Reused::semantic(&answer, similarity)),
            None => Err(Miss::new(
                "entry_gone",
                "the matching question's answer has left the cache",
            )),
        }
    }

    /// A request that did not reach the lookup (the cache not read) but
    /// asked for the semantic cache: says why it was not used.
    pub(super) fn semantic_skipped(&self, call: &Call<'_>, why: &str) {
        if call.semantic {
            let _ = call.semantic_miss.set(why.to_string());
        }
    }

    /// What to index once this request's answer is in the exact cache, if
    /// the request asked for the semantic cache and this router serves it.
    pub(super) fn pending_vector(&self, call: &Call<'_>) -> Option<PendingVector> {
        if !call.semantic
            || !self.semantic.active()
            || self.semantic_unavailable().is_some()
            || call.embedding.too_long()
        {
            return None;
        }
        Some(PendingVector {
            semantic: self.semantic.clone(),
            embeddings: self.embeddings.clone(),
            partition: semantic_partition(call.req, call.decision.target, call.scope),
            question: call.embedding.text().trim().to_string(),
            vector: call.embedding.computed(),
        })
    }
}
