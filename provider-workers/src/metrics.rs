//! Every metric a provider worker exports, registered once at startup.

use optiroute_common::metrics::{
    counter_vec, float_counter_vec, gauge_vec, histogram_vec, new_registry, ServiceMetrics,
};
use prometheus::{CounterVec, HistogramVec, IntCounterVec, IntGaugeVec, Registry};

#[derive(Clone)]
pub struct ProviderMetrics {
    pub registry: Registry,
    pub service: ServiceMetrics,
    /// `llm_total_cost_usd_total{provider,model}`: spend, counted once per served request.
    pub cost: CounterVec,
    /// `llm_tokens_total{provider,direction}`: direction is `input` or `output`.
    pub tokens: IntCounterVec,
    pub provider_latency: HistogramVec,
    pub breaker_state: IntGaugeVec,
    pub breaker_transitions: IntCounterVec,
    pub upstream_duration: HistogramVec,
    pub upstream_errors: IntCounterVec,
}

impl ProviderMetrics {
    pub fn new(process: &str) -> Self {
        let r = new_registry(process);
        ProviderMetrics {
            service: ServiceMetrics::new(&r),
            cost: float_counter_vec(
                &r,
                "llm_total_cost_usd_total",
                "Cumulative spend in USD, by provider pool and model.",
                &["provider", "model"],
            ),
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
            registry: r,
        }
    }
}
