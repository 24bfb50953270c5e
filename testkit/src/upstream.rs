//! A fake OpenAI-compatible chat completions server that a test can tell to
//! answer, fail, hang or rate-limit, and that counts the calls it gets.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub enum Mode {
    /// Answers `cloud answer <call number> to: <prompt>` with a usage block.
    Ok,
    /// Answers without a usage block.
    NoUsage,
    /// Answers after a delay.
    Slow(Duration),
    /// Answers with this status.
    Status(u16),
    /// 429 with `Retry-After: secs`.
    RateLimited(u64),
    /// Never answers.
    Hang,
    /// Streams (when asked to) this many chunks, then breaks the connection.
    StreamBreaksAfter(usize),
    /// Answers with this `usage` block, whatever it holds.
    Usage(serde_json::Value),
    /// Streams (when asked to) chunks of this many bytes until the caller
    /// goes away, which [`FakeUpstream::streams_dropped`] counts.
    StreamEndless(usize),
}

struct Inner {
    mode: Mutex<Mode>,
    hits: AtomicUsize,
    streams_dropped: Arc<AtomicUsize>,
}

pub struct FakeUpstream {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    stop: CancellationToken,
}

impl FakeUpstream {
    pub async fn start(mode: Mode) -> Self {
        let inner = Arc::new(Inner {
            mode: Mutex::new(mode),
            hits: AtomicUsize::new(0),
            streams_dropped: Arc::new(AtomicUsize::new(0)),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { s.cancelled().await })
                .await
                .unwrap();
        });
        FakeUpstream { addr, inner, stop }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.inner.mode.lock().unwrap() = mode;
    }

    /// Chat completion calls received so far.
    pub fn hits(&self) -> usize {
        self.inner.hits.load(Ordering::SeqCst)
    }

    /// `StreamEndless` streams whose caller went away.
    pub fn streams_dropped(&self) -> usize {
        self.inner.streams_dropped.load(Ordering::SeqCst)
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn chat(State(inner): State<Arc<Inner>>, Json(body): Json<serde_json::Value>) -> Response {
    let n = inner.hits.fetch_add(1, Ordering::SeqCst) + 1;
    let mode = inner.mode.lock().unwrap().clone();
    let prompt = body["messages"][0]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let model = body["model"].as_str().unwrap_or_default().to_string();
    let answer = |usage: bool| {
        let mut v = serde_json::json!({
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("cloud answer {n} to: {prompt}")}, "finish_reason": "stop"}],
        });
        if usage {
            v["usage"] = serde_json::json!({"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30});
        }
        v
    };
    let text = format!("cloud answer {n} to: {prompt}");
    if let (true, Mode::StreamEndless(bytes)) = (body["stream"] == true, &mode) {
        return endless(*bytes, &model, Arc::clone(&inner.streams_dropped));
    }
    if body["stream"] == true
        && matches!(mode, Mode::Ok | Mode::NoUsage | Mode::StreamBreaksAfter(_))
    {
        return stream(text, &model, mode);
    }
    match mode {
        Mode::StreamBreaksAfter(_) | Mode::StreamEndless(_) | Mode::Ok => {
            Json(answer(true)).into_response()
        }
        Mode::NoUsage => Json(answer(false)).into_response(),
        Mode::Usage(usage) => {
            let mut v = answer(false);
            v["usage"] = usage;
            Json(v).into_response()
        }
        Mode::Slow(d) => {
            tokio::time::sleep(d).await;
            Json(answer(true)).into_response()
        }
        Mode::Status(code) => {
            let status = StatusCode::from_u16(code).unwrap();
            (
                status,
                Json(serde_json::json!({"error": {"message": "fake failure"}})),
            )
                .into_response()
        }
        Mode::RateLimited(secs) => (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", secs.to_string())],
            "slow down",
        )
            .into_response(),
        Mode::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
    }
}

/// An OpenAI-style SSE stream of `text`, one word a chunk, with a usage chunk.
fn stream(text: String, model: &str, mode: Mode) -> Response {
    let words: Vec<String> = text
        .split(' ')
        .enumerate()
        .map(|(i, w)| {
            if i == 0 {
                w.to_string()
            } else {
                format!(" {w}")
            }
        })
        .collect();
    let breaks_after = match mode {
        Mode::StreamBreaksAfter(n) => Some(n),
        _ => None,
    };
    let mut events: Vec<Result<String, std::io::Error>> = Vec::new();
    for (i, w) in words.iter().enumerate() {
        if breaks_after == Some(i) {
            events.push(Err(std::io::Error::other("upstream broke the stream")));
            break;
        }
        let chunk = serde_json::json!({"id": "c", "object": "chat.completion.chunk", "model": model,
            "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": null}]});
        events.push(Ok(format!("data: {chunk}\n\n")));
    }
    if breaks_after.is_none() {
        let done = serde_json::json!({"id": "c", "object": "chat.completion.chunk", "model": model,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]});
        let usage = serde_json::json!({"id": "c", "object": "chat.completion.chunk", "model": model, "choices": [],
            "usage": {"prompt_tokens": 10, "completion_tokens": words.len(), "total_tokens": 10 + words.len()}});
        events.push(Ok(format!(
            "data: {done}\n\ndata: {usage}\n\ndata: [DONE]\n\n"
        )));
    }
    let body = axum::body::Body::from_stream(futures::stream::iter(events).then(|e| async move {
        tokio::time::sleep(Duration::from_millis(5)).await;
        e
    }));
    ([("content-type", "text/event-stream")], body).into_response()
}

/// Counts a stream as dropped when its body is dropped before the end.
struct DropCounter(Arc<AtomicUsize>);

impl Drop for DropCounter {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// An SSE stream of `bytes`-sized content chunks that never ends.
fn endless(bytes: usize, model: &str, dropped: Arc<AtomicUsize>) -> Response {
    let chunk = serde_json::json!({"id": "c", "object": "chat.completion.chunk", "model": model,
        "choices": [{"index": 0, "delta": {"content": "x".repeat(bytes)}, "finish_reason": null}]});
    let event = bytes::Bytes::from(format!("data: {chunk}\n\n"));
    let guard = DropCounter(dropped);
    let body = futures::stream::unfold(guard, move |guard| {
        let event = event.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            Some((Ok::<_, std::io::Error>(event), guard))
        }
    });
    (
        [("content-type", "text/event-stream")],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}
