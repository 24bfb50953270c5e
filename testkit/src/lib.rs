//! Test support: a real nats-server per test, a fake OpenAI-compatible
//! upstream (the one stand-in allowed: for the internet), and a helper that
//! starts the whole stack in-process over that server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod load;
pub mod nats_cluster;
pub mod nats_server;
pub mod procs;
pub mod stack;
pub mod upstream;

pub use nats_cluster::NatsCluster;
pub use nats_server::NatsServer;
pub use stack::{test_config, Stack};
pub use upstream::{FakeUpstream, Mode};

use std::time::Duration;

/// Polls `check` until it is true, failing the test after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of one sample in a Prometheus text exposition, matching the
/// metric name and every given label (other labels may be present).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut total = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric_name, label_str) = match series.find('{') {
            Some(i) => (&series[..i], &series[i..]),
            None => (series, ""),
        };
        if metric_name != name {
            continue;
        }
        if labels
            .iter()
            .all(|(k, v)| label_str.contains(&format!("{k}=\"{v}\"")))
        {
            let v: f64 = value.parse().ok()?;
            *total.get_or_insert(0.0) += v;
        }
    }
    total
}

/// Sends `body` as JSON (`Content-Type: application/json`, plus `headers`)
/// on `subject` the way any NATS client would, and returns the reply.
pub async fn request_json(
    client: &async_nats::Client,
    subject: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> async_nats::Message {
    let mut h = async_nats::HeaderMap::new();
    h.insert("Content-Type", "application/json");
    for (k, v) in headers {
        h.insert(*k, *v);
    }
    client
        .request_with_headers(subject.to_string(), h, body.to_string().into())
        .await
        .unwrap()
}

/// The JSON body of a reply.
pub fn json_body(msg: &async_nats::Message) -> serde_json::Value {
    serde_json::from_slice(&msg.payload).unwrap()
}

/// GETs `http://addr/metrics`.
pub async fn scrape(addr: std::net::SocketAddr) -> String {
    reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// How many instances of NATS service `service` answer `$SRV.PING` within
/// 200 ms of the last answer.
pub async fn instances(nc: &async_nats::Client, service: &str) -> usize {
    use futures::StreamExt;
    let inbox = nc.new_inbox();
    let mut sub = nc.subscribe(inbox.clone()).await.unwrap();
    nc.publish_with_reply(format!("$SRV.PING.{service}"), inbox, "".into())
        .await
        .unwrap();
    let mut n = 0;
    while let Ok(Some(_)) =
        tokio::time::timeout(std::time::Duration::from_millis(200), sub.next()).await
    {
        n += 1;
    }
    n
}
