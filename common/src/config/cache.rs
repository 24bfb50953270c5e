//! `[cache]`: the answer cache (exact, and semantic in `[cache.semantic]`).

use serde::Deserialize;

use super::SemanticConfig;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    pub enabled: bool,
    pub bucket: String,
    pub ttl_secs: u64,
    pub max_bytes: i64,
    /// A KV operation slower than this is treated as a cache error (fail open).
    pub op_timeout_ms: u64,
    /// Longest an identical request waits for another replica's in-flight answer.
    pub coalesce_wait_ms: u64,
    /// Most identical requests one router holds waiting for the one in
    /// flight; one more is refused with 429 (its retry finds the answer).
    pub max_waiters_per_key: usize,
    /// Each router keeps recent answers in memory for this long (never
    /// longer than `ttl_secs`), saving the KV round trip on hot keys. An
    /// entry refreshed through another replica may be served stale for up
    /// to this long. 0 turns it off.
    pub local_ttl_ms: u64,
    /// Most answers a router keeps in memory.
    pub local_max_entries: usize,
    /// Whose cached answers a request may be served: its team's (the
    /// default), only its own key's, or everyone's (`global`). Anonymous
    /// requests (auth off) share one scope.
    pub scope: CacheScope,
    /// The semantic cache (`[cache.semantic]`); its vectors live in the
    /// bucket `<cache.bucket>-semantic`, with the same TTL.
    pub semantic: SemanticConfig,
}

/// `cache.scope`: the tenant boundary of the answer cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheScope {
    Global,
    #[default]
    Team,
    Key,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: true,
            bucket: crate::protocol::JetStreamNames::default().cache_bucket,
            ttl_secs: 3600,
            max_bytes: 1 << 30,
            op_timeout_ms: 250,
            coalesce_wait_ms: 10_000,
            max_waiters_per_key: 256,
            local_ttl_ms: 5_000,
            local_max_entries: 10_000,
            scope: CacheScope::Team,
            semantic: SemanticConfig::default(),
        }
    }
}
