//! Settings of queue-driven batch runs (JetStream work queue).

use serde::Deserialize;

use crate::protocol::JetStreamNames;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Address of the batch worker's `/metrics`, `/health`, `/ready`.
    pub admin_listen: String,
    /// Work-queue stream holding one message per job, subject `<prefix>.batch.<id>`.
    pub stream: String,
    /// KV bucket of batch descriptions (total, created, cancelled) and their counters.
    pub meta_bucket: String,
    /// KV bucket of results, key `<id>.<line>`.
    pub results_bucket: String,
    /// How long queued jobs, results and batch descriptions are kept (the
    /// `max_age` of the stream and both buckets), in hours.
    pub retention_hours: u64,
    /// Most jobs queued at once, all batches together (the stream's
    /// `max_msgs`); a submission beyond it stops and shows `incomplete`.
    pub max_queued_jobs: i64,
    /// Most bytes of queued jobs (the stream's `max_bytes`).
    pub max_queue_bytes: i64,
    /// Most bytes of stored results (the results bucket's `max_bytes`).
    pub max_results_bytes: i64,
    /// Most bytes of batch descriptions and counters (the meta bucket's `max_bytes`).
    pub max_meta_bytes: i64,
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
    /// Deadline of each job's request through the router; less than
    /// `ack_wait_ms` (the worker also renews the delivery every third of
    /// `ack_wait_ms` while a job is handled).
    pub request_timeout_ms: u64,
    /// Tries to store a job's result before the job is ended (terminated,
    /// reported by a metric and a log) instead of being run again.
    pub store_attempts: u32,
    /// Most non-blank lines in one upload.
    pub max_lines: usize,
    /// Longest line of an upload, in bytes.
    pub max_line_bytes: usize,
    /// Largest upload, in bytes (it is read as a stream, never held whole in memory).
    pub max_upload_bytes: u64,
    /// Uploads one ingress reads at once; more are refused with 503.
    pub max_concurrent_uploads: usize,
    /// Time a cancel may take (marking the batch, retried with backoff;
    /// then reading its status) before it answers 504.
    pub cancel_timeout_ms: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        let names = JetStreamNames::default();
        BatchConfig {
            admin_listen: "127.0.0.1:9104".into(),
            stream: names.batch_stream,
            meta_bucket: names.batch_meta_bucket,
            results_bucket: names.batch_results_bucket,
            retention_hours: 168,
            max_queued_jobs: 1_000_000,
            max_queue_bytes: 1 << 30,
            max_results_bytes: 1 << 30,
            max_meta_bytes: 64 << 20,
            consumer: names.batch_consumer,
            max_in_flight: 8,
            route_bias: 0.0,
            max_deliver: 5,
            backoff_ms: vec![1_000, 5_000, 15_000, 30_000],
            ack_wait_ms: 60_000,
            request_timeout_ms: 45_000,
            store_attempts: 8,
            max_lines: 100_000,
            max_line_bytes: 1 << 20,
            max_upload_bytes: 64 << 20,
            max_concurrent_uploads: 4,
            cancel_timeout_ms: 10_000,
        }
    }
}

impl BatchConfig {
    /// The first bad key (without its `batch.` section) and why.
    pub fn check(&self) -> Result<(), (&'static str, &'static str)> {
        for (key, n) in [
            ("retention_hours", self.retention_hours),
            ("max_lines", self.max_lines as u64),
            ("max_line_bytes", self.max_line_bytes as u64),
            ("max_upload_bytes", self.max_upload_bytes),
            ("max_concurrent_uploads", self.max_concurrent_uploads as u64),
            ("store_attempts", u64::from(self.store_attempts)),
            ("cancel_timeout_ms", self.cancel_timeout_ms),
        ] {
            if n == 0 {
                return Err((key, "must be at least 1"));
            }
        }
        for (key, n) in [
            ("max_queued_jobs", self.max_queued_jobs),
            ("max_queue_bytes", self.max_queue_bytes),
            ("max_results_bytes", self.max_results_bytes),
            ("max_meta_bytes", self.max_meta_bytes),
        ] {
            if n < 1 {
                return Err((key, "must be at least 1 (a limit is required)"));
            }
        }
        if self.request_timeout_ms >= self.ack_wait_ms {
            return Err((
                "request_timeout_ms",
                "must be less than batch.ack_wait_ms (a job's request must end before its delivery times out)",
            ));
        }
        Ok(())
    }
}
