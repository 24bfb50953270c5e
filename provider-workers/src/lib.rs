//! Provider worker pools: `optiroute.provider.local` and
//! `optiroute.provider.cloud`, each a queue group that scales by starting
//! more processes.

pub mod breaker;
pub mod embedded;
pub mod engine;
pub mod metrics;
pub mod openai;
pub mod simulated;
pub mod sse;
pub mod worker;

pub use worker::{cloud_process, local_process, run_cloud, run_local, Running};
