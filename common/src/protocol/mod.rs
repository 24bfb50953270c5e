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

/// Fields of every endpoint's `$SRV.STATS` `data`: requests being served
/// now, and how many it serves at once (`max_in_flight`).
pub const IN_FLIGHT_FIELD: &str = "in_flight";
pub const CAPACITY_FIELD: &str = "capacity";

/// The prefix of a deployment that does not set `nats.prefix`.
pub const DEFAULT_PREFIX: &str = "optiroute";

/// The JetStream names of a deployment. Each is also a config key; one not
/// set follows `nats.prefix`, so a second deployment on the same NATS gets
/// its own cache and batch queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JetStreamNames {
    /// `cache.bucket`: the answer cache, a KV bucket (`<prefix>-cache`).
    pub cache_bucket: String,
    /// `batch.stream`: the batch job queue, a work-queue stream (`<PREFIX>_BATCH`).
    pub batch_stream: String,
    /// `batch.meta_bucket`: one entry per batch (`<prefix>-batches`).
    pub batch_meta_bucket: String,
    /// `batch.results_bucket`: one entry per job result (`<prefix>-batch-results`).
    pub batch_results_bucket: String,
    /// `batch.consumer`: the durable consumer every batch worker shares
    /// (`<prefix>-batch-workers`).
    pub batch_consumer: String,
    /// API keys and teams, a KV bucket (`<prefix>-accounts`).
    pub accounts_bucket: String,
    /// Budget and rate-limit counters with their leases (`<prefix>-ledger`).
    pub ledger_bucket: String,
    /// One record per served request (`<PREFIX>_SPEND`), on subjects
    /// `<prefix>.spend.<key id>`.
    pub spend_stream: String,
}

impl JetStreamNames {
    pub fn for_prefix(prefix: &str) -> Self {
        let token = subjects::name_token(prefix);
        JetStreamNames {
            cache_bucket: format!("{token}-cache"),
            batch_stream: format!("{}_BATCH", token.to_ascii_uppercase()),
            batch_meta_bucket: format!("{token}-batches"),
            batch_results_bucket: format!("{token}-batch-results"),
            batch_consumer: format!("{token}-batch-workers"),
            accounts_bucket: format!("{token}-accounts"),
            ledger_bucket: format!("{token}-ledger"),
            spend_stream: format!("{}_SPEND", token.to_ascii_uppercase()),
        }
    }
}

impl Default for JetStreamNames {
    fn default() -> Self {
        JetStreamNames::for_prefix(DEFAULT_PREFIX)
    }
}
