//! Every metric a provider worker exports, registered once at startup.

use optiroute_common::metrics::{
    counter_vec, float_counter_vec, gauge_vec, histogram_vec, new_registry, panic_metric,
    ServiceMetrics,
};
use prometheus::{CounterVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Registry};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// Generation speed buckets, tokens per second.
const SPEED_BUCKETS: &[f64] = &[
    5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 80.0, 100.0, 150.0, 200.0, 400.0,
];

fn speed_histogram(r: &Registry) -> HistogramVec {
    let name = "llm_generation_tokens_per_second";
    let opts = HistogramOpts::new(
        name,
        "Embedded-model generation speed per answer (tokens after the first / their time).",
    )
    .buckets(SPEED_BUCKETS.to_vec());
    let h =
        HistogramVec::new(opts, &["provider", "model"]).unwrap_or_else(|e| panic_metric(name, e));
    if let Err(e) = r.register(Box::new(h.clone())) {
        tracing::error!(error = %e, "metric registration failed");
    }
    h
}

#[derive(Clone)]
pub struct ProviderMetrics {
    pub registry: Registry,
    pub service: ServiceMetrics,
    /// `llm_total_cost_usd_total{provider,model,team}`: spend, counted
    /// once per served request (`team` empty when the key has none or
    /// auth is off).
    pub cost: CounterVec,
    /// Team labels seen: at most [`MAX_TEAM_LABELS`], then `other`.
    teams: Arc<Mutex<HashSet<String>>>,
    /// `llm_tokens_total{provider,direction}`: direction is `input` or `output`.
    pub tokens: IntCounterVec,
    pub provider_latency: HistogramVec,
    pub breaker_state: IntGaugeVec,
    pub breaker_transitions: IntCounterVec,
    pub upstream_duration: HistogramVec,
    pub upstream_errors: IntCounterVec,
    /// `llm_generation_tokens_per_second{provider,model}` (embedded model).
    pub generation_speed: HistogramVec,
    /// `llm_queue_wait_seconds{provider}`: waiting for a free generation slot (embedded model).
    pub queue_wait: HistogramVec,
}

/// Most distinct `team` labels one process reports (teams are few; a
/// publisher that could reach a provider subject directly cannot grow the
/// metric without bound).
pub const MAX_TEAM_LABELS: usize = 256;

impl ProviderMetrics {
    /// The `team` label for a request's team.
    pub fn team_label(&self, team: Option<&str>) -> String {
        let Some(t) = team else {
            return String::new();
        };
        let mut seen = self.teams.lock().unwrap_or_else(|p| p.into_inner());
        if seen.contains(t) {
            return t.to_string();
        }
        if seen.len() < MAX_TEAM_LABELS {
            seen.insert(t.to_string());
            return t.to_string();
        }
        "other".to_string()
    }

    pub fn new(process: &str) -> Self {
        let r = new_registry(process);
        ProviderMetrics {
            service: ServiceMetrics::new(&r),
            cost: float_counter_vec(
                &r,
                "llm_total_cost_usd_total",
                "Cumulative spend in USD, by provider pool, model and team.",
                &["provider", "model", "team"],
            ),
            teams: Arc::new(Mutex::new(HashSet::new())),
            tokens: counter_vec(
                &r,
                "llm_tokens_total",
                "Tokens processed, by provider pool and direction (input, output).",
                &["provider", "direction"],
            ),
            provider_latency: histogram_vec(
                &r,
                "llm_provider_latency_seconds",
                "Time a provider worker spends generating one answer.",
                &["provider"],
            ),
            breaker_state: gauge_vec(
                &r,
                "llm_circuit_breaker_state",
                "Circuit breaker state: 0 closed, 1 open, 2 half-open.",
                &["provider"],
            ),
            breaker_transitions: counter_vec(
                &r,
                "llm_circuit_breaker_transitions_total",
                "Circuit breaker transitions, by the state entered.",
                &["provider", "to"],
            ),
            upstream_duration: histogram_vec(
                &r,
                "llm_upstream_request_duration_seconds",
                "Latency of HTTP calls to the upstream model API.",
                &["provider"],
            ),
            upstream_errors: counter_vec(
                &r,
                "llm_upstream_errors_total",
                "Failed upstream calls, by error kind.",
                &["provider", "kind"],
            ),
            generation_speed: speed_histogram(&r),
            queue_wait: histogram_vec(
                &r,
                "llm_queue_wait_seconds",
                "Time a request waits for a free embedded-model generation slot.",
                &["provider"],
            ),
            registry: r,
        }
    }
}
