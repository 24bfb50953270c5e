//! Prometheus helpers. Each process builds one metrics struct at startup from
//! these constructors, so call sites never type a metric name.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::error::{Error, ErrorKind};

/// Latency buckets from 100 µs to 60 s: cache hits and LLM calls on one scale.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

fn register<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    // Registration only fails on a duplicate name, which is a programming error
    // caught by every test that builds the struct; keep the collector regardless.
    if let Err(e) = registry.register(Box::new(c.clone())) {
        tracing::error!(error = %e, "metric registration failed");
    }
    c
}

pub fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        r,
        IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic_metric(name, e)),
    )
}

pub fn float_counter_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::CounterVec {
    register(
        r,
        prometheus::CounterVec::new(Opts::new(name, help), labels)
            .unwrap_or_else(|e| panic_metric(name, e)),
    )
}

pub fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(
        r,
        IntGaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic_metric(name, e)),
    )
}

pub fn float_gauge_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::GaugeVec {
    register(
        r,
        prometheus::GaugeVec::new(Opts::new(name, help), labels)
            .unwrap_or_else(|e| panic_metric(name, e)),
    )
}

pub fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    register(
        r,
        IntGauge::new(name, help).unwrap_or_else(|e| panic_metric(name, e)),
    )
}

pub fn histogram_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
    register(
        r,
        HistogramVec::new(opts, labels).unwrap_or_else(|e| panic_metric(name, e)),
    )
}

pub fn histogram(r: &Registry, name: &str, help: &str) -> Histogram {
    let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
    register(
        r,
        Histogram::with_opts(opts).unwrap_or_else(|e| panic_metric(name, e)),
    )
}

/// The one panic outside tests: a metric definition our own code got wrong,
/// found at startup by every test that starts the process.
#[allow(clippy::panic)]
pub fn panic_metric(name: &str, e: prometheus::Error) -> ! {
    // Only reachable with an invalid literal name or label set in our own code.
    panic!("invalid metric definition {name}: {e}")
}

/// A registry with `optiroute_build_info{version,process}` already set.
pub fn new_registry(process: &str) -> Registry {
    let r = Registry::new();
    let info = gauge_vec(
        &r,
        "optiroute_build_info",
        "Build of this process (always 1).",
        &["version", "process"],
    );
    info.with_label_values(&[crate::VERSION, process]).set(1);
    r
}

/// The Prometheus text exposition of a registry.
pub fn render(registry: &Registry) -> Result<String, Error> {
    let mut buf = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut buf)
        .map_err(|e| Error::internal(format!("metrics encode: {e}")))?;
    String::from_utf8(buf).map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))
}

/// Metrics every NATS service endpoint records (see `service::serve`).
#[derive(Clone)]
pub struct ServiceMetrics {
    /// `optiroute_requests_total{service,outcome}`: outcome is `ok` or an error kind.
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub in_flight: IntGaugeVec,
    /// `optiroute_pool_saturation{pool}`: requests being served over how
    /// many this replica serves at once (0..1), averaged over the last window.
    pub saturation: prometheus::GaugeVec,
    /// `optiroute_pool_desired_replicas{pool}`: this replica's share of the
    /// replicas its pool needs (arrival rate × service time ÷ capacity ÷
    /// target utilisation); summed over the pool's replicas it is the
    /// count an autoscaler should aim for.
    pub desired_replicas: prometheus::GaugeVec,
}

impl ServiceMetrics {
    pub fn new(r: &Registry) -> Self {
        ServiceMetrics {
            requests: counter_vec(
                r,
                "optiroute_requests_total",
                "Requests handled on NATS, by service and outcome (ok or error kind).",
                &["service", "outcome"],
            ),
            duration: histogram_vec(
                r,
                "optiroute_request_duration_seconds",
                "Time from receiving a NATS request to replying, by service.",
                &["service"],
            ),
            in_flight: gauge_vec(
                r,
                "optiroute_in_flight_requests",
                "Requests being handled now, by service.",
                &["service"],
            ),
            saturation: float_gauge_vec(
                r,
                "optiroute_pool_saturation",
                "Requests being served over this replica's capacity, averaged over the last window.",
                &["pool"],
            ),
            desired_replicas: float_gauge_vec(
                r,
                "optiroute_pool_desired_replicas",
                "This replica's share of the replicas its pool needs (sum over the pool's replicas).",
                &["pool"],
            ),
        }
    }
}
