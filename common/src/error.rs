//! One error type for every boundary, with a kind that each transport maps once:
//! HTTP status for the ingress, `Nats-Service-Error-Code` for NATS replies.

use serde::{Deserialize, Serialize};

/// What went wrong, as a bounded set (also used as a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request itself is invalid (bad JSON, empty prompt, out-of-range field).
    BadRequest,
    /// What the request names does not exist (e.g. an unknown batch id).
    NotFound,
    /// Nobody listens on the subject the request was sent to.
    NoResponders,
    /// NATS is not connected.
    NatsUnavailable,
    /// The deadline passed before an answer came.
    Timeout,
    /// The upstream refused the request because of the request itself (400, 413, 422).
    UpstreamClientError,
    /// The upstream failed (connection error, 5xx, unusable answer).
    UpstreamError,
    /// The upstream rate-limited us (429).
    RateLimited,
    /// The cloud circuit breaker is open: no upstream call was made.
    CircuitOpen,
    /// The provider has no credentials or endpoint configured.
    NotConfigured,
    /// The worker is at capacity and its queue deadline passed.
    Overloaded,
    /// Every provider that was tried failed.
    AllProvidersFailed,
    /// A streamed answer failed after its first token: no fallback is possible.
    StreamInterrupted,
    /// The requester went away (e.g. an HTTP client disconnected mid-stream).
    Cancelled,
    /// A bug or an unexpected state; details are logged, not returned.
    Internal,
    /// No API key, or one that is unknown or revoked.
    InvalidApiKey,
    /// The key may not use what the request asks for (a pool, a model).
    PermissionDenied,
    /// A budget (of the key, its team or the end user) has no room for the request.
    BudgetExceeded,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 18] = [
        ErrorKind::BadRequest,
        ErrorKind::NotFound,
        ErrorKind::NoResponders,
        ErrorKind::NatsUnavailable,
        ErrorKind::Timeout,
        ErrorKind::UpstreamClientError,
        ErrorKind::UpstreamError,
        ErrorKind::RateLimited,
        ErrorKind::CircuitOpen,
        ErrorKind::NotConfigured,
        ErrorKind::Overloaded,
        ErrorKind::AllProvidersFailed,
        ErrorKind::StreamInterrupted,
        ErrorKind::Cancelled,
        ErrorKind::Internal,
        ErrorKind::InvalidApiKey,
        ErrorKind::PermissionDenied,
        ErrorKind::BudgetExceeded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::NotFound => "not_found",
            ErrorKind::NoResponders => "no_responders",
            ErrorKind::NatsUnavailable => "nats_unavailable",
            ErrorKind::Timeout => "timeout",
            ErrorKind::UpstreamClientError => "upstream_client_error",
            ErrorKind::UpstreamError => "upstream_error",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::CircuitOpen => "circuit_open",
            ErrorKind::NotConfigured => "not_configured",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::AllProvidersFailed => "all_providers_failed",
            ErrorKind::StreamInterrupted => "stream_interrupted",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Internal => "internal",
            ErrorKind::InvalidApiKey => "invalid_api_key",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::BudgetExceeded => "budget_exceeded",
        }
    }

    pub fn parse(s: &str) -> Option<ErrorKind> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The HTTP status this kind maps to; also sent as `Nats-Service-Error-Code`.
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::BadRequest | ErrorKind::UpstreamClientError => 400,
            ErrorKind::NotFound => 404,
            ErrorKind::InvalidApiKey => 401,
            ErrorKind::PermissionDenied => 403,
            ErrorKind::RateLimited | ErrorKind::BudgetExceeded => 429,
            ErrorKind::Internal => 500,
            ErrorKind::UpstreamError
            | ErrorKind::AllProvidersFailed
            | ErrorKind::StreamInterrupted => 502,
            // nginx's "client closed request": nobody is there to read it.
            ErrorKind::Cancelled => 499,
            ErrorKind::NoResponders
            | ErrorKind::NatsUnavailable
            | ErrorKind::CircuitOpen
            | ErrorKind::NotConfigured
            | ErrorKind::Overloaded => 503,
            ErrorKind::Timeout => 504,
        }
    }

    /// Whether the router should try the other pool after this failure.
    /// Client errors are the caller's to fix, a stream that already sent
    /// tokens cannot restart, and a cancelled request has nobody waiting.
    pub fn allows_fallback(self) -> bool {
        !matches!(
            self,
            ErrorKind::BadRequest
                | ErrorKind::NotFound
                | ErrorKind::UpstreamClientError
                | ErrorKind::StreamInterrupted
                | ErrorKind::Cancelled
                | ErrorKind::InvalidApiKey
                | ErrorKind::PermissionDenied
                | ErrorKind::BudgetExceeded
        )
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error with a kind and a message safe to show to the caller.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
    /// The request field at fault, when there is one (OpenAI's `param`):
    /// `max_tokens`, `messages[0].role`...
    pub param: Option<String>,
    /// When to come back, in seconds (a rate limit or a budget period
    /// that resets): HTTP `Retry-After`.
    pub retry_after_secs: Option<u64>,
    /// What the failed request was charged anyway: a stream cancelled or
    /// broken after tokens went out was paid for up to there.
    pub charged: Option<Box<Charge>>,
}

/// Spend of a request that ended in an error (see [`Error::charged`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Charge {
    pub pool: crate::wire::Pool,
    pub model: String,
    /// Marked `estimated` when the upstream never reported it.
    pub usage: crate::wire::Usage,
    pub cost_usd: f64,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            param: None,
            retry_after_secs: None,
            charged: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, message)
    }

    /// A bad request because of the field `param`.
    pub fn bad_param(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::bad_request(message).with_param(param)
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
}

/// The body of an error reply on NATS: `{code, message}`, and `param`
/// when a request field is at fault.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    pub code: ErrorKind,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charged: Option<Charge>,
}

impl From<&Error> for ErrorBody {
    fn from(e: &Error) -> Self {
        ErrorBody {
            code: e.kind,
            message: e.message.clone(),
            param: e.param.clone(),
            retry_after_secs: e.retry_after_secs,
            charged: e.charged.as_deref().cloned(),
        }
    }
}

impl From<ErrorBody> for Error {
    fn from(b: ErrorBody) -> Self {
        Error {
            kind: b.code,
            message: b.message,
            param: b.param,
            retry_after_secs: b.retry_after_secs,
            charged: b.charged.map(Box::new),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_their_names() {
        for k in ErrorKind::ALL {
            assert_eq!(ErrorKind::parse(k.as_str()), Some(k));
            let json = serde_json::to_string(&k).unwrap();
            assert_eq!(json, format!("\"{}\"", k.as_str()));
        }
        assert_eq!(ErrorKind::parse("nope"), None);
    }

    #[test]
    fn statuses_follow_the_style_guide() {
        assert_eq!(ErrorKind::BadRequest.status(), 400);
        assert_eq!(ErrorKind::NoResponders.status(), 503);
        assert_eq!(ErrorKind::Timeout.status(), 504);
        assert_eq!(ErrorKind::AllProvidersFailed.status(), 502);
        assert_eq!(ErrorKind::RateLimited.status(), 429);
        assert!(!ErrorKind::UpstreamClientError.allows_fallback());
        assert!(ErrorKind::CircuitOpen.allows_fallback());
    }
}
