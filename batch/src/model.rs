//! What a batch is made of: input lines, jobs, results, status.

use optiroute_common::error::ErrorBody;
use optiroute_common::wire::{self, Format, GenerateRequest, GenerateResponse};
use optiroute_common::Error;
use serde::{Deserialize, Serialize};

/// Longest `custom_id` accepted, in bytes: it is stored in the result, so a
/// bigger one could make the result too big to store (and the job run again).
pub const MAX_CUSTOM_ID_BYTES: usize = 256;

/// Longest error message kept in a stored result, in bytes. Messages can
/// quote what they reject (serde's "invalid type: string \"…\"" repeats
/// the whole offending string), so an uncapped one could make the result
/// bigger than NATS's max_payload: never storable, the job or the
/// submission failing on every try.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 1024;

/// `message` cut to at most [`MAX_ERROR_MESSAGE_BYTES`] on a char
/// boundary, ending in `…` when cut.
pub fn cap_message(message: &str) -> String {
    if message.len() <= MAX_ERROR_MESSAGE_BYTES {
        return message.to_string();
    }
    let mut end = MAX_ERROR_MESSAGE_BYTES - '…'.len_utf8();
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &message[..end])
}

/// One job: an input line (the `/generate` body or a chat `messages` body,
/// with an optional `custom_id`) and its 1-based position among the
/// non-blank lines of the input. Also what other systems publish directly
/// on `optiroute.batch.<id>` (JSON with `Content-Type: application/json`).
///
/// Read with [`Job::decode`]: the request and the ids are decoded from the
/// same bytes separately, so no line goes through `#[serde(flatten)]`'s
/// buffered dynamic tree.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Job {
    pub line: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub custom_id: Option<String>,
    #[serde(flatten)]
    pub request: GenerateRequest,
}

/// The job fields beside the request (the rest of the object is skipped).
#[derive(Deserialize)]
struct JobIds {
    #[serde(default)]
    line: u64,
    #[serde(default)]
    custom_id: Option<String>,
}

impl Job {
    /// Decodes a job (or an input line, whose `line` is 0) from `bytes`.
    pub fn decode(format: Format, bytes: &[u8]) -> Result<Job, Error> {
        let ids: JobIds = wire::decode(format, bytes)?;
        let request: GenerateRequest = wire::decode(format, bytes)?;
        Ok(Job {
            line: ids.line,
            custom_id: ids.custom_id,
            request,
        })
    }

    /// Checks the job's own fields (not the request's).
    pub fn validate_ids(&self) -> Result<(), Error> {
        if self.line == 0 {
            return Err(Error::bad_request("job field `line` must be at least 1"));
        }
        validate_custom_id(self.custom_id.as_deref())
    }
}

pub fn validate_custom_id(custom_id: Option<&str>) -> Result<(), Error> {
    match custom_id {
        Some(c) if c.len() > MAX_CUSTOM_ID_BYTES => Err(Error::bad_request(format!(
            "custom_id is {} bytes, over the limit of {MAX_CUSTOM_ID_BYTES} bytes",
            c.len()
        ))),
        _ => Ok(()),
    }
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
    /// Lines handed over so far (queued, or stored as an error result): less
    /// than `total` while a submission runs or after one was cut off.
    /// Absent in descriptions written before it existed: all were.
    #[serde(default = "all_submitted")]
    pub submitted: u64,
    /// The id of the API key that submitted it (auth on): only that key
    /// (or the admin) may read or cancel it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// SHA-256 of the batch's token (`headers::batch_token`), which its
    /// jobs carry instead of the key: workers drop jobs without it, and
    /// routers charge the owner for jobs with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_hash: Option<String>,
}

fn all_submitted() -> u64 {
    u64::MAX
}

impl BatchMeta {
    pub fn submitted(&self) -> u64 {
        self.submitted.min(self.total)
    }
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

    /// Whether its error message is over [`MAX_ERROR_MESSAGE_BYTES`].
    pub fn error_too_long(&self) -> bool {
        self.error
            .as_ref()
            .is_some_and(|e| e.message.len() > MAX_ERROR_MESSAGE_BYTES)
    }

    /// The result with its error message capped (see [`cap_message`]).
    pub fn with_capped_error(mut self) -> Self {
        if let Some(e) = self.error.as_mut() {
            if e.message.len() > MAX_ERROR_MESSAGE_BYTES {
                e.message = cap_message(&e.message);
            }
        }
        self
    }
}

/// Progress of a batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchStatus {
    pub id: String,
    pub object: String,
    /// `incomplete` (not every line submitted yet: submit the same file
    /// again to complete it), `running`, `completed` or `cancelled`.
    pub status: String,
    pub total: u64,
    /// Lines handed over so far (equal to `total` once submitted).
    #[serde(default)]
    pub submitted: u64,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_decode_without_flatten_and_round_trip() {
        let j = Job::decode(
            Format::Json,
            br#"{"line": 3, "custom_id": "x", "prompt": "hi", "max_tokens": 7, "other": {"a": [1]}}"#,
        )
        .unwrap();
        assert_eq!((j.line, j.custom_id.as_deref()), (3, Some("x")));
        assert_eq!(
            (
                j.request.params.prompt.as_str(),
                j.request.params.max_tokens
            ),
            ("hi", 7)
        );
        for f in [Format::Json, Format::MsgPack] {
            let back = Job::decode(f, &wire::encode(f, &j).unwrap()).unwrap();
            assert_eq!(back, j);
        }
    }

    #[test]
    fn error_messages_are_capped_on_a_char_boundary() {
        assert_eq!(cap_message("short"), "short");
        let exact = "a".repeat(MAX_ERROR_MESSAGE_BYTES);
        assert_eq!(cap_message(&exact), exact);
        for filler in ["x", "é", "\u{301}", "😀"] {
            let long = format!("b{}", filler.repeat(MAX_ERROR_MESSAGE_BYTES));
            let capped = cap_message(&long);
            assert!(capped.len() <= MAX_ERROR_MESSAGE_BYTES, "{}", capped.len());
            assert!(
                capped.len() > MAX_ERROR_MESSAGE_BYTES - 8,
                "{}",
                capped.len()
            );
            assert!(capped.ends_with('…') && long.starts_with(capped.trim_end_matches('…')));
        }
    }

    #[test]
    fn custom_ids_are_capped() {
        assert!(validate_custom_id(Some(&"a".repeat(256))).is_ok());
        let e = validate_custom_id(Some(&"a".repeat(257))).unwrap_err();
        assert!(e.message.contains("257 bytes"), "{}", e.message);
    }
}
