//! The HTTP ingress: validates each request, gives it a request id and a
//! deadline, sends it to the router over NATS and maps the answer (or the
//! error) to HTTP.

mod admin_api;
mod batches;
mod error;
mod limits;
pub mod metrics;
mod openai;
mod ui;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::Client;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use optiroute_common::config::AuthMode;
use optiroute_common::config::Config;
use optiroute_common::http::ServeLimits;
use optiroute_common::nats::{self, is_connected, new_request_id, RequestMeta};
use optiroute_common::protocol::{headers, models, Discovery, JetStreamNames, Subjects};
use optiroute_common::wire::{self, CacheMode, Format, GenerateRequest, GenerateResponse};
use optiroute_common::{admin, Error, ErrorKind};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use error::ApiError;
pub use metrics::IngressMetrics;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    subjects: Subjects,
    metrics: IngressMetrics,
    request_timeout: Duration,
    ready_probe_timeout: Duration,
    max_prompt_bytes: usize,
    ui: ui::UiStats,
    /// Model names `/v1/chat/completions` maps to each pool.
    local_models: Vec<String>,
    cloud_models: Vec<String>,
    /// Opened on first use, so the ingress starts without JetStream.
    batches: tokio::sync::OnceCell<optiroute_batch::BatchClient>,
    config: Config,
    limits: limits::Limits,
    /// The keys, when `auth.mode = "required"`: a request without a live
    /// key is refused here (401) before it reaches NATS; the router checks
    /// again, as it does for every other entry point.
    directory: Option<Arc<optiroute_accounts::Directory>>,
    /// The accounts bucket and spend stream for the admin API and
    /// `/v1/usage`, opened on first use.
    accounts: tokio::sync::OnceCell<admin_api::Accounts>,
    /// The routers' heartbeats: requests of a router that died fail fast.
    routers: Arc<optiroute_common::liveness::Watcher>,
}

impl AppState {
    pub fn new(
        client: Client,
        cfg: &Config,
        metrics: IngressMetrics,
        shutdown: &CancellationToken,
    ) -> Self {
        let directory = (cfg.auth.mode == AuthMode::Required).then(|| {
            optiroute_accounts::Directory::spawn(
                async_nats::jetstream::new(client.clone()),
                JetStreamNames::for_prefix(&cfg.nats.prefix).accounts_bucket,
                cfg.nats.replicas,
                shutdown.clone(),
            )
        });
        let routers = optiroute_common::liveness::Watcher::spawn(
            client.clone(),
            Subjects::new(&cfg.nats.prefix).router_alive(),
            shutdown.clone(),
        );
        AppState {
            inner: Arc::new(Inner {
                directory,
                routers,
                client,
                subjects: Subjects::new(&cfg.nats.prefix),
                metrics,
                request_timeout: Duration::from_millis(cfg.ingress.request_timeout_ms),
                ready_probe_timeout: Duration::from_millis(cfg.ingress.ready_probe_timeout_ms),
                max_prompt_bytes: cfg.ingress.max_prompt_bytes,
                ui: ui::UiStats::new(),
                local_models: models::local_models(cfg),
                batches: tokio::sync::OnceCell::new(),
                config: cfg.clone(),
                limits: limits::Limits::new(&cfg.ingress),
                cloud_models: cfg.cloud.models().map(str::to_string).collect(),
                accounts: tokio::sync::OnceCell::new(),
            }),
        }
    }
}

/// The HTTP API, apart from `main` so tests can drive it. `with_metrics`
/// adds `/metrics`: only on a loopback listener (operators scrape the
/// admin listener; a public one must not show internals).
pub fn app(state: AppState, with_metrics: bool) -> Router {
    let router = Router::new()
        .route("/generate", post(generate))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/models", get(openai::models))
        .route(
            "/v1/batches",
            post(batches::submit).layer(axum::extract::DefaultBodyLimit::max(
                batches::MAX_BATCH_BYTES,
            )),
        )
        .route("/v1/batches/{id}", get(batches::status))
        .route("/v1/batches/{id}/results", get(batches::results))
        .route("/v1/batches/{id}/cancel", post(batches::cancel))
        .route("/health", get(admin::health))
        .route("/ready", get(ready));
    let router = if with_metrics {
        router.route("/metrics", get(metrics_handler))
    } else {
        router
    };
    router
        .merge(ui::routes())
        .merge(admin_api::routes())
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            limits::body_deadline,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            limits::in_flight,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

/// Records `http_request_duration_seconds{method,endpoint,status}` with the
/// route template (never the raw path) as `endpoint`.
async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let endpoint = req.extensions().get::<MatchedPath>().cloned();
    let m = &state.inner.metrics;
    m.in_flight.inc();
    let resp = next.run(req).await;
    m.in_flight.dec();
    let endpoint = endpoint.as_ref().map_or("unmatched", MatchedPath::as_str);
    m.http_duration
        .with_label_values(&[method.as_str(), endpoint, resp.status().as_str()])
        .observe(started.elapsed().as_secs_f64());
    resp
}

async fn not_found() -> ApiError {
    ApiError {
        error: Error::bad_request("no such endpoint; see README for the API"),
        request_id: None,
        status: Some(StatusCode::NOT_FOUND),
    }
}

/// A caller's `x-request-id` when it is usable, else a fresh one.
fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(headers::HTTP_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(new_request_id)
}

/// The bearer token of `Authorization: Bearer <token>`, if any.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = v.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The caller's key to send on with the request: with auth required, a
/// live key or 401 here; with auth off, none (anonymous).
pub(crate) fn authorize(state: &AppState, headers: &HeaderMap) -> Result<Option<String>, Error> {
    Ok(authorize_key(state, headers)?.map(|(secret, _)| secret))
}

/// [`authorize`] with the key's record.
pub(crate) fn authorize_key(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<Option<(String, Arc<optiroute_accounts::KeyRecord>)>, Error> {
    let Some(dir) = &state.inner.directory else {
        return Ok(None);
    };
    let key = bearer(headers);
    let record = dir.authenticate(key)?;
    Ok(key.map(|k| (k.to_string(), record)))
}

/// Whether the request carries the admin key (compared in constant time).
pub(crate) fn is_admin(state: &AppState, headers: &HeaderMap) -> bool {
    match (&state.inner.config.auth.admin_key, bearer(headers)) {
        (Some(admin), Some(given)) => constant_time_eq(admin.as_bytes(), given.as_bytes()),
        _ => false,
    }
}

/// Equal bytes, in a time that does not depend on where they differ.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    // Hashing first makes the comparison independent of the lengths too.
    let (x, y) = (Sha256::digest(a), Sha256::digest(b));
    x.iter()
        .zip(y.iter())
        .fold(0u8, |acc, (p, q)| acc | (p ^ q))
        == 0
}

/// `x-optiroute-cache-namespace`, checked.
pub(crate) fn namespace_from_headers(headers: &HeaderMap) -> Result<Option<String>, Error> {
    let Some(v) = headers.get(headers::HTTP_CACHE_NAMESPACE) else {
        return Ok(None);
    };
    let v = v.to_str().map_err(|_| {
        Error::bad_param(
            headers::HTTP_CACHE_NAMESPACE,
            "x-optiroute-cache-namespace must be printable ASCII",
        )
    })?;
    wire::validate_label("cache_namespace", v, wire::MAX_NAMESPACE_BYTES)?;
    Ok(Some(v.to_string()))
}

/// `x-optiroute-semantic: on|off`, checked: asks for the semantic cache or not.
pub(crate) fn semantic_from_headers(headers: &HeaderMap) -> Result<Option<bool>, Error> {
    let Some(v) = headers.get(headers::HTTP_SEMANTIC) else {
        return Ok(None);
    };
    match v.to_str().map(|s| s.trim().to_ascii_lowercase()).as_deref() {
        Ok("on" | "true" | "1") => Ok(Some(true)),
        Ok("off" | "false" | "0") => Ok(Some(false)),
        _ => Err(Error::bad_param(
            headers::HTTP_SEMANTIC,
            "x-optiroute-semantic must be on or off",
        )),
    }
}

/// `Cache-Control: no-cache` skips the read (and refreshes the entry);
/// `no-store` skips the write; both skip the cache.
fn cache_mode_from_headers(headers: &HeaderMap, mode: CacheMode) -> CacheMode {
    let Some(cc) = headers.get("cache-control").and_then(|v| v.to_str().ok()) else {
        return mode;
    };
    let cc = cc.to_ascii_lowercase();
    let no_cache = cc.contains("no-cache");
    let no_store = cc.contains("no-store");
    let reads = mode.reads() && !no_cache;
    let writes = mode.writes() && !no_store;
    match (reads, writes) {
        (true, true) => CacheMode::On,
        (true, false) => CacheMode::ReadOnly,
        (false, true) => CacheMode::WriteOnly,
        (false, false) => CacheMode::Off,
    }
}

async fn generate(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let id = request_id(&headers);
    let api_key = authorize(&state, &headers).map_err(|e| ApiError::new(e, Some(&id)))?;
    let body = body.map_err(|rej| ApiError {
        error: Error::bad_request(format!("cannot read the body: {}", rej.body_text())),
        request_id: Some(id.clone()),
        status: Some(rej.status()),
    })?;
    let s = &state.inner;
    let mut req: GenerateRequest =
        wire::decode(Format::Json, &body).map_err(|e| ApiError::new(e, Some(&id)))?;
    if let Some(ns) = namespace_from_headers(&headers).map_err(|e| ApiError::new(e, Some(&id)))? {
        req.cache_namespace = Some(ns);
    }
    if let Some(on) = semantic_from_headers(&headers).map_err(|e| ApiError::new(e, Some(&id)))? {
        req.semantic = Some(on);
    }
    req.validate(s.max_prompt_bytes)
        .map_err(|e| ApiError::new(e, Some(&id)))?;
    req.cache = cache_mode_from_headers(&headers, req.cache);
    let mut meta = RequestMeta::new(id.clone(), s.request_timeout);
    meta.api_key = api_key;
    let answer = relay(&state, &meta, &req)
        .await
        .map_err(|e| ApiError::new(e, Some(&id)))?;
    let mut resp = Json(answer).into_response();
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(headers::HTTP_REQUEST_ID, v);
    }
    Ok(resp)
}

/// Sends a validated request to the routers and waits for the answer;
/// records latency, errors and the UI's figures. Shared by every endpoint.
async fn relay(
    state: &AppState,
    meta: &RequestMeta,
    req: &GenerateRequest,
) -> Result<GenerateResponse, Error> {
    let s = &state.inner;
    let started = Instant::now();
    let mut tracked = s.routers.track(&meta.request_id);
    let died = tracked.death();
    let result: Result<GenerateResponse, Error> = tokio::select! {
        r = nats::request(&s.client, &s.subjects.generate, meta, None, req) => r,
        () = died => Err(Error::new(
            ErrorKind::ReplicaLost,
            "the router serving this request stopped (its heartbeat ended); it was not retried, as it may have been answered upstream",
        )),
    };
    drop(tracked);
    s.metrics
        .nats_request
        .observe(started.elapsed().as_secs_f64());
    match result {
        Ok(answer) => {
            s.ui.record(&answer);
            Ok(answer)
        }
        Err(e) => {
            s.metrics.errors.with_label_values(&[e.kind.as_str()]).inc();
            s.ui.record_failure(e.charged.as_deref());
            tracing::info!(request_id = %meta.request_id, kind = %e.kind, message = %e.message, "request failed");
            if e.kind == ErrorKind::NoResponders {
                Err(Error::new(
                    ErrorKind::NoResponders,
                    "no router is available to serve the request",
                ))
            } else {
                Err(e)
            }
        }
    }
}

/// Ready when NATS is connected and a router answers a service ping.
async fn ready(State(state): State<AppState>) -> Response {
    let s = &state.inner;
    let not_ready = |reason: &str| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "not_ready", "reason": reason})),
        )
            .into_response()
    };
    if !is_connected(&s.client) {
        return not_ready("nats_unavailable: NATS is not connected");
    }
    let ping = tokio::time::timeout(
        s.ready_probe_timeout,
        s.client.request(
            Discovery::Ping.subject(&s.subjects.router_service),
            Bytes::new(),
        ),
    )
    .await;
    match ping {
        Ok(Ok(_)) => (StatusCode::OK, Json(serde_json::json!({"status": "ready"}))).into_response(),
        _ => not_ready("no_responders: no router answered"),
    }
}

async fn metrics_handler(State(state): State<AppState>) -> Response {
    admin::metrics_response(&state.inner.metrics.registry)
}

/// The operators' listener (`ingress.admin_listen`), as every worker has.
fn admin_app(state: AppState) -> Router {
    Router::new()
        .route("/health", get(admin::health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_handler))
        .with_state(state)
}

/// A started ingress.
pub struct Running {
    pub addr: SocketAddr,
    /// `/metrics`, `/health`, `/ready` (`ingress.admin_listen`).
    pub admin_addr: SocketAddr,
    pub metrics: IngressMetrics,
    task: JoinHandle<Result<(), Error>>,
}

impl Running {
    pub async fn wait(self) -> Result<(), Error> {
        self.task
            .await
            .map_err(|e| Error::internal(format!("ingress task: {e}")))?
    }
}

/// The ingress as a process body for [`optiroute_common::cli::main`] (boxed here,
/// so the binary does not compile the async call tree again).
pub fn process(
    client: Client,
    cfg: Config,
    shutdown: CancellationToken,
) -> futures::future::BoxFuture<'static, Result<(), Error>> {
    Box::pin(async move { run(client, &cfg, shutdown).await?.wait().await })
}

/// Binds `ingress.listen` and serves until `shutdown`, then finishes open requests.
pub async fn run(
    client: Client,
    cfg: &Config,
    shutdown: CancellationToken,
) -> Result<Running, Error> {
    let metrics = IngressMetrics::new();
    let listener = admin::bind(&cfg.ingress.listen, "ingress HTTP").await?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::internal(format!("ingress address: {e}")))?;
    let state = AppState::new(client, cfg, metrics.clone(), &shutdown);
    let admin = admin::bind(&cfg.ingress.admin_listen, "ingress admin (metrics, health)").await?;
    let admin_addr = admin
        .local_addr()
        .map_err(|e| Error::internal(format!("ingress admin address: {e}")))?;
    let admin_shutdown = shutdown.clone();
    let admin_routes = admin_app(state.clone());
    tokio::spawn(async move {
        if let Err(e) = admin::serve(admin, admin_routes, admin_shutdown).await {
            tracing::error!(error = %e, "ingress admin server stopped");
        }
    });
    let public = !addr.ip().is_loopback();
    if public {
        tracing::info!(%addr, %admin_addr, "public listener: /metrics only on the admin listener");
    }
    let app = app(state, !public);
    let drain = Duration::from_millis(cfg.ingress.drain_timeout_ms);
    let limits = ServeLimits {
        header_read_timeout: Duration::from_millis(cfg.ingress.header_read_timeout_ms),
    };
    let task = tokio::spawn(async move {
        // Open requests may finish after shutdown, within `drain_timeout_ms`.
        let server = optiroute_common::http::serve(listener, app, shutdown.clone(), limits);
        let drain_over = async {
            shutdown.cancelled().await;
            tokio::time::sleep(drain).await;
        };
        tokio::select! {
            r = server => r,
            _ = drain_over => {
                tracing::warn!("drain timeout: closing the requests still open");
                Ok(())
            }
        }
    });
    Ok(Running {
        addr,
        admin_addr,
        metrics,
        task,
    })
}
