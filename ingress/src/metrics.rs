//! Every metric the ingress exports, registered once at startup.

use optiroute_common::metrics::{counter_vec, gauge, histogram, histogram_vec, new_registry};
use prometheus::{Histogram, HistogramVec, IntCounterVec, IntGauge, Registry};

#[derive(Clone)]
pub struct IngressMetrics {
    pub registry: Registry,
    /// `http_request_duration_seconds{method,endpoint,status}`; endpoint is the route template.
    pub http_duration: HistogramVec,
    pub nats_request: Histogram,
    pub errors: IntCounterVec,
    pub in_flight: IntGauge,
    /// `llm_time_to_first_token_seconds`: streamed requests, HTTP arrival to first token.
    pub time_to_first_token: Histogram,
    /// `optiroute_ingress_limited_total{limit}`: requests and streams refused
    /// or cut off by a limit (`in_flight`, `streams`, `stream_send_timeout`,
    /// `body_read_timeout`).
    pub limited: IntCounterVec,
}

impl IngressMetrics {
    pub fn new() -> Self {
        let r = new_registry("ingress");
        IngressMetrics {
            http_duration: histogram_vec(
                &r,
                "http_request_duration_seconds",
                "HTTP request latency, by method, route template and status.",
                &["method", "endpoint", "status"],
            ),
            nats_request: histogram(
                &r,
                "optiroute_ingress_nats_request_duration_seconds",
                "Latency of the NATS request from ingress to router.",
            ),
            errors: counter_vec(
                &r,
                "optiroute_ingress_errors_total",
                "Failed generate requests, by error kind.",
                &["kind"],
            ),
            in_flight: gauge(
                &r,
                "optiroute_ingress_in_flight_requests",
                "HTTP requests being served now.",
            ),
            time_to_first_token: histogram(
                &r,
                "llm_time_to_first_token_seconds",
                "Time from a streamed request's arrival to its first token.",
            ),
            limited: counter_vec(
                &r,
                "optiroute_ingress_limited_total",
                "Requests refused or cut off by a limit, by limit.",
                &["limit"],
            ),
            registry: r,
        }
    }
}

impl Default for IngressMetrics {
    fn default() -> Self {
        Self::new()
    }
}
