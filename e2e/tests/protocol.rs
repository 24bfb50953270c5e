//! What the protocol tells its readers instead of leaving them to infer it:
//! a cached answer carries the cost it saved, and the cloud service
//! publishes its circuit breaker's state in its `$SRV.STATS`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use optiroute_common::protocol::{Discovery, Subjects, BREAKER_STATS_FIELD};
use optiroute_testkit::stack::client;
use optiroute_testkit::{test_config, FakeUpstream, Mode, NatsServer, Stack};
use serde_json::{json, Value};

#[tokio::test]
async fn a_cache_hit_carries_the_cost_it_saved() {
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::Ok).await;
    let mut cfg = test_config(&nats.url());
    cfg.cloud.upstream.base_url = up.base_url();
    let stack = Stack::start(cfg).await;
    let body = json!({"prompt": "what does a cached answer save?", "provider": "cloud"});

    let (status, fresh) = stack.generate(&body).await;
    assert_eq!(status, 200, "{fresh}");
    assert_eq!(fresh["cached"], false);
    assert!(fresh.get("saved_usd").is_none(), "{fresh}");
    let cost = fresh["cost"].as_f64().unwrap();
    assert!(cost > 0.0, "{fresh}");

    // The router writes the cache after replying: ask until it answers.
    let hit = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let (_, v) = stack.generate(&body).await;
            if v["cached"] == true {
                return v;
            }
        }
    })
    .await
    .expect("a cache hit within 10 s");
    assert_eq!(hit["cost"], 0.0, "{hit}");
    assert_eq!(hit["saved_usd"].as_f64(), Some(cost), "{hit}");
    assert_eq!(hit["text"], fresh["text"]);
    assert_eq!(up.hits(), 1);
}

/// The `data` of the cloud service's `$SRV.STATS` endpoint.
async fn published_breaker(stack: &Stack) -> Value {
    let c = client(&stack.cfg, "stats").await;
    let name = Subjects::new(&stack.cfg.nats.prefix).cloud_service;
    let reply = c
        .request(Discovery::Stats.subject(&name), "".into())
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&reply.payload).unwrap();
    v["endpoints"][0]["data"][BREAKER_STATS_FIELD].clone()
}

#[tokio::test]
async fn the_cloud_service_publishes_its_breaker_state() {
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::Status(500)).await;
    let mut cfg = test_config(&nats.url());
    cfg.cloud.upstream.base_url = up.base_url();
    let stack = Stack::start(cfg).await;
    assert_eq!(published_breaker(&stack).await, "closed");

    for i in 0..3 {
        let (status, v) = stack
            .generate(
                &json!({"prompt": format!("failing {i}"), "provider": "cloud", "cache": "off"}),
            )
            .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["fallback_reason"], "upstream_error", "{v}");
    }
    assert_eq!(published_breaker(&stack).await, "open");
}
