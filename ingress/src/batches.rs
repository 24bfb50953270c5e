//! `/v1/batches`: submit a JSONL file, watch it, collect its results in
//! input order, cancel it. The work itself runs on the batch workers.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use optiroute_batch::{BatchClient, BatchOwner, SubmitError};
use optiroute_common::{Error, ErrorKind};
use serde::Deserialize;

use crate::{ApiError, AppState};

/// The route's body limit for extractors. The upload is read as a stream
/// and limited by `batch.max_upload_bytes`, `max_line_bytes` and
/// `max_lines` instead (the stream does not go through this limit).
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

/// Reads the upload as a stream (see `optiroute_batch::upload`): at most
/// `batch.max_concurrent_uploads` at once, 503 beyond; a line or an upload
/// over its limit is answered 413, an unusable one 400.
/// Who may touch batches: with auth off, anyone (`Ok(None)`); with auth
/// required, the admin (`Ok(None)`, every batch) or a key (its own).
fn requester(state: &AppState, headers: &HeaderMap) -> Result<Option<BatchOwner>, ApiError> {
    if crate::is_admin(state, headers) {
        return Ok(None);
    }
    Ok(crate::authorize_key(state, headers)
        .map_err(fail)?
        .map(|(secret, key)| BatchOwner {
            key_id: key.id.clone(),
            secret,
        }))
}

/// 404 for a batch of another key (as if it did not exist).
async fn check_owner(
    batches: &BatchClient,
    id: &str,
    who: &Option<BatchOwner>,
) -> Result<(), ApiError> {
    let Some(who) = who else {
        return Ok(());
    };
    let meta = batches.meta(id).await.map_err(fail)?;
    if meta.owner.as_deref() == Some(who.key_id.as_str()) {
        Ok(())
    } else {
        Err(fail(Error::new(
            ErrorKind::NotFound,
            format!("no batch `{id}`"),
        )))
    }
}

pub(crate) async fn submit(
    State(state): State<AppState>,
    Query(q): Query<SubmitQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let who = requester(&state, &headers)?;
    if who.is_none() && state.inner.directory.is_some() {
        // The admin key spends nothing: batches are submitted with a key.
        return Err(fail(Error::new(
            ErrorKind::InvalidApiKey,
            "submit batches with an API key (the admin key reads and cancels any batch)",
        )));
    }
    let batches = client(&state).await?;
    let _upload = batches.upload_permit().map_err(fail)?;
    let status = batches
        .submit_stream_as(body.into_data_stream(), q.id.as_deref(), who.as_ref())
        .await
        .map_err(|SubmitError { error, too_large }| ApiError {
            error,
            request_id: None,
            status: too_large.then_some(StatusCode::PAYLOAD_TOO_LARGE),
        })?;
    Ok(Json(status).into_response())
}

pub(crate) async fn status(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let who = requester(&state, &headers)?;
    let batches = client(&state).await?;
    check_owner(batches, &id, &who).await?;
    let status = batches.status(&id).await.map_err(fail)?;
    Ok(Json(status).into_response())
}

pub(crate) async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let who = requester(&state, &headers)?;
    let batches = client(&state).await?;
    check_owner(batches, &id, &who).await?;
    let status = batches.cancel(&id).await.map_err(fail)?;
    Ok(Json(status).into_response())
}

/// One JSON line per input line, in input order, streamed as results are
/// read (a bounded number at a time). A read failing midway ends the body
/// with an error: the client sees fewer lines than the batch's total.
pub(crate) async fn results(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let who = requester(&state, &headers)?;
    let batches = client(&state).await?;
    check_owner(batches, &id, &who).await?;
    let results = batches.results_stream(&id).await.map_err(fail)?;
    let lines = results.map(|r| {
        let r = r.map_err(|e| std::io::Error::other(e.message))?;
        let mut line = serde_json::to_vec(&r).map_err(std::io::Error::other)?;
        line.push(b'\n');
        Ok::<_, std::io::Error>(line)
    });
    let mut resp = Body::from_stream(lines).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(resp)
}
