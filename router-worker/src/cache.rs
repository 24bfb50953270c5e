//! The response cache in JetStream KV, shared by every router replica, and
//! its placeholders that coalesce identical requests across replicas
//! (within one router, see [`crate::coalesce`]).
//!
//! The cache fails open: a slow or missing KV store turns into an `error`
//! cache event and the request is served without it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::StreamExt;
use optiroute_common::nats::epoch_ms;

use async_nats::jetstream::{self, kv};
use optiroute_common::config::CacheConfig;
use optiroute_common::wire::{Completion, GenerateRequest, Pool};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::metrics::{CacheEvent, RouterMetrics};

pub mod entry;

/// What the cache keeps of an answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedAnswer {
    /// The answer as the provider gave it.
    #[serde(flatten)]
    pub completion: Completion,
    pub provider: Pool,
    pub routed_to: Pool,
    /// What the answer cost when it was generated (the saving of each hit).
    pub cost: f64,
    #[serde(default)]
    pub route_reason: Option<String>,
}

/// Everything that changes the answer, in a fixed order. Version it so a
/// change of the encoding never reads old entries as new ones.
#[derive(Serialize)]
struct KeyMaterial<'a> {
    v: u8,
    prompt: &'a str,
    messages: Vec<(&'a str, &'a str)>,
    stop: &'a [String],
    max_tokens: u32,
    temperature: Option<f32>,
    top_p: Option<f32>,
    /// The pool routing chose, not the provider requested.
    pool: &'a str,
    model_id: Option<&'a str>,
    /// The tenant (and namespace) the answer belongs to; empty, and left
    /// out so keys stay as they were, when answers are shared by everyone.
    #[serde(skip_serializing_if = "str::is_empty")]
    scope: &'a str,
}

/// SHA-256 hex of the canonical encoding of the request: the prompt with
/// whitespace trimmed at both ends (or each message's role and trimmed
/// content), `stop`, `max_tokens`, `temperature`, `top_p`, `model_id`, and
/// `pool`: the pool routing chose for this request, which the caller
/// decides before the lookup.
///
/// The pool stands for everything that routing reads (`provider`,
/// `route_bias`, the score of the prompt, the router's thresholds): two
/// requests for the same text sent to the same pool get the same answer,
/// whatever made routing send them there, and a request sent to the other
/// pool never gets this one's. Cache mode does not change the answer and is
/// left out.
pub fn cache_key(req: &GenerateRequest, pool: Pool) -> String {
    scoped_cache_key(req, pool, "")
}

/// [`cache_key`] within a tenant scope ([`crate::access::Access::cache_scope`]):
/// two scopes never share an entry.
pub fn scoped_cache_key(req: &GenerateRequest, pool: Pool, scope: &str) -> String {
    key_hash(req, pool, scope, false)
}

/// The semantic cache's partition of a request: [`scoped_cache_key`] of
/// everything but its question (the prompt, or the last user turn of a
/// conversation, which is compared by meaning instead). Two requests are
/// candidates for each other only within one partition: same tenant scope
/// and namespace, same conversation before the question, same `stop`,
/// `max_tokens`, `temperature`, `top_p`, pool and model.
pub fn semantic_partition(req: &GenerateRequest, pool: Pool, scope: &str) -> String {
    key_hash(req, pool, scope, true)
}

/// The exact key of `req` with its question (the prompt, or the last user
/// turn) replaced by `question`: the key under which a semantic candidate
/// stored for `question` must have been written to be this request's.
pub fn key_with_question(req: &GenerateRequest, pool: Pool, scope: &str, question: &str) -> String {
    let mut r = req.clone();
    let last_user = r
        .params
        .messages
        .iter()
        .rposition(|m| m.role == optiroute_common::wire::Role::User);
    match last_user {
        Some(i) => r.params.messages[i].content = question.to_string(),
        None => r.params.prompt = question.to_string(),
    }
    scoped_cache_key(&r, pool, scope)
}

fn key_hash(req: &GenerateRequest, pool: Pool, scope: &str, blank_question: bool) -> String {
    let req = &req.params;
    let question = if blank_question {
        req.messages
            .iter()
            .rposition(|m| m.role == optiroute_common::wire::Role::User)
    } else {
        None
    };
    let material = KeyMaterial {
        // Partitions have a version of their own, never equal to a key.
        v: if blank_question { 102 } else { 2 },
        prompt: if blank_question {
            ""
        } else {
            req.prompt.trim()
        },
        messages: req
            .messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let role = match m.role {
                    optiroute_common::wire::Role::System => "system",
                    optiroute_common::wire::Role::User => "user",
                    optiroute_common::wire::Role::Assistant => "assistant",
                };
                let content = if Some(i) == question {
                    ""
                } else {
                    m.content.trim()
                };
                (role, content)
            })
            .collect(),
        stop: &req.stop,
        max_tokens: req.max_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        pool: pool.as_str(),
        model_id: req.model_id.as_deref(),
        scope,
    };
    // rmp-serde cannot fail on this plain struct; fall back to the prompt alone.
    let bytes = rmp_serde::to_vec(&material)
        .unwrap_or_else(|_| format!("{}\n{}", pool.as_str(), material.prompt).into_bytes());
    hex::encode(Sha256::digest(&bytes))
}

pub enum Lookup {
    Hit(Arc<CachedAnswer>),
    Miss,
    Error,
}

/// The outcome of claiming a key across router replicas.
pub enum Claim {
    /// This router generates; its placeholder tells other replicas to wait.
    Owner(Box<Marker>),
    /// Another replica generated the answer while we waited.
    Answer(CachedAnswer),
    /// No coordination possible or the wait ran out: generate without it.
    Proceed,
}

/// A placeholder this router wrote in the answer's own key: `pending:<ms>`,
/// the Unix-millisecond time after which another replica may take over, so
/// a router that dies mid-request blocks nobody for long. Writing the
/// answer replaces it; [`Marker::release`] removes it when there is no
/// answer to cache. One key per request, so the bucket holds no extra
/// markers or tombstones.
pub struct Marker {
    store: kv::Store,
    key: String,
    revision: u64,
}

impl Marker {
    /// Removes the placeholder (only if it is still ours); waiting replicas
    /// then generate themselves.
    pub async fn release(self) {
        if let Err(e) = self
            .store
            .delete_expect_revision(&self.key, Some(self.revision))
            .await
        {
            tracing::debug!(error = %e, "placeholder already replaced or gone");
        }
    }
}

const PENDING_PREFIX: &[u8] = b"pending:";

fn pending_value(until: SystemTime) -> Bytes {
    Bytes::from(format!("pending:{}", epoch_ms(until)))
}

/// The deadline in a placeholder value, or `None` when the value is an answer.
fn pending_until(value: &[u8]) -> Option<u64> {
    let rest = value.strip_prefix(PENDING_PREFIX)?;
    Some(
        std::str::from_utf8(rest)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    )
}

/// Recent answers in memory: a small front for the KV bucket. A std
/// `Mutex` suits it: the critical sections are a hash lookup or insert and
/// never await.
struct Local {
    ttl: Duration,
    max_entries: usize,
    map: Mutex<HashMap<String, (Instant, Arc<CachedAnswer>)>>,
}

impl Local {
    fn get(&self, key: &str) -> Option<Arc<CachedAnswer>> {
        self.get_at(key, Instant::now())
    }

    fn put(&self, key: &str, answer: Arc<CachedAnswer>) {
        self.put_at(key, answer, Instant::now())
    }

    fn get_at(&self, key: &str, now: Instant) -> Option<Arc<CachedAnswer>> {
        if self.max_entries == 0 {
            return None;
        }
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key)
            .filter(|(expires, _)| *expires > now)
            .map(|(_, a)| a.clone())
    }

    fn put_at(&self, key: &str, answer: Arc<CachedAnswer>, now: Instant) {
        if self.max_entries == 0 || self.ttl.is_zero() {
            return;
        }
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= self.max_entries {
            map.retain(|_, (expires, _)| *expires > now);
            if map.len() >= self.max_entries {
                // Still full of live entries: start over rather than track recency.
                map.clear();
            }
        }
        map.insert(key.to_string(), (now + self.ttl, answer));
    }
}

pub struct Cache {
    cfg: CacheConfig,
    /// `nats.replicas`: copies of the bucket.
    replicas: usize,
    local: Local,
    store: OnceLock<kv::Store>,
    metrics: RouterMetrics,
}

impl Cache {
    pub fn new(cfg: CacheConfig, replicas: usize, metrics: RouterMetrics) -> Arc<Self> {
        let local = Local {
            ttl: Duration::from_millis(cfg.local_ttl_ms).min(Duration::from_secs(cfg.ttl_secs)),
            max_entries: cfg.local_max_entries,
            map: Mutex::new(HashMap::new()),
        };
        Arc::new(Cache {
            cfg,
            replicas,
            local,
            store: OnceLock::new(),
            metrics,
        })
    }

    pub fn enabled(&self) -> bool {
        self.cfg.enabled
    }

    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }

    pub fn is_connected(&self) -> bool {
        self.store.get().is_some()
    }

    /// Opens (or creates) the bucket, retrying in the background until it
    /// works, so a router started before JetStream is ready still serves.
    pub fn spawn_open(self: &Arc<Self>, js: jetstream::Context, shutdown: CancellationToken) {
        if !self.cfg.enabled {
            return;
        }
        let cache = self.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(100);
            loop {
                match cache.open(&js).await {
                    Ok(store) => {
                        tracing::info!(bucket = %cache.cfg.bucket, "cache bucket ready");
                        let _ = cache.store.set(store);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cache bucket unavailable; serving without cache")
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
        let existing =
            tokio::time::timeout(timeout, js.get_key_value(self.cfg.bucket.clone())).await;
        if let Ok(Ok(store)) = existing {
            if let Ok(Ok(status)) = tokio::time::timeout(timeout, store.status()).await {
                optiroute_common::nats::check_replicas(
                    "cache",
                    &status.info.config.name,
                    status.info.config.num_replicas,
                    self.replicas,
                );
            }
            return Ok(store);
        }
        let config = kv::Config {
            bucket: self.cfg.bucket.clone(),
            description: "OptiRoute response cache".into(),
            history: 1,
            max_age: Duration::from_secs(self.cfg.ttl_secs),
            max_bytes: self.cfg.max_bytes,
            num_replicas: self.replicas,
            ..Default::default()
        };
        match tokio::time::timeout(timeout, js.create_key_value(config)).await {
            Ok(Ok(store)) => Ok(store),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out creating the bucket".into()),
        }
    }

    /// Looks a key up, bounded by the op timeout; records latency and the event.
    pub async fn lookup(&self, key: &str) -> Lookup {
        let result = self.get(key).await;
        self.metrics.cache_event(match &result {
            Lookup::Hit(_) => CacheEvent::Hit,
            Lookup::Miss => CacheEvent::Miss,
            Lookup::Error => CacheEvent::Error,
        });
        result
    }

    /// The answer stored under `key` (a semantic match's), counting no
    /// cache event: the request already counted its own.
    pub async fn fetch(&self, key: &str) -> Option<Arc<CachedAnswer>> {
        match self.get(key).await {
            Lookup::Hit(a) => Some(a),
            _ => None,
        }
    }

    async fn get(&self, key: &str) -> Lookup {
        if let Some(hit) = self.local.get(key) {
            return Lookup::Hit(hit);
        }
        let Some(store) = self.store.get() else {
            return Lookup::Error;
        };
        let started = Instant::now();
        let got = tokio::time::timeout(
            Duration::from_millis(self.cfg.op_timeout_ms),
            store.get(key),
        )
        .await;
        self.metrics
            .cache_lookup
            .observe(started.elapsed().as_secs_f64());
        match got {
            Ok(Ok(Some(bytes))) if pending_until(&bytes).is_some() => Lookup::Miss,
            Ok(Ok(Some(bytes))) => match self.read_entry(key, &bytes) {
                Some(a) => {
                    let a = Arc::new(a);
                    self.local.put(key, a.clone());
                    Lookup::Hit(a)
                }
                None => Lookup::Miss,
            },
            Ok(Ok(None)) => Lookup::Miss,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cache lookup failed");
                Lookup::Error
            }
            Err(_) => {
                tracing::warn!("cache lookup timed out");
                Lookup::Error
            }
        }
    }

    /// The answer in a stored value, if it is one written for `key`; any
    /// other value is counted and logged, and reads as a miss.
    fn read_entry(&self, key: &str, value: &[u8]) -> Option<CachedAnswer> {
        match entry::decode(key, value) {
            Ok(a) => Some(a),
            Err(why) => {
                tracing::warn!(
                    reason = why.as_str(),
                    "cache entry rejected; treating it as a miss"
                );
                self.metrics.cache_rejected(why);
                None
            }
        }
    }

    /// Writes an answer (replacing a placeholder); a failure is logged and
    /// counted, never returned to the caller. True when it was written.
    pub async fn store(&self, key: &str, answer: CachedAnswer) -> bool {
        let Ok(bytes) = entry::encode(key, &answer) else {
            return false;
        };
        let Some(store) = self.store.get() else {
            return false;
        };
        let put = tokio::time::timeout(
            Duration::from_millis(self.cfg.op_timeout_ms.max(1000)),
            store.put(key, bytes),
        )
        .await;
        match put {
            Ok(Ok(_)) => {
                self.local.put(key, Arc::new(answer));
                true
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cache write failed");
                self.metrics.cache_event(CacheEvent::Error);
                false
            }
            Err(_) => {
                tracing::warn!("cache write timed out");
                self.metrics.cache_event(CacheEvent::Error);
                false
            }
        }
    }

    /// Claims `key` across replicas by creating a placeholder in it
    /// (create-if-absent). When another replica holds it, waits (at most
    /// `coalesce_wait_ms` and the deadline) for its answer, and takes over a
    /// placeholder whose owner let it expire.
    pub async fn claim(&self, key: &str, deadline: SystemTime) -> Claim {
        let Some(store) = self.store.get() else {
            return Claim::Proceed;
        };
        let op = Duration::from_millis(self.cfg.op_timeout_ms);
        let owner = |revision| {
            Claim::Owner(Box::new(Marker {
                store: store.clone(),
                key: key.to_string(),
                revision,
            }))
        };
        match tokio::time::timeout(op, store.create(key, pending_value(deadline))).await {
            Ok(Ok(revision)) => return owner(revision),
            Ok(Err(e)) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cache placeholder failed");
                self.metrics.cache_event(CacheEvent::Error);
                return Claim::Proceed;
            }
            Err(_) => {
                self.metrics.cache_event(CacheEvent::Error);
                return Claim::Proceed;
            }
        }
        let wait = Duration::from_millis(self.cfg.coalesce_wait_ms);
        let until = tokio::time::Instant::now()
            + wait.min(
                deadline
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO),
            );
        let Ok(Ok(mut watch)) = tokio::time::timeout(op, store.watch_with_history(key)).await
        else {
            return Claim::Proceed;
        };
        // The placeholder seen last: when it expires and at which revision.
        let mut expiring: Option<(tokio::time::Instant, u64)> = None;
        loop {
            let wake = expiring.map_or(until, |(at, _)| at.min(until));
            let entry = match tokio::time::timeout_at(wake, watch.next()).await {
                Ok(Some(Ok(entry))) => entry,
                Err(_) if wake < until => {
                    // The owner let its placeholder expire (it died or overran): take over.
                    if let Some((_, revision)) = expiring.take() {
                        if let Ok(rev) = store.update(key, pending_value(deadline), revision).await
                        {
                            tracing::info!("took over an expired cache placeholder");
                            return owner(rev);
                        }
                    }
                    continue;
                }
                // The wait ran out or the watch ended: generate ourselves.
                _ => return Claim::Proceed,
            };
            if entry.operation != kv::Operation::Put {
                // The owner finished without an answer to cache (an error or a fallback).
                return Claim::Proceed;
            }
            match pending_until(&entry.value) {
                None => {
                    return match self.read_entry(key, &entry.value) {
                        Some(a) => Claim::Answer(a),
                        None => Claim::Proceed,
                    }
                }
                Some(ms) => {
                    let left =
                        Duration::from_millis(ms.saturating_sub(epoch_ms(SystemTime::now())));
                    expiring = Some((tokio::time::Instant::now() + left, entry.revision));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use optiroute_common::wire::{CacheMode, ProviderChoice};

    #[test]
    fn key_ignores_surrounding_whitespace_and_cache_mode() {
        let a = GenerateRequest::new("hello world");
        let mut b = GenerateRequest::new("  hello world\n");
        b.cache = CacheMode::WriteOnly;
        assert_eq!(cache_key(&a, Pool::Local), cache_key(&b, Pool::Local));
        assert_eq!(cache_key(&a, Pool::Local).len(), 64);
    }

    #[test]
    fn key_changes_with_what_changes_the_answer() {
        let base = GenerateRequest::new("hello");
        let k = cache_key(&base, Pool::Local);
        let mut r = base.clone();
        r.params.max_tokens = 5;
        assert_ne!(cache_key(&r, Pool::Local), k);
        let mut r = base.clone();
        r.params.temperature = Some(0.7);
        assert_ne!(cache_key(&r, Pool::Local), k);
        let mut r = base.clone();
        r.params.model_id = Some("m".into());
        assert_ne!(cache_key(&r, Pool::Local), k);
        let r = GenerateRequest::new("hello!");
        assert_ne!(cache_key(&r, Pool::Local), k);
        assert_ne!(cache_key(&base, Pool::Cloud), k, "the pool routing chose");
        assert_eq!(scoped_cache_key(&base, Pool::Local, ""), k);
        assert_ne!(
            scoped_cache_key(&base, Pool::Local, "t:a"),
            k,
            "a tenant's own"
        );
        assert_ne!(
            scoped_cache_key(&base, Pool::Local, "t:a"),
            scoped_cache_key(&base, Pool::Local, "t:b")
        );
    }

    /// What routing read (provider, route_bias) reaches the key only as the
    /// pool it chose: the same pool is the same answer.
    #[test]
    fn key_is_the_pool_chosen_not_how_it_was_chosen() {
        let auto = GenerateRequest::new("hello");
        let mut explicit = auto.clone();
        explicit.provider = ProviderChoice::Local;
        let mut biased = auto.clone();
        biased.route_bias = Some(-1.0);
        let k = cache_key(&auto, Pool::Local);
        assert_eq!(cache_key(&explicit, Pool::Local), k);
        assert_eq!(cache_key(&biased, Pool::Local), k);
        assert_ne!(cache_key(&biased, Pool::Cloud), k);
    }

    fn answer(text: &str) -> Arc<CachedAnswer> {
        Arc::new(CachedAnswer {
            completion: Completion {
                text: text.into(),
                usage: Default::default(),
                model: "m".into(),
                finish_reason: None,
            },
            provider: Pool::Local,
            routed_to: Pool::Local,
            cost: 0.0,
            route_reason: None,
        })
    }

    #[test]
    fn memory_front_expires_and_stays_bounded() {
        let local = Local {
            ttl: Duration::from_millis(50),
            max_entries: 3,
            map: Mutex::new(HashMap::new()),
        };
        let t0 = Instant::now();
        local.put_at("a", answer("A"), t0);
        assert_eq!(local.get_at("a", t0).unwrap().completion.text, "A");
        assert!(local.get_at("b", t0).is_none());
        for k in ["b", "c", "d", "e"] {
            local.put_at(k, answer(k), t0);
        }
        assert!(local.map.lock().unwrap().len() <= 3);
        assert_eq!(
            local
                .get_at("e", t0 + Duration::from_millis(49))
                .unwrap()
                .completion
                .text,
            "e"
        );
        assert!(
            local.get_at("e", t0 + Duration::from_millis(50)).is_none(),
            "expired"
        );
        let off = Local {
            ttl: Duration::from_millis(50),
            max_entries: 0,
            map: Mutex::new(HashMap::new()),
        };
        off.put("a", answer("A"));
        assert!(off.get("a").is_none());
    }
}
