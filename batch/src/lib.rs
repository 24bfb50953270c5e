//! Queue-driven batch runs on JetStream.
//!
//! A JSONL file becomes one message per line in the work-queue stream
//! `OPTIROUTE_BATCH` (subject `optiroute.batch.<id>`, `Nats-Msg-Id` =
//! `<id>:<line>` so a repeated submit adds nothing). Batch workers share one
//! durable pull consumer, send each job through the normal router path
//! (`optiroute.generate`: cache, routing, providers, fallback), store the
//! result in KV under `<id>.<line>` (create-if-absent) and only then
//! acknowledge. Failures are retried with backoff and end as error results;
//! nothing is dropped, and no job runs twice once its result is stored.
//! Uploads are read as a stream ([`upload`]); status comes from per-batch
//! counters ([`counters`]), not from the results.

pub mod client;
pub mod counters;
pub mod model;
pub mod upload;
pub mod worker;

pub use client::{BatchClient, BatchOwner, SubmitError};
pub use model::{BatchMeta, BatchResult, BatchStatus, Job, ResultStatus};
pub use worker::{process, run, Running};
