//! The small HTTP server every worker runs next to its NATS endpoint:
//! `/health` (alive), `/ready` (able to serve), `/metrics` (Prometheus).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Json, Router};
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::error::Error;

/// Answers `Ok(())` when the process can serve, or the reason it cannot.
pub type ReadyCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Ready while NATS is connected and `also` agrees.
pub fn nats_ready(
    client: async_nats::Client,
    also: impl Fn() -> Result<(), String> + Send + Sync + 'static,
) -> ReadyCheck {
    Arc::new(move || {
        if !crate::nats::is_connected(&client) {
            return Err("nats_unavailable: NATS is not connected".into());
        }
        also()
    })
}

#[derive(Clone)]
struct AdminState {
    registry: Registry,
    ready: ReadyCheck,
}

pub fn router(registry: Registry, ready: ReadyCheck) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready_handler))
        .route("/metrics", get(metrics_handler))
        .with_state(AdminState { registry, ready })
}

pub async fn health() -> impl IntoResponse {
    Json(serde_json::json!({"status": "ok", "version": crate::VERSION}))
}

async fn ready_handler(State(s): State<AdminState>) -> impl IntoResponse {
    match (s.ready)() {
        Ok(()) => (StatusCode::OK, Json(serde_json::json!({"status": "ready"}))),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "not_ready", "reason": reason})),
        ),
    }
}

async fn metrics_handler(State(s): State<AdminState>) -> axum::response::Response {
    metrics_response(&s.registry)
}

/// `/metrics` body for a registry.
pub fn metrics_response(registry: &Registry) -> axum::response::Response {
    match crate::metrics::render(registry) {
        Ok(text) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.message).into_response(),
    }
}

/// Binds `listen`, logging the address actually bound (port 0 picks one).
pub async fn bind(listen: &str, what: &str) -> Result<TcpListener, Error> {
    let l = TcpListener::bind(listen)
        .await
        .map_err(|e| Error::bad_request(format!("cannot listen on {listen} for {what}: {e}")))?;
    if let Ok(addr) = l.local_addr() {
        tracing::info!(%addr, "{what} listening");
    }
    Ok(l)
}

/// Serves `app` until `shutdown` is cancelled, then finishes open requests.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    crate::http::serve(listener, app, shutdown, crate::http::ServeLimits::default()).await
}

/// Starts the admin server on `listen` in the background; returns its address.
pub async fn spawn(
    listen: &str,
    registry: Registry,
    ready: ReadyCheck,
    shutdown: CancellationToken,
) -> Result<SocketAddr, Error> {
    let listener = bind(listen, "admin (metrics, health)").await?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::internal(format!("admin address: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = serve(listener, router(registry, ready), shutdown).await {
            tracing::error!(error = %e, "admin server stopped");
        }
    });
    Ok(addr)
}
