//! Limits on what callers can hold: requests in flight, open streams, and
//! the time a request's body may take to arrive. Each refusal is an
//! ordinary JSON error, counted in `optiroute_ingress_limited_total`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use optiroute_common::config::IngressConfig;
use optiroute_common::{Error, ErrorKind};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{ApiError, AppState};

pub(crate) struct Limits {
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    streams: Arc<Semaphore>,
    max_streams: usize,
    pub(crate) stream_send_timeout: Duration,
    body_read_timeout: Duration,
}

impl Limits {
    pub(crate) fn new(cfg: &IngressConfig) -> Self {
        Limits {
            in_flight: Arc::new(Semaphore::new(cfg.max_in_flight_requests)),
            max_in_flight: cfg.max_in_flight_requests,
            streams: Arc::new(Semaphore::new(cfg.max_streams)),
            max_streams: cfg.max_streams,
            stream_send_timeout: Duration::from_millis(cfg.stream_send_timeout_ms),
            body_read_timeout: Duration::from_millis(cfg.body_read_timeout_ms),
        }
    }

    /// A slot for one streamed completion, held until the stream ends.
    pub(crate) fn stream_slot(&self) -> Result<OwnedSemaphorePermit, Error> {
        Arc::clone(&self.streams).try_acquire_owned().map_err(|_| {
            Error::new(
                ErrorKind::Overloaded,
                format!(
                    "too many streams open (at most {}); retry shortly",
                    self.max_streams
                ),
            )
        })
    }
}

/// Probes stay answerable however busy the ingress is.
fn exempt(path: &str) -> bool {
    matches!(path, "/health" | "/metrics")
}

/// Caps the requests served at once (`ingress.max_in_flight_requests`):
/// beyond it, 503 with `Retry-After` before any work is done.
pub(crate) async fn in_flight(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if exempt(req.uri().path()) {
        return next.run(req).await;
    }
    let s = &state.inner;
    let Ok(_permit) = Arc::clone(&s.limits.in_flight).try_acquire_owned() else {
        s.metrics.limited.with_label_values(&["in_flight"]).inc();
        return ApiError::new(
            Error::new(
                ErrorKind::Overloaded,
                format!(
                    "too many requests in flight (at most {}); retry shortly",
                    s.limits.max_in_flight
                ),
            ),
            None,
        )
        .into_response();
    };
    next.run(req).await
}

/// Gives the whole request body `ingress.body_read_timeout_ms` to arrive;
/// a client that sends it slower gets 408 and its connection is closed.
pub(crate) async fn body_deadline(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    use axum::body::HttpBody;
    if req.body().size_hint().exact() == Some(0) {
        return next.run(req).await;
    }
    let s = &state.inner;
    let timeout = s.limits.body_read_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let timed_out = Arc::new(AtomicBool::new(false));
    let (parts, body) = req.into_parts();
    let flag = Arc::clone(&timed_out);
    let data = body.into_data_stream();
    let timed = futures::stream::unfold(Some(data), move |data| {
        let flag = Arc::clone(&flag);
        async move {
            let mut data = data?;
            match tokio::time::timeout_at(deadline, data.next()).await {
                Ok(Some(item)) => Some((item, Some(data))),
                Ok(None) => None,
                Err(_) => {
                    flag.store(true, Ordering::Relaxed);
                    Some((Err(axum::Error::new("request body read timed out")), None))
                }
            }
        }
    });
    let resp = next
        .run(Request::from_parts(parts, Body::from_stream(timed)))
        .await;
    if !timed_out.load(Ordering::Relaxed) {
        return resp;
    }
    s.metrics
        .limited
        .with_label_values(&["body_read_timeout"])
        .inc();
    let mut resp = ApiError {
        error: Error::new(
            ErrorKind::Timeout,
            format!(
                "the request body did not arrive within {} ms",
                timeout.as_millis()
            ),
        ),
        request_id: None,
        status: Some(StatusCode::REQUEST_TIMEOUT),
    }
    .into_response();
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}
