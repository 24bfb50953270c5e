//! Slow and numerous clients: the ingress's caps on requests in flight and
//! open streams, the send timeout for a client that stops reading a
//! stream, and the header and body read timeouts (slowloris).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures::StreamExt;
use optiroute_testkit::{
    metric, scrape, test_config, wait_until, FakeUpstream, Mode, NatsServer, Stack,
};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn chat(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "max_tokens": 16,
        "messages": [{"role": "user", "content": "a long story please"}]})
}

/// A slow local engine: 16 tokens, one every `per_token_ms`.
fn slow_local(nats: &NatsServer, per_token_ms: u64) -> optiroute_common::config::Config {
    let mut cfg = test_config(&nats.url());
    cfg.local.simulated.base_ms = 0;
    cfg.local.simulated.per_token_ms = per_token_ms;
    cfg.local.simulated.max_ms = 60_000;
    cfg.ingress.request_timeout_ms = 30_000;
    cfg.router.provider_timeout_ms = 30_000;
    cfg
}

/// Reads until the peer closes the connection (EOF or reset), returning
/// what arrived; fails the test if it stays open past `timeout`.
async fn read_until_closed(conn: &mut TcpStream, timeout: Duration) -> String {
    let mut got = Vec::new();
    let read = tokio::time::timeout(timeout, async {
        let mut buf = [0u8; 64 * 1024];
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the server kept the connection open for {timeout:?}; got {:?}",
        String::from_utf8_lossy(&got)
    );
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn requests_beyond_max_in_flight_get_503_with_retry_after() {
    let nats = NatsServer::start();
    let mut cfg = slow_local(&nats, 0);
    cfg.local.simulated.base_ms = 2_000;
    cfg.ingress.max_in_flight_requests = 2;
    let stack = Stack::start(cfg).await;
    let http = reqwest::Client::new();
    let slow: Vec<_> = (0..2)
        .map(|i| {
            let req = http
                .post(stack.url("/generate"))
                .json(&json!({"prompt": format!("hold a slot {i}"), "provider": "local"}))
                .send();
            tokio::spawn(req)
        })
        .collect();
    let addr = stack.ingress_addr();
    // The scrape counts itself: two held requests read as three.
    wait_until(
        "two requests in flight",
        Duration::from_secs(5),
        || async move {
            metric(
                &scrape(addr).await,
                "optiroute_ingress_in_flight_requests",
                &[],
            ) == Some(3.0)
        },
    )
    .await;
    let resp = http
        .post(stack.url("/generate"))
        .json(&json!({"prompt": "one too many", "provider": "local"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "overloaded", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("in flight"),
        "{v}"
    );
    // Probes are not counted, and the held requests still finish.
    assert_eq!(stack.get("/health").await.0, 200);
    for r in slow {
        assert_eq!(r.await.unwrap().unwrap().status(), 200);
    }
    let (status, _) = stack
        .generate(&json!({"prompt": "room again", "provider": "local"}))
        .await;
    assert_eq!(status, 200);
    let text = scrape(addr).await;
    assert_eq!(
        metric(
            &text,
            "optiroute_ingress_limited_total",
            &[("limit", "in_flight")]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn streams_beyond_max_streams_get_503_while_plain_requests_pass() {
    let nats = NatsServer::start();
    let mut cfg = slow_local(&nats, 300);
    cfg.ingress.max_streams = 1;
    let stack = Stack::start(cfg).await;
    let http = reqwest::Client::new();
    let resp = http
        .post(stack.url("/v1/chat/completions"))
        .json(&chat("local", true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut open = resp.bytes_stream();
    assert!(open.next().await.unwrap().is_ok());

    let mut second = chat("local", true);
    second["messages"][0]["content"] = json!("another story");
    let resp = http
        .post(stack.url("/v1/chat/completions"))
        .json(&second)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "overloaded", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("streams"),
        "{v}"
    );

    // A plain completion is not a stream.
    let (status, _) = stack
        .generate(&json!({"prompt": "quick", "provider": "local", "max_tokens": 1}))
        .await;
    assert_eq!(status, 200);

    // Closing the open stream frees its slot.
    drop(open);
    let url = stack.url("/v1/chat/completions");
    wait_until(
        "the stream slot to be free again",
        Duration::from_secs(5),
        || {
            let (http, url, mut body) = (http.clone(), url.clone(), second.clone());
            body["max_tokens"] = json!(1);
            async move { http.post(url).json(&body).send().await.unwrap().status() == 200 }
        },
    )
    .await;
}

#[tokio::test]
async fn a_client_that_stops_reading_a_stream_is_cut_off_and_the_provider_stops() {
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::StreamEndless(4096)).await;
    let mut cfg = test_config(&nats.url());
    cfg.cloud.upstream.base_url = up.base_url();
    cfg.cloud.upstream.timeout_ms = 60_000;
    cfg.ingress.request_timeout_ms = 60_000;
    cfg.router.provider_timeout_ms = 60_000;
    cfg.ingress.stream_send_timeout_ms = 300;
    let stack = Stack::start(cfg).await;

    // A client with a small receive window that reads the response head
    // and then nothing more.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut conn = socket.connect(stack.ingress_addr()).await.unwrap();
    let body = chat("cloud", true).to_string();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(body.as_bytes()).await.unwrap();
    let mut first = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut first))
        .await
        .unwrap()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&first[..n])
    );

    // The cloud worker is told to stop and lets go of the upstream stream.
    let cloud = stack.cloud.as_ref().unwrap().admin_addr;
    wait_until(
        "the cloud worker to stop generating",
        Duration::from_secs(10),
        || async move {
            metric(
                &scrape(cloud).await,
                "optiroute_requests_total",
                &[("outcome", "cancelled")],
            ) == Some(1.0)
        },
    )
    .await;
    wait_until(
        "the upstream stream to be dropped",
        Duration::from_secs(5),
        || {
            let dropped = up.streams_dropped();
            async move { dropped == 1 }
        },
    )
    .await;
    // The connection is closed: what was buffered drains, then it ends.
    read_until_closed(&mut conn, Duration::from_secs(10)).await;
    assert_eq!(
        metric(
            &scrape(stack.ingress_addr()).await,
            "optiroute_ingress_limited_total",
            &[("limit", "stream_send_timeout")]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_client_that_sends_half_a_header_is_disconnected() {
    let nats = NatsServer::start();
    let mut cfg = test_config(&nats.url());
    cfg.ingress.header_read_timeout_ms = 300;
    let stack = Stack::start(cfg).await;
    let mut conn = TcpStream::connect(stack.ingress_addr()).await.unwrap();
    conn.write_all(b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-")
        .await
        .unwrap();
    let got = read_until_closed(&mut conn, Duration::from_secs(5)).await;
    assert!(
        got.is_empty() || got.starts_with("HTTP/1.1 408"),
        "closed with {got:?}"
    );
    // The server still serves others.
    assert_eq!(stack.get("/health").await.0, 200);
}

#[tokio::test]
async fn a_client_that_sends_half_a_body_gets_408_and_is_disconnected() {
    let nats = NatsServer::start();
    let mut cfg = test_config(&nats.url());
    cfg.ingress.body_read_timeout_ms = 300;
    let stack = Stack::start(cfg).await;
    let mut conn = TcpStream::connect(stack.ingress_addr()).await.unwrap();
    conn.write_all(
        b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"prompt\": ",
    )
    .await
    .unwrap();
    let got = read_until_closed(&mut conn, Duration::from_secs(5)).await;
    assert!(got.starts_with("HTTP/1.1 408"), "{got:?}");
    assert!(got.contains("\"code\":\"timeout\""), "{got:?}");
    assert_eq!(
        metric(
            &scrape(stack.ingress_addr()).await,
            "optiroute_ingress_limited_total",
            &[("limit", "body_read_timeout")]
        ),
        Some(1.0)
    );
}
