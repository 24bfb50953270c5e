//! The contract between OptiRoute processes, defined once: every subject,
//! service name, queue group, header, stream and bucket name (all under the
//! deployment's `nats.prefix`), and the model catalogue. `docs/protocol.md`
//! describes the same contract for publishers in other languages.
//!
//! Nothing outside this module spells one of these names: a process asks
//! [`Subjects`] for its deployment's subjects and [`headers`] for header names.

pub mod completion;
pub mod headers;
pub mod models;
pub mod params;
pub mod subjects;

pub use subjects::{Discovery, Subjects};

/// The field of the cloud service's `$SRV.STATS` endpoint `data` that holds
/// its circuit breaker's state: `closed`, `open` or `half_open`.
pub const BREAKER_STATS_FIELD: &str = "breaker";

/// The prefix of a deployment that does not set `nats.prefix`.
pub const DEFAULT_PREFIX: &str = "optiroute";

/// Default JetStream names of the default deployment (each is a config key,
/// so a second deployment on the same NATS sets its own).
pub mod defaults {
    /// `cache.bucket`: the answer cache, a KV bucket.
    pub const CACHE_BUCKET: &str = "optiroute-cache";
    /// `batch.stream`: the batch job queue, a work-queue stream.
    pub const BATCH_STREAM: &str = "OPTIROUTE_BATCH";
    /// `batch.meta_bucket`: one entry per batch.
    pub const BATCH_META_BUCKET: &str = "optiroute-batches";
    /// `batch.results_bucket`: one entry per job result.
    pub const BATCH_RESULTS_BUCKET: &str = "optiroute-batch-results";
    /// `batch.consumer`: the durable consumer every batch worker shares.
    pub const BATCH_CONSUMER: &str = "optiroute-batch-workers";
}
