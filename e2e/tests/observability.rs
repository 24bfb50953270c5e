//! Every process's metrics after real traffic (names, types, values), and
//! service discovery through the NATS service API.
#![allow(clippy::unwrap_used)]

use optiroute_testkit::{metric, scrape, test_config, FakeUpstream, Mode, NatsServer, Stack};
use serde_json::{json, Value};

fn has_type(text: &str, name: &str, kind: &str) -> bool {
    text.lines().any(|l| l == format!("# TYPE {name} {kind}"))
}

#[tokio::test]
async fn every_process_exports_its_metrics_with_sensible_values() {
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::Ok).await;
    let mut cfg = test_config(&nats.url());
    cfg.cloud.upstream.base_url = up.base_url();
    let stack = Stack::start(cfg).await;
    let http = reqwest::Client::new();
    let prompts = [
        json!({"prompt": "hello one", "provider": "local"}),
        json!({"prompt": "hello two", "provider": "local"}),
        json!({"prompt": "hello one", "provider": "local"}),
        json!({"prompt": "hard one", "provider": "cloud"}),
        json!({"prompt": "hard one", "provider": "cloud"}),
        json!({"prompt": "hello three"}),
    ];
    let mut reply_cost = 0.0;
    for p in &prompts {
        let v: Value = http
            .post(stack.url("/generate"))
            .json(p)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        reply_cost += v["cost"].as_f64().unwrap();
        // Let each cache write land so repeats are hits, not coalesced.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let missing = http
        .get(stack.url("/v1/batches/some-id"))
        .send()
        .await
        .unwrap();
    assert!(missing.status().is_client_error() || missing.status().is_server_error());

    let ingress = scrape(stack.ingress_addr()).await;
    let router = scrape(stack.router.as_ref().unwrap().admin_addr).await;
    let local = scrape(stack.local.as_ref().unwrap().admin_addr).await;
    let cloud = scrape(stack.cloud.as_ref().unwrap().admin_addr).await;

    for text in [&ingress, &router, &local, &cloud] {
        assert!(has_type(text, "optiroute_build_info", "gauge"));
    }
    assert!(has_type(
        &ingress,
        "http_request_duration_seconds",
        "histogram"
    ));
    assert!(has_type(
        &ingress,
        "optiroute_ingress_nats_request_duration_seconds",
        "histogram"
    ));
    assert!(has_type(&router, "llm_cache_events_total", "counter"));
    assert!(has_type(&router, "llm_cache_lookup_seconds", "histogram"));
    assert!(has_type(&router, "llm_route_decisions_total", "counter"));
    assert!(has_type(
        &router,
        "optiroute_provider_request_duration_seconds",
        "histogram"
    ));
    for (text, pool) in [(&local, "local"), (&cloud, "cloud")] {
        assert!(has_type(text, "llm_total_cost_usd_total", "counter"));
        assert!(has_type(text, "llm_tokens_total", "counter"));
        assert!(has_type(text, "llm_provider_latency_seconds", "histogram"));
        assert!(has_type(text, "optiroute_requests_total", "counter"));
        assert!(has_type(text, "optiroute_in_flight_requests", "gauge"));
        assert!(
            metric(
                text,
                "llm_tokens_total",
                &[("provider", pool), ("direction", "output")]
            )
            .unwrap()
                > 0.0
        );
    }
    assert!(has_type(&cloud, "llm_circuit_breaker_state", "gauge"));

    // Values: every generate request is one HTTP 200, one router request, one hit or miss.
    let n = prompts.len() as f64;
    assert_eq!(
        metric(
            &ingress,
            "http_request_duration_seconds_count",
            &[("endpoint", "/generate"), ("status", "200")]
        ),
        Some(n)
    );
    // The route template, never the raw path.
    assert!(ingress.contains("endpoint=\"/v1/batches/{id}\""));
    assert!(!ingress.contains("some-id"));
    let hits = metric(&router, "llm_cache_events_total", &[("event_type", "hit")]).unwrap();
    let misses = metric(&router, "llm_cache_events_total", &[("event_type", "miss")]).unwrap();
    assert_eq!(hits + misses, n);
    assert_eq!(hits, 2.0);
    assert_eq!(
        metric(
            &router,
            "optiroute_requests_total",
            &[("service", "optiroute-router"), ("outcome", "ok")]
        ),
        Some(n)
    );
    let spent = metric(&local, "llm_total_cost_usd_total", &[]).unwrap()
        + metric(&cloud, "llm_total_cost_usd_total", &[]).unwrap();
    assert!((spent - reply_cost).abs() < 1e-9, "{spent} vs {reply_cost}");
    let saved = metric(&router, "llm_cost_saved_usd_total", &[]).unwrap();
    assert!(saved > 0.0);
    assert_eq!(
        metric(
            &router,
            "llm_route_decisions_total",
            &[("reason", "explicit")]
        ),
        Some(3.0),
        "three misses had an explicit provider"
    );
}

#[tokio::test]
async fn every_worker_type_answers_service_discovery() {
    let nats = NatsServer::start();
    let stack = Stack::start(test_config(&nats.url())).await;
    let c = async_nats::connect(nats.url()).await.unwrap();
    let _ = reqwest::Client::new()
        .post(stack.url("/generate"))
        .json(&json!({"prompt": "count me"}))
        .send()
        .await
        .unwrap();
    for (service, subject) in [
        ("optiroute-router", "optiroute.generate"),
        ("optiroute-local", "optiroute.provider.local"),
        ("optiroute-cloud", "optiroute.provider.cloud"),
    ] {
        let ping: Value = serde_json::from_slice(
            &c.request(format!("$SRV.PING.{service}"), "".into())
                .await
                .unwrap()
                .payload,
        )
        .unwrap();
        assert_eq!(ping["name"], service);
        assert_eq!(ping["type"], "io.nats.micro.v1.ping_response");
        let info: Value = serde_json::from_slice(
            &c.request(format!("$SRV.INFO.{service}"), "".into())
                .await
                .unwrap()
                .payload,
        )
        .unwrap();
        assert_eq!(info["endpoints"][0]["subject"], subject);
        assert_eq!(
            info["endpoints"][0]["queue_group"],
            subject.replace(".generate", ".router")
        );
        let stats: Value = serde_json::from_slice(
            &c.request(format!("$SRV.STATS.{service}"), "".into())
                .await
                .unwrap()
                .payload,
        )
        .unwrap();
        assert!(stats["endpoints"][0]["num_requests"].as_u64().is_some());
    }
    let stats: Value = serde_json::from_slice(
        &c.request("$SRV.STATS.optiroute-router", "".into())
            .await
            .unwrap()
            .payload,
    )
    .unwrap();
    assert_eq!(stats["endpoints"][0]["num_requests"], 1);
}
