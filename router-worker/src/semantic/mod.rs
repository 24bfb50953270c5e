//! The semantic cache: answers a prompt with the cached answer of another
//! prompt of the same meaning, precisely or not at all.
//!
//! - Each answer the exact cache stores for a request that asked for it
//!   also gets an entry here: its question's embedding, the question, and
//!   the partition (see [`crate::cache::semantic_partition`]), stored in a
//!   JetStream KV bucket of its own (`<cache.bucket>-semantic`, the same
//!   TTL) under the answer's exact key. Every router keeps all live entries
//!   in memory ([`index`]), fed by a watch on the bucket, so the replicas
//!   share one index and a lookup makes no KV round trip.
//! - A lookup (after an exact miss, only for requests that ask) searches
//!   its own partition only: other tenants, namespaces, conversations,
//!   sampling settings, pools and models are never candidates. A candidate
//!   must score at least `cache.semantic.threshold`, pass the lexical
//!   [`guard`], and its exact key must be the key of this very request with
//!   the candidate's question in it (so a value forged into the bucket
//!   cannot point a partition at another's answer).

pub mod calibrate;
pub mod guard;
pub mod index;
mod lexicon;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use optiroute_common::config::{CacheConfig, SemanticConfig};
use optiroute_common::nats::epoch_ms;
use optiroute_common::wire::{self, Format};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::embedding::RequestEmbedding;
use crate::metrics::RouterMetrics;
use guard::Features;
use index::{Index, Item};

/// Names what a stored value is and the version of its layout.
pub const TAG: &str = "optiroute.semantic.v1";

/// all-MiniLM-L6-v2's output size.
pub const DIMS: usize = 384;

/// The longest question stored, in bytes (the model reads 256 tokens).
const MAX_QUESTION_BYTES: usize = 8 * 1024;

#[derive(Serialize, Deserialize)]
struct Stored {
    tag: String,
    /// The exact cache key of the answer (also this value's key).
    key: String,
    partition: String,
    question: String,
    vector: Vec<f32>,
    /// When it was written, in Unix milliseconds (it expires a TTL later).
    written_ms: u64,
}

/// Why the semantic cache did not answer: a bounded metric label and the
/// reason given in the reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Miss {
    pub outcome: &'static str,
    pub reason: String,
}

impl Miss {
    pub fn new(outcome: &'static str, reason: impl Into<String>) -> Self {
        Miss {
            outcome,
            reason: reason.into(),
        }
    }
}

pub struct SemanticCache {
    cfg: SemanticConfig,
    /// Whether this router serves semantic lookups at all (the cache and
    /// the feature on, and the model loaded).
    active: bool,
    bucket: String,
    ttl: Duration,
    replicas: usize,
    max_bytes: i64,
    op_timeout: Duration,
    /// A std `Mutex`: held for an insert or a scan of one partition, never
    /// across an await.
    index: Mutex<Index>,
    store: OnceLock<kv::Store>,
    metrics: RouterMetrics,
}

impl SemanticCache {
    pub fn new(
        cache: &CacheConfig,
        replicas: usize,
        active: bool,
        metrics: RouterMetrics,
    ) -> Arc<Self> {
        Arc::new(SemanticCache {
            cfg: cache.semantic.clone(),
            active,
            bucket: format!("{}-semantic", cache.bucket),
            ttl: Duration::from_secs(cache.ttl_secs),
            replicas,
            // An entry is a question and its vector (1.5 KB), about what an
            // answer weighs; a quarter of the cache's room holds the vectors
            // of the answers that are asked about in other words.
            max_bytes: (cache.max_bytes / 4).max(1 << 20),
            op_timeout: Duration::from_millis(cache.op_timeout_ms.max(1000)),
            index: Mutex::new(Index::new(cache.semantic.max_entries)),
            store: OnceLock::new(),
            metrics,
        })
    }

    pub fn config(&self) -> &SemanticConfig {
        &self.cfg
    }

    /// Whether the request asks for the semantic cache (`semantic`, else
    /// the router's default).
    pub fn asked(&self, semantic: Option<bool>) -> bool {
        semantic.unwrap_or(self.cfg.enabled)
    }

    /// Whether this router serves semantic lookups (see [`Self::spawn`]).
    pub fn active(&self) -> bool {
        self.active
    }

    pub fn is_connected(&self) -> bool {
        self.store.get().is_some()
    }

    /// Entries in this router's index.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens the bucket and keeps the index fed from it until `shutdown`,
    /// reconnecting the watch when it ends; stale entries are pruned as
    /// their TTL passes.
    /// Does nothing when the router is not [`Self::active`].
    pub fn spawn(self: &Arc<Self>, js: jetstream::Context, shutdown: CancellationToken) {
        if !self.active {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(100);
            loop {
                match me.open(&js).await {
                    Ok(store) => {
                        let _ = me.store.set(store.clone());
                        delay = Duration::from_millis(100);
                        me.follow(&store, &shutdown).await;
                    }
                    Err(e) => {
                        tracing::warn!(bucket = %me.bucket, error = %e, "semantic bucket unavailable; semantic lookups miss")
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        });
    }

    async fn open(&self, js: &jetstream::Context) -> Result<kv::Store, String> {
        let timeout = Duration::from_secs(5);
        if let Ok(Ok(store)) = tokio::time::timeout(timeout, js.get_key_value(&self.bucket)).await {
            return Ok(store);
        }
        let config = kv::Config {
            bucket: self.bucket.clone(),
            description: "OptiRoute semantic cache: prompt vectors of cached answers".into(),
            history: 1,
            max_age: self.ttl,
            max_bytes: self.max_bytes,
            num_replicas: self.replicas,
            ..Default::default()
        };
        match tokio::time::timeout(timeout, js.create_key_value(config)).await {
            Ok(Ok(store)) => Ok(store),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out creating the bucket".into()),
        }
    }

    /// Feeds the index from the bucket (every live entry, then each change)
    /// until the watch ends or `shutdown`.
    async fn follow(&self, store: &kv::Store, shutdown: &CancellationToken) {
        let watch = tokio::time::timeout(self.op_timeout, store.watch_with_history(">")).await;
        let Ok(Ok(mut watch)) = watch else {
            tracing::warn!(bucket = %self.bucket, "cannot watch the semantic bucket; retrying");
            return;
        };
        tracing::info!(bucket = %self.bucket, "semantic index following its bucket");
        let mut prune = tokio::time::interval(Duration::from_secs(1).min(self.ttl));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = prune.tick() => {
                    let mut ix = self.lock();
                    ix.prune(epoch_ms(SystemTime::now()));
                    self.metrics.semantic_entries.set(i64::try_from(ix.len()).unwrap_or(i64::MAX));
                }
                entry = watch.next() => match entry {
                    Some(Ok(entry)) => self.apply(entry),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "semantic watch failed; reconnecting");
                        return;
                    }
                    None => {
                        tracing::warn!("semantic watch ended; reconnecting");
                        return;
                    }
                },
            }
        }
    }

    fn apply(&self, entry: kv::Entry) {
        if entry.operation != kv::Operation::Put {
            self.lock().remove(&entry.key);
            return;
        }
        let Some(stored) = decode(&entry.key, &entry.value) else {
            tracing::warn!("semantic entry rejected (not a valid entry for its key)");
            return;
        };
        // One entry the guard cannot read must not end the watch (and with
        // it this router's copy of every other replica's entries).
        let indexed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.index_entry(stored);
        }));
        if indexed.is_err() {
            tracing::error!(key = %entry.key, "semantic entry could not be indexed; skipped");
        }
    }

    fn index_entry(&self, stored: Stored) {
        let now = epoch_ms(SystemTime::now());
        let expires_ms = stored
            .written_ms
            .saturating_add(u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX));
        let item = Item {
            features: Arc::new(Features::of(&stored.question)),
            key: stored.key,
            question: Arc::from(stored.question),
            vector: Arc::new(stored.vector),
            expires_ms,
        };
        let mut ix = self.lock();
        if !ix.insert(&stored.partition, item, now) {
            tracing::debug!("semantic index full; entry left out until others expire");
        }
        self.metrics
            .semantic_entries
            .set(i64::try_from(ix.len()).unwrap_or(i64::MAX));
    }

    /// The stored answer's key for `question` in `partition`, if a
    /// candidate is close enough, passes the guard and `same_request`
    /// (the candidate's question and key: whether its key is this
    /// request's key with that question).
    pub async fn find(
        &self,
        partition: &str,
        question: &str,
        embedding: &RequestEmbedding<'_>,
        same_request: impl Fn(&str, &str) -> bool,
    ) -> Result<(String, f32), Miss> {
        if !self.is_connected() {
            return Err(Miss::new(
                "not_ready",
                format!("the semantic bucket {} is not open yet", self.bucket),
            ));
        }
        if embedding.too_long() {
            return Err(Miss::new(
                "too_long",
                "the question is longer than the 256 tokens the embedding model reads",
            ));
        }
        let vector = embedding
            .get()
            .await
            .map_err(|e| Miss::new("unavailable", e.message))?;
        // The scan runs outside the lock (the partition is shared, copied
        // on write), so a large one does not hold up other lookups.
        let items = self.lock().partition(partition);
        let search = index::search(
            items.as_deref().map_or(&[], |v| v),
            &vector,
            self.cfg.threshold,
            epoch_ms(SystemTime::now()),
        );
        let Some(best) = search.best else {
            return Err(Miss::new(
                "no_entries",
                "no stored question in this scope with the same settings",
            ));
        };
        if search.candidates.is_empty() {
            return Err(Miss::new(
                "below_threshold",
                format!(
                    "the closest stored question scores {best:.3}, below the threshold {}",
                    self.cfg.threshold
                ),
            ));
        }
        let mine = Features::of(question);
        let mut refused = None;
        for c in &search.candidates {
            if self.cfg.guard {
                if let Err(why) = guard::check(&mine, &c.item.features) {
                    refused.get_or_insert((why, c.similarity));
                    continue;
                }
            }
            if !same_request(&c.item.question, &c.item.key) {
                tracing::warn!("semantic entry does not match its key; ignored");
                continue;
            }
            return Ok((c.item.key.clone(), c.similarity));
        }
        Err(match refused {
            Some((why, s)) => Miss::new(
                guard_outcome(why),
                format!(
                    "the closest stored question (similarity {s:.3}) differs in {}",
                    why.as_str()
                ),
            ),
            None => Miss::new("entry_gone", "no valid candidate"),
        })
    }

    /// Stores the question's vector for the answer under `key` (written to
    /// the exact cache already). Failures are logged, never returned.
    pub async fn put(&self, key: &str, partition: &str, question: &str, vector: &[f32]) {
        let Some(store) = self.store.get() else {
            return;
        };
        if question.len() > MAX_QUESTION_BYTES {
            return;
        }
        let stored = Stored {
            tag: TAG.into(),
            key: key.into(),
            partition: partition.into(),
            question: question.trim().into(),
            vector: vector.to_vec(),
            written_ms: epoch_ms(SystemTime::now()),
        };
        let Ok(bytes) = wire::encode(Format::MsgPack, &stored) else {
            return;
        };
        match tokio::time::timeout(self.op_timeout, store.put(key, bytes)).await {
            // Indexed here at once; the watch brings it to the other replicas.
            Ok(Ok(_)) => self.index_entry(stored),
            Ok(Err(e)) => tracing::warn!(error = %e, "semantic entry write failed"),
            Err(_) => tracing::warn!("semantic entry write timed out"),
        }
    }
}

fn guard_outcome(why: guard::Refusal) -> &'static str {
    use guard::Refusal::*;
    match why {
        Numbers => "guard_numbers",
        Negation => "guard_negation",
        Opposite => "guard_opposite",
        Entities => "guard_entities",
        Quoted => "guard_quoted",
        Format => "guard_format",
        Language => "guard_language",
        Substitution => "guard_substitution",
        Order => "guard_order",
        Script => "guard_script",
    }
}

/// A stored value, if it is a well-formed entry written for `key`.
fn decode(key: &str, value: &[u8]) -> Option<Stored> {
    let s: Stored = rmp_serde::from_slice(value).ok()?;
    let norm: f32 = s.vector.iter().map(|x| x * x).sum();
    let ok = s.tag == TAG
        && s.key == key
        && s.vector.len() == DIMS
        && s.vector.iter().all(|x| x.is_finite())
        && (norm - 1.0).abs() < 1e-3
        && s.question.len() <= MAX_QUESTION_BYTES
        && s.partition.len() == 64;
    ok.then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(key: &str) -> Stored {
        let mut vector = vec![0.0; DIMS];
        vector[0] = 1.0;
        Stored {
            tag: TAG.into(),
            key: key.into(),
            partition: "p".repeat(64),
            question: "q".into(),
            vector,
            written_ms: 1,
        }
    }

    #[test]
    fn only_well_formed_entries_of_their_own_key_are_read() {
        let enc = |s: &Stored| wire::encode(Format::MsgPack, s).unwrap();
        assert!(decode("k", &enc(&stored("k"))).is_some());
        assert!(decode("other", &enc(&stored("k"))).is_none());
        let mut s = stored("k");
        s.vector[1] = 1.0;
        assert!(decode("k", &enc(&s)).is_none(), "not normalised");
        let mut s = stored("k");
        s.vector.pop();
        assert!(decode("k", &enc(&s)).is_none(), "wrong size");
        let mut s = stored("k");
        s.tag = "x".into();
        assert!(decode("k", &enc(&s)).is_none());
        assert!(decode("k", b"\xc1junk").is_none());
    }
}
