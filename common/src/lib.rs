//! Library shared by every OptiRoute process: wire types and codec, subject
//! names, configuration, NATS connection and service helpers, metrics,
//! telemetry, cost model and error kinds.

pub mod admin;
pub mod cli;
pub mod config;
pub mod cost;
pub mod error;
pub mod http;
pub mod liveness;
pub mod metrics;
pub mod nats;
pub mod protocol;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod wire;

pub use error::{Error, ErrorKind};
/// Subject names live in [`protocol`]; this path is kept for callers.
pub use protocol::subjects;

/// Version of the OptiRoute build, reported in `optiroute_build_info` and `$SRV.INFO`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Every OptiRoute process allocates through mimalloc: on the cache-hit
/// path glibc's malloc, free and their consolidation were about 10 % of the
/// ingress's and the router's time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
