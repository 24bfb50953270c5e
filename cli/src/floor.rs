//! `optiroute floor`: the bare transport of the cache-hit path, with none of
//! OptiRoute in it, so `bench/floor.sh` can show what this machine allows
//! before any of our work is done.
//!
//! - `optiroute floor ingress`: axum `POST /generate` → one NATS request →
//!   the reply's bytes as the HTTP answer (no validation, request id,
//!   deadline, metrics or logs).
//! - `optiroute floor responder`: a queue subscriber that answers every
//!   request with a fixed, already-encoded cached answer; with `--kv`, it
//!   first reads that answer from a JetStream KV bucket, as a cache that
//!   keeps nothing in memory would.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

use crate::args::Args;

pub const USAGE: &str = "optiroute floor ingress|responder [options]
  --nats URL        NATS server (default nats://127.0.0.1:4222)
  --subject S       request subject (default optiroute.floor)
  --listen ADDR     ingress: HTTP address (default 127.0.0.1:8000; port 0 picks one)
  --kv              responder: read the answer from the KV bucket `optiroute-floor` for every request
Prints `ready` once serving; stops on Ctrl-C or SIGTERM.";

/// About the size and shape of a cached OptiRoute answer.
const ANSWER: &[u8] = br#"{"text":"The capital of France is Paris.","usage":{"prompt_tokens":8,"completion_tokens":9,"total_tokens":17},"cost":0.0,"latency":0.0001,"model":"simulated","routed_to":"local","provider":"local","cached":true,"fallback_reason":null,"route_reason":"score 0.00 < 0.50: short question","request_id":"floor"}"#;

struct Opts {
    command: String,
    nats: String,
    subject: String,
    listen: SocketAddr,
    kv: bool,
}

fn parse(args: Vec<String>) -> Result<Option<Opts>, String> {
    let mut args = Args::new(args);
    if args.help() {
        return Ok(None);
    }
    let nats = args
        .value("nats")?
        .unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    let subject = args
        .value("subject")?
        .unwrap_or_else(|| "optiroute.floor".into());
    let listen = args
        .parsed("listen")?
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8000)));
    let kv = args.switch("kv");
    let command = match args.positional().as_slice() {
        [c] if c == "ingress" || c == "responder" => c.clone(),
        [] => return Err("which part: ingress or responder?".into()),
        other => {
            return Err(format!(
                "unknown floor command `{}` (ingress, responder)",
                other.join(" ")
            ))
        }
    };
    args.finish()?;
    Ok(Some(Opts {
        command,
        nats,
        subject,
        listen,
        kv,
    }))
}

pub async fn main(args: Vec<String>) -> std::process::ExitCode {
    let opts = match parse(args) {
        Ok(Some(o)) => o,
        Ok(None) => {
            println!("{USAGE}");
            return std::process::ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("optiroute floor: {e}\n{USAGE}");
            return std::process::ExitCode::from(2);
        }
    };
    let result = match opts.command.as_str() {
        "ingress" => ingress(&opts).await,
        _ => responder(&opts).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("optiroute floor {}: {e}", opts.command);
            std::process::ExitCode::FAILURE
        }
    }
}

async fn connect(url: &str) -> Result<async_nats::Client, String> {
    async_nats::ConnectOptions::new()
        .request_timeout(Some(Duration::from_secs(10)))
        .connect(url)
        .await
        .map_err(|e| format!("cannot connect to NATS at {url}: {e}"))
}

#[derive(Clone)]
struct Relay {
    client: async_nats::Client,
    subject: String,
}

async fn relay(State(r): State<Relay>, body: Bytes) -> Response {
    match r.client.request(r.subject.clone(), body).await {
        Ok(m) => ([(CONTENT_TYPE, "application/json")], m.payload).into_response(),
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

async fn ingress(o: &Opts) -> Result<(), String> {
    let client = connect(&o.nats).await?;
    let app = axum::Router::new()
        .route("/generate", axum::routing::post(relay))
        .with_state(Relay {
            client,
            subject: o.subject.clone(),
        });
    let listener = tokio::net::TcpListener::bind(o.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", o.listen))?;
    println!("ready");
    axum::serve(listener, app)
        .with_graceful_shutdown(crate::fake_upstream::shutdown_signal())
        .await
        .map_err(|e| e.to_string())
}

async fn responder(o: &Opts) -> Result<(), String> {
    let client = connect(&o.nats).await?;
    let kv = if o.kv {
        let js = async_nats::jetstream::new(client.clone());
        let kv = js
            .create_key_value(async_nats::jetstream::kv::Config {
                bucket: "optiroute-floor".into(),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("KV bucket: {e}"))?;
        kv.put("answer", Bytes::from_static(ANSWER))
            .await
            .map_err(|e| format!("KV put: {e}"))?;
        Some(kv)
    } else {
        None
    };
    let mut sub = client
        .queue_subscribe(o.subject.clone(), "optiroute.floor".into())
        .await
        .map_err(|e| format!("subscribe: {e}"))?;
    println!("ready");
    let serve = async {
        while let Some(m) = sub.next().await {
            let Some(reply) = m.reply else { continue };
            let client = client.clone();
            let kv = kv.clone();
            tokio::spawn(async move {
                let answer = match kv {
                    Some(kv) => match kv.get("answer").await {
                        Ok(Some(v)) => v,
                        _ => Bytes::from_static(b"{}"),
                    },
                    None => Bytes::from_static(ANSWER),
                };
                let _ = client.publish(reply, answer).await;
            });
        }
    };
    tokio::select! {
        _ = serve => Err("subscription ended".into()),
        _ = crate::fake_upstream::shutdown_signal() => Ok(()),
    }
}
