//! What a batch is made of: input lines, jobs, results, status.

use optiroute_common::error::ErrorBody;
use optiroute_common::wire::{GenerateRequest, GenerateResponse};
use serde::{Deserialize, Serialize};

/// One job: an input line (the `/generate` body or a chat `messages` body,
/// with an optional `custom_id`) and its 1-based position among the
/// non-blank lines of the input. Also what other systems publish directly
/// on `optiroute.batch.<id>` (JSON with `Content-Type: application/json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    #[serde(default)]
    pub line: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_id: Option<String>,
    #[serde(flatten)]
    pub request: GenerateRequest,
}

/// A batch's description, kept in the meta bucket under its id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchMeta {
    pub id: String,
    /// Non-blank input lines.
    pub total: u64,
    /// Lines refused at submit (they already have an error result).
    pub invalid: u64,
    pub created_ms: u64,
    #[serde(default)]
    pub cancelled: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResultStatus {
    Ok,
    Error,
    Cancelled,
    /// Not finished yet (only in result listings).
    Pending,
}

/// The outcome of one line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchResult {
    pub line: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_id: Option<String>,
    pub status: ResultStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<GenerateResponse>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    /// Deliveries it took.
    #[serde(default)]
    pub attempts: u64,
}

impl BatchResult {
    pub fn cost(&self) -> f64 {
        self.response.as_ref().map_or(0.0, |r| r.cost)
    }
}

/// Progress of a batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchStatus {
    pub id: String,
    pub object: String,
    /// `running`, `completed` or `cancelled`.
    pub status: String,
    pub total: u64,
    pub done: u64,
    pub failed: u64,
    pub cancelled: u64,
    /// Jobs still in the queue, including those being worked on.
    pub pending: u64,
    pub cost_usd: f64,
    pub created_ms: u64,
    /// Estimated seconds left, from the rate so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<f64>,
}

impl BatchStatus {
    pub fn finished(&self) -> bool {
        self.done + self.failed + self.cancelled >= self.total
    }
}
