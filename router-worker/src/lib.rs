//! The router worker: serves `optiroute.generate` in a queue group, answers
//! from the shared JetStream KV cache when it can, otherwise routes the
//! prompt to the local or cloud pool and falls back to the other pool when
//! the chosen one fails.

pub mod access;
pub mod batch_auth;
pub mod cache;
pub mod coalesce;
pub mod decide;
pub mod embedding;
pub mod eval;
pub mod eval_learned;
pub mod handler;
pub mod learned;
pub mod metrics;
pub mod overflow;
pub mod routing;
pub mod semantic;

pub use handler::{process, run, Running};
