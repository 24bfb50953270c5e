//! What the protocol tells its readers instead of leaving them to infer it:
//! a cached answer carries the cost it saved, and the cloud service
//! publishes its circuit breaker's state in its `$SRV.STATS`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use optiroute_common::protocol::{Discovery, Subjects, BREAKER_STATS_FIELD};
use optiroute_testkit::stack::client;
use optiroute_testkit::{
    json_body, request_json, test_config, FakeUpstream, Mode, NatsServer, Stack,
};
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

/// The field at fault travels as data: in the NATS error body a publisher
/// reads, and as OpenAI's `param` on HTTP.
#[tokio::test]
async fn errors_name_the_offending_field_as_data() {
    let nats = NatsServer::start();
    let stack = Stack::start(test_config(&nats.url())).await;
    let c = client(&stack.cfg, "publisher").await;
    let generate = Subjects::new(&stack.cfg.nats.prefix).generate;
    for (body, param) in [
        (r#"{"prompt":"hi","temperature":5}"#, "temperature"),
        (r#"{"prompt":"hi","max_tokens":"many"}"#, "max_tokens"),
        (r#"{"prompt":"   "}"#, "prompt"),
    ] {
        let reply = request_json(&c, &generate, &[], body).await;
        let v = json_body(&reply);
        assert_eq!(v["code"], "bad_request", "{body} -> {v}");
        assert_eq!(v["param"], param, "{body} -> {v}");
    }
    let http = reqwest::Client::new();
    for (path, body, param) in [
        (
            "/generate",
            json!({"prompt": "hi", "route_bias": 3}),
            "route_bias",
        ),
        (
            "/generate",
            json!({"prompt": "hi", "max_tokens": "many"}),
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "robot", "content": "hi"}]}),
            "messages[0].role",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}),
            "top_p",
        ),
    ] {
        let resp = http.post(stack.url(path)).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), 400, "{body}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["param"], param, "{path} {body} -> {v}");
    }
}
