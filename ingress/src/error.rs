//! The HTTP face of [`Error`]: an OpenAI-shaped JSON body and the status of its kind.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use optiroute_common::{Error, ErrorKind};

/// An error on its way to an HTTP client, with the request id when known.
#[derive(Debug)]
pub struct ApiError {
    pub error: Error,
    pub request_id: Option<String>,
    /// Overrides the kind's status (e.g. 413 for a body over the size limit).
    pub status: Option<StatusCode>,
}

impl ApiError {
    pub fn new(error: Error, request_id: Option<&str>) -> Self {
        ApiError {
            error,
            request_id: request_id.map(str::to_string),
            status: None,
        }
    }
}

fn error_type(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::BadRequest | ErrorKind::UpstreamClientError | ErrorKind::InvalidApiKey => {
            "invalid_request_error"
        }
        ErrorKind::PermissionDenied => "permission_error",
        // OpenAI's type for a spent quota, which its clients know.
        ErrorKind::BudgetExceeded => "insufficient_quota",
        ErrorKind::RateLimited => "rate_limit_error",
        ErrorKind::Timeout => "timeout_error",
        ErrorKind::Internal => "server_error",
        _ => "service_unavailable",
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = self.error.kind;
        let status = self
            .status
            .or_else(|| StatusCode::from_u16(kind.status()).ok())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let message = if kind == ErrorKind::Internal {
            tracing::error!(request_id = ?self.request_id, error = %self.error, "internal error");
            "internal error".to_string()
        } else {
            self.error.message
        };
        let body = serde_json::json!({
            "error": {
                "message": message,
                "type": error_type(kind),
                "code": kind.as_str(),
                "param": self.error.param,
            }
        });
        let mut resp = (status, Json(body)).into_response();
        // At capacity now, likely not in a moment: say when to come back.
        let retry_after = match (self.error.retry_after_secs, kind) {
            (Some(secs), _) => Some(secs),
            (None, ErrorKind::Overloaded | ErrorKind::RateLimited) => Some(1),
            _ => None,
        };
        if let Some(secs) = retry_after {
            resp.headers_mut()
                .insert("retry-after", HeaderValue::from(secs.max(1)));
        }
        if kind == ErrorKind::InvalidApiKey {
            resp.headers_mut()
                .insert("www-authenticate", HeaderValue::from_static("Bearer"));
        }
        if let Some(id) = self
            .request_id
            .and_then(|id| HeaderValue::from_str(&id).ok())
        {
            resp.headers_mut()
                .insert(optiroute_common::protocol::headers::HTTP_REQUEST_ID, id);
        }
        resp
    }
}
