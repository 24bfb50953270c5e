//! `optiroute fake-upstream`: a minimal OpenAI-compatible chat completions
//! server for benchmarks. It answers every `POST /v1/chat/completions` (and
//! `/chat/completions`) with the same `chat.completion`, after an optional
//! delay, so what is measured is whatever sits in front of it.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;

use crate::args::Args;

pub const USAGE: &str = "optiroute fake-upstream [options]
  --listen ADDR         address to listen on (default 127.0.0.1:8099; port 0 picks one)
  --delay-ms N          wait N ms before answering (default 0)
  --completion-tokens N usage.completion_tokens of every answer (default 24)
Answers POST /v1/chat/completions with a fixed chat.completion including usage;
prints `listening on ADDR` once it accepts connections; stops on Ctrl-C or SIGTERM.";

#[derive(Clone)]
struct Fake {
    delay: Duration,
    completion_tokens: u32,
}

#[derive(serde::Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    messages: Vec<Message>,
}

#[derive(serde::Deserialize)]
struct Message {
    #[serde(default)]
    content: Option<String>,
}

async fn chat(State(fake): State<Fake>, body: Bytes) -> Response {
    if !fake.delay.is_zero() {
        tokio::time::sleep(fake.delay).await;
    }
    // Only the prompt length and the model are read: usage.prompt_tokens is
    // about four bytes a token, as the router's own estimate.
    let (model, chars) = match serde_json::from_slice::<ChatRequest>(&body) {
        Ok(r) => (
            r.model.unwrap_or_else(|| "fake".into()),
            r.messages
                .iter()
                .map(|m| m.content.as_deref().map_or(0, str::len))
                .sum::<usize>(),
        ),
        Err(_) => ("fake".into(), body.len()),
    };
    let prompt_tokens = chars.div_ceil(4).max(1) as u64;
    let completion = u64::from(fake.completion_tokens);
    let answer = serde_json::json!({
        "id": "chatcmpl-optiroute-fake",
        "object": "chat.completion",
        "created": 1_700_000_000u64,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": "This is a fixed answer from the OptiRoute fake upstream."},
            "finish_reason": "stop"
        }],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion
        }
    });
    ([(CONTENT_TYPE, "application/json")], answer.to_string()).into_response()
}

/// Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

pub async fn main(args: Vec<String>) -> std::process::ExitCode {
    let mut args = Args::new(args);
    if args.help() {
        println!("{USAGE}");
        return std::process::ExitCode::SUCCESS;
    }
    let parsed = (|| -> Result<(SocketAddr, Fake), String> {
        let listen: SocketAddr = args
            .parsed("listen")?
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8099)));
        let fake = Fake {
            delay: Duration::from_millis(args.parsed("delay-ms")?.unwrap_or(0)),
            completion_tokens: args.parsed("completion-tokens")?.unwrap_or(24),
        };
        Ok((listen, fake))
    })()
    .and_then(|v| args.finish().map(|()| v));
    let (listen, fake) = match parsed {
        Ok(v) => v,
        Err(e) => {
            eprintln!("optiroute fake-upstream: {e}\n{USAGE}");
            return std::process::ExitCode::from(2);
        }
    };
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/chat/completions", post(chat))
        .with_state(fake);
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("optiroute fake-upstream: cannot listen on {listen}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match listener.local_addr() {
        Ok(addr) => println!("listening on {addr}"),
        Err(e) => eprintln!("optiroute fake-upstream: {e}"),
    }
    match axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
    {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("optiroute fake-upstream: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
