//! What the ingress shows on which listener: the public API on
//! `ingress.listen`, operators' routes (`/metrics`) on
//! `ingress.admin_listen`, and on the public listener only while it is
//! loopback.
#![allow(clippy::unwrap_used)]

use optiroute_testkit::{scrape, test_config, NatsServer, Stack};

async fn get(url: String) -> (u16, String) {
    let r = reqwest::get(url).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn metrics_stay_off_a_public_listener() {
    let nats = NatsServer::start();
    let mut cfg = test_config(&nats.url());
    cfg.ingress.listen = "0.0.0.0:0".into();
    let stack = Stack::start(cfg).await;
    let ingress = stack.ingress.as_ref().unwrap();
    assert!(ingress.addr.ip().is_unspecified(), "{}", ingress.addr);
    let public = format!("http://127.0.0.1:{}", ingress.addr.port());

    let (status, body) = get(format!("{public}/metrics")).await;
    assert_eq!(status, 404, "{body}");
    assert!(!body.contains("http_request_duration_seconds"), "{body}");
    // The API itself is there.
    let (status, _) = get(format!("{public}/health")).await;
    assert_eq!(status, 200);

    // Operators get everything on the admin listener (loopback).
    assert!(ingress.admin_addr.ip().is_loopback());
    let m = scrape(ingress.admin_addr).await;
    assert!(m.contains("http_request_duration_seconds"), "{m}");
    let admin = format!("http://{}", ingress.admin_addr);
    assert_eq!(get(format!("{admin}/health")).await.0, 200);
    assert_eq!(get(format!("{admin}/ready")).await.0, 200);
}

#[tokio::test]
async fn a_loopback_listener_keeps_metrics() {
    let nats = NatsServer::start();
    let stack = Stack::start(test_config(&nats.url())).await;
    let ingress = stack.ingress.as_ref().unwrap();
    assert!(ingress.addr.ip().is_loopback());
    let m = scrape(ingress.addr).await;
    assert!(m.contains("optiroute_build_info"), "{m}");
    let m = scrape(ingress.admin_addr).await;
    assert!(m.contains("optiroute_build_info"), "{m}");
}
