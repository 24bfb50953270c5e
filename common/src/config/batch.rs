//! Settings of queue-driven batch runs (JetStream work queue).

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Address of the batch worker's `/metrics`, `/health`, `/ready`.
    pub admin_listen: String,
    /// Work-queue stream holding one message per job, subject `<prefix>.batch.<id>`.
    pub stream: String,
    /// KV bucket of batch descriptions (total, created, cancelled).
    pub meta_bucket: String,
    /// KV bucket of results, key `<id>.<line>`.
    pub results_bucket: String,
    /// How long results are kept.
    pub results_ttl_secs: u64,
    /// Durable pull consumer shared by every batch worker.
    pub consumer: String,
    /// Jobs one worker runs at once, so interactive traffic keeps priority.
    pub max_in_flight: usize,
    /// Added to every job's `route_bias` (negative prefers the local pool).
    pub route_bias: f32,
    /// Deliveries before a failing job becomes an error result.
    pub max_deliver: i64,
    /// Waits before redelivery after a failure, in milliseconds.
    pub backoff_ms: Vec<u64>,
    /// A job not acknowledged in this time is redelivered (a worker died).
    pub ack_wait_ms: u64,
    /// Deadline of each job's request through the router.
    pub request_timeout_ms: u64,
    /// Tries to store a job's result before the job is ended (terminated,
    /// reported by a metric and a log) instead of being run again.
    pub store_attempts: u32,
    pub replicas: usize,
    pub max_lines: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            admin_listen: "127.0.0.1:9104".into(),
            stream: "OPTIROUTE_BATCH".into(),
            meta_bucket: "optiroute-batches".into(),
            results_bucket: "optiroute-batch-results".into(),
            results_ttl_secs: 7 * 24 * 3600,
            consumer: "optiroute-batch-workers".into(),
            max_in_flight: 8,
            route_bias: 0.0,
            max_deliver: 5,
            backoff_ms: vec![1_000, 5_000, 15_000, 30_000],
            ack_wait_ms: 60_000,
            request_timeout_ms: 45_000,
            store_attempts: 5,
            replicas: 1,
            max_lines: 100_000,
        }
    }
}
