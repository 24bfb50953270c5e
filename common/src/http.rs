//! The HTTP/1 server every process runs (the ingress API and each worker's
//! admin endpoints). It is `axum::serve` plus what that lacks: a deadline
//! for a client's request headers (a slowloris client holding connections
//! open one byte at a time is closed), and a way for a handler to close its
//! own connection ([`CloseConnection`]), used when a client stops reading a
//! stream and the response can neither finish nor be abandoned otherwise.

use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

use crate::error::Error;

/// Limits the server itself enforces, before any handler runs.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// Longest a client may take to send a request's headers; then the
    /// connection is closed (hyper answers 408 first when it can).
    pub header_read_timeout: Duration,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

/// In every request's extensions: closes the connection the request came
/// on, response or not. Handlers without a server behind them (tests that
/// call the router directly) simply find none.
#[derive(Debug, Clone)]
pub struct CloseConnection(CancellationToken);

impl CloseConnection {
    pub fn close(&self) {
        self.0.cancel();
    }
}

/// Serves `app` on `listener` until `shutdown` is cancelled, then lets
/// open requests finish (the caller bounds that wait).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: CancellationToken,
    limits: ServeLimits,
) -> Result<(), Error> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let connections = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off
                    // instead of spinning on a listener that fails at once.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let close = CancellationToken::new();
        let closer = CloseConnection(close.clone());
        let app = app.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let mut req = req.map(Body::new);
            req.extensions_mut().insert(closer.clone());
            let mut app = app.clone();
            async move { app.call(req).await }
        });
        let conn = http.serve_connection(TokioIo::new(stream), service);
        let stop = shutdown.clone();
        connections.spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let mut stopping = false;
            loop {
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                        return;
                    }
                    // Dropping the connection closes the socket.
                    _ = close.cancelled() => return,
                    _ = stop.cancelled(), if !stopping => {
                        stopping = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}
