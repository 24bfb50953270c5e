//! Every metric the router exports, registered once at startup.

use optiroute_common::metrics::{
    counter_vec, float_counter_vec, gauge, histogram, histogram_vec, new_registry, ServiceMetrics,
};
use prometheus::{CounterVec, Histogram, HistogramVec, IntCounterVec, IntGauge, Registry};

/// Cache event labels of `llm_cache_events_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheEvent {
    Hit,
    Miss,
    Bypass,
    Error,
    /// An identical request in flight answered this one.
    Coalesced,
    /// The semantic cache answered (after an exact miss, counted too).
    SemanticHit,
}

impl CacheEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheEvent::Hit => "hit",
            CacheEvent::Miss => "miss",
            CacheEvent::Bypass => "bypass",
            CacheEvent::Error => "error",
            CacheEvent::Coalesced => "coalesced",
            CacheEvent::SemanticHit => "semantic_hit",
        }
    }
}

#[derive(Clone)]
pub struct RouterMetrics {
    pub registry: Registry,
    pub service: ServiceMetrics,
    cache_events: IntCounterVec,
    pub cache_lookup: Histogram,
    pub cost_saved: CounterVec,
    pub route_decisions: IntCounterVec,
    pub fallbacks: IntCounterVec,
    pub provider_request: HistogramVec,
    cache_rejected: IntCounterVec,
    semantic_outcomes: IntCounterVec,
    /// Seconds per prompt embedding.
    pub embedding_seconds: Histogram,
    /// Vectors in this router's semantic index.
    pub semantic_entries: IntGauge,
    /// 1 while `auto` requests are routed by the learned router, 0 when
    /// the feature router decides (configured, or the learned one fell back).
    pub learned_router_active: IntGauge,
    /// `optiroute_spend_records_dropped_total`: spend records dropped
    /// because the spend stream did not keep up (each also logged).
    pub spend_dropped: prometheus::IntCounter,
}

impl RouterMetrics {
    pub fn new() -> Self {
        let r = new_registry("router");
        RouterMetrics {
            service: ServiceMetrics::new(&r),
            cache_events: counter_vec(
                &r,
                "llm_cache_events_total",
                "Cache events: hit, miss, bypass, error, coalesced, semantic_hit.",
                &["event_type"],
            ),
            cache_lookup: histogram(
                &r,
                "llm_cache_lookup_seconds",
                "Latency of cache lookups in JetStream KV.",
            ),
            cost_saved: float_counter_vec(
                &r,
                "llm_cost_saved_usd_total",
                "USD not spent thanks to cache hits, by the provider that first answered.",
                &["provider"],
            ),
            route_decisions: counter_vec(
                &r,
                "llm_route_decisions_total",
                "Routing decisions, by target pool and main reason.",
                &["target", "reason"],
            ),
            fallbacks: counter_vec(
                &r,
                "llm_fallbacks_total",
                "Requests answered by the other pool, by reason.",
                &["from", "to", "reason"],
            ),
            provider_request: histogram_vec(
                &r,
                "optiroute_provider_request_duration_seconds",
                "NATS request latency from router to a provider pool.",
                &["provider"],
            ),
            cache_rejected: counter_vec(
                &r,
                "optiroute_cache_rejected_entries_total",
                "Stored cache values not taken as answers (read as misses), by reason: undecodable, tag, key.",
                &["reason"],
            ),
            semantic_outcomes: counter_vec(
                &r,
                "optiroute_semantic_lookups_total",
                "Semantic cache lookups by outcome: hit, no_entries, below_threshold, guard_<reason>, entry_gone, unavailable, too_long, not_ready, timeout.",
                &["outcome"],
            ),
            embedding_seconds: histogram(
                &r,
                "llm_embedding_seconds",
                "Time to embed one prompt (all-MiniLM-L6-v2, in process).",
            ),
            semantic_entries: gauge(
                &r,
                "optiroute_semantic_index_entries",
                "Prompt vectors in this router's semantic index.",
            ),
            learned_router_active: gauge(
                &r,
                "optiroute_learned_router_active",
                "1 when the learned router routes auto requests, 0 when the feature router does (configured, or fallen back: see the log).",
            ),
            spend_dropped: counter_vec(
                &r,
                "optiroute_spend_records_dropped_total",
                "Spend records dropped because the spend stream did not keep up.",
                &[],
            )
            .with_label_values::<&str>(&[]),
            registry: r,
        }
    }

    pub fn cache_rejected(&self, why: crate::cache::entry::Rejected) {
        self.cache_rejected.with_label_values(&[why.as_str()]).inc();
    }

    /// `outcome` is one of a fixed set of names (see the help text).
    pub fn semantic_outcome(&self, outcome: &'static str) {
        self.semantic_outcomes.with_label_values(&[outcome]).inc();
    }

    pub fn cache_event(&self, e: CacheEvent) {
        self.cache_events.with_label_values(&[e.as_str()]).inc();
    }
}

impl Default for RouterMetrics {
    fn default() -> Self {
        Self::new()
    }
}
