//! `/v1/batches`: submit a JSONL file, watch it, collect its results in
//! input order, cancel it. The work itself runs on the batch workers.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use optiroute_batch::BatchClient;
use optiroute_common::{Error, ErrorKind};
use serde::Deserialize;

use crate::{ApiError, AppState};

/// Largest batch file accepted over HTTP.
pub const MAX_BATCH_BYTES: usize = 64 << 20;

#[derive(Deserialize)]
pub(crate) struct SubmitQuery {
    id: Option<String>,
}

async fn client(state: &AppState) -> Result<&BatchClient, ApiError> {
    let s = &state.inner;
    s.batches
        .get_or_try_init(|| BatchClient::open(s.client.clone(), &s.config))
        .await
        .map_err(|e| {
            ApiError::new(
                Error::new(
                    ErrorKind::NatsUnavailable,
                    format!("the batch queue is unavailable: {}", e.message),
                ),
                None,
            )
        })
}

fn fail(e: Error) -> ApiError {
    ApiError::new(e, None)
}

pub(crate) async fn submit(
    State(state): State<AppState>,
    Query(q): Query<SubmitQuery>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|rej| ApiError {
        error: Error::bad_request(format!("cannot read the body: {}", rej.body_text())),
        request_id: None,
        status: Some(rej.status()),
    })?;
    let status = client(&state)
        .await?
        .submit(&body, q.id.as_deref())
        .await
        .map_err(fail)?;
    Ok(Json(status).into_response())
}

pub(crate) async fn status(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let status = client(&state).await?.status(&id).await.map_err(fail)?;
    Ok(Json(status).into_response())
}

pub(crate) async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let status = client(&state).await?.cancel(&id).await.map_err(fail)?;
    Ok(Json(status).into_response())
}

/// One JSON line per input line, in input order.
pub(crate) async fn results(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let results = client(&state).await?.results(&id).await.map_err(fail)?;
    let mut out = Vec::with_capacity(results.len() * 128);
    for r in &results {
        serde_json::to_writer(&mut out, r).map_err(|e| fail(Error::internal(e.to_string())))?;
        out.push(b'\n');
    }
    let mut resp = out.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(resp)
}
