//! The request path end to end over a real nats-server.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures::future::join_all;
use optiroute_common::wire::{
    self, CacheMode, Format, GenerateRequest, GenerateResponse, Pool, ProviderChoice,
};
use optiroute_testkit::stack::{client, Parts};
use optiroute_testkit::{
    metric, request_json, scrape, test_config, FakeUpstream, Mode, NatsServer, Stack,
};
use serde_json::{json, Value};

#[tokio::test]
async fn http_prompt_goes_through_every_hop() {
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::Ok).await;
    let mut cfg = test_config(&nats.url());
    cfg.cloud.upstream.base_url = up.base_url();
    let stack = Stack::start(cfg).await;
    let http = reqwest::Client::new();

    let resp = http
        .post(stack.url("/generate"))
        .json(&json!({"prompt": "Hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(!id.is_empty());
    let body: Value = resp.json().await.unwrap();
    for field in [
        "text",
        "usage",
        "cost",
        "latency",
        "model",
        "routed_to",
        "provider",
        "cached",
    ] {
        assert!(body.get(field).is_some(), "missing {field} in {body}");
    }
    assert_eq!(body["routed_to"], "local");
    assert_eq!(body["provider"], "local");
    assert_eq!(body["model"], "simulated");
    assert_eq!(body["cached"], false);
    assert_eq!(body["request_id"], id.as_str());
    let u = &body["usage"];
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );

    // A long analytical prompt goes to the cloud pool (the fake upstream).
    let complex = "Compare the trade-offs of optimistic and pessimistic concurrency control in a distributed database, step by step, and explain why each one fails under high contention.";
    let body: Value = http
        .post(stack.url("/generate"))
        .json(&json!({"prompt": complex, "max_tokens": 300}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["routed_to"], "cloud", "{body}");
    assert_eq!(body["provider"], "cloud");
    assert!(body["text"]
        .as_str()
        .unwrap()
        .starts_with("cloud answer 1 to:"));
    assert!(body["route_reason"].as_str().unwrap().starts_with("score"));
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn caller_request_id_is_carried_and_returned() {
    let nats = NatsServer::start();
    let stack = Stack::start(test_config(&nats.url())).await;
    let resp = reqwest::Client::new()
        .post(stack.url("/generate"))
        .header("x-request-id", "trace-me-42")
        .json(&json!({"prompt": "hi there", "provider": "local"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "trace-me-42");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["request_id"], "trace-me-42");
}

#[tokio::test]
async fn direct_nats_publishers_speak_json_and_msgpack() {
    let nats = NatsServer::start();
    let stack = Stack::start_parts(test_config(&nats.url()), Parts::WORKERS).await;
    let c = client(&stack.cfg, "publisher").await;

    // JSON, as the `nats` CLI or nats-py would send it.
    let msg = request_json(
        &c,
        "optiroute.generate",
        &[],
        r#"{"prompt":"hi","provider":"local"}"#,
    )
    .await;
    assert_eq!(
        msg.headers
            .as_ref()
            .unwrap()
            .get("Content-Type")
            .unwrap()
            .as_str(),
        "application/json"
    );
    let v: Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(v["provider"], "local");
    assert!(v["text"].as_str().unwrap().starts_with("[simulated]"));

    // MessagePack with named fields, the default.
    let mut req = GenerateRequest::new("hello msgpack");
    req.provider = ProviderChoice::Local;
    let body = wire::encode(Format::MsgPack, &req).unwrap();
    let msg = c.request("optiroute.generate", body).await.unwrap();
    let r: GenerateResponse = wire::decode(Format::MsgPack, &msg.payload).unwrap();
    assert_eq!(r.provider, Pool::Local);
    assert!(!r.cached);
}

#[tokio::test]
async fn two_router_replicas_share_the_work() {
    let nats = NatsServer::start();
    let cfg = test_config(&nats.url());
    let stack = Stack::start_parts(cfg.clone(), Parts::WORKERS).await;
    let second =
        optiroute_router::run(client(&cfg, "router-2").await, &cfg, stack.shutdown.clone())
            .await
            .unwrap();
    stack.wait_serving().await;
    let c = client(&cfg, "publisher").await;
    // Wait until both replicas are subscribed (two answer the ping).
    optiroute_testkit::wait_until("two routers", Duration::from_secs(5), || {
        let c = c.clone();
        async move {
            let inbox = c.new_inbox();
            let mut sub = c.subscribe(inbox.clone()).await.unwrap();
            c.publish_with_reply("$SRV.PING.optiroute-router", inbox, "".into())
                .await
                .unwrap();
            let mut n = 0;
            while let Ok(Some(_)) = tokio::time::timeout(
                Duration::from_millis(200),
                futures::StreamExt::next(&mut sub),
            )
            .await
            {
                n += 1;
            }
            n >= 2
        }
    })
    .await;
    let calls = (0..60).map(|i| {
        let c = c.clone();
        async move {
            let mut req = GenerateRequest::new(format!("hello {i}"));
            req.cache = CacheMode::Off;
            let msg = c
                .request(
                    "optiroute.generate",
                    wire::encode(Format::MsgPack, &req).unwrap(),
                )
                .await
                .unwrap();
            wire::decode::<GenerateResponse>(Format::MsgPack, &msg.payload).unwrap()
        }
    });
    let answers = join_all(calls).await;
    assert_eq!(answers.len(), 60);
    let first = metric(
        &scrape(stack.router.as_ref().unwrap().admin_addr).await,
        "optiroute_requests_total",
        &[("outcome", "ok")],
    )
    .unwrap_or(0.0);
    let second_n = metric(
        &scrape(second.admin_addr).await,
        "optiroute_requests_total",
        &[("outcome", "ok")],
    )
    .unwrap_or(0.0);
    assert_eq!(first + second_n, 60.0);
    assert!(
        first > 0.0 && second_n > 0.0,
        "both replicas should get work: {first} / {second_n}"
    );
}

#[tokio::test]
async fn falls_back_when_a_pool_has_no_workers() {
    let nats = NatsServer::start();
    let stack = Stack::start_parts(
        test_config(&nats.url()),
        Parts {
            cloud: false,
            ..Parts::ALL
        },
    )
    .await;
    let body: Value = reqwest::Client::new()
        .post(stack.url("/generate"))
        .json(&json!({"prompt": "hello", "provider": "huggingface"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["routed_to"], "cloud");
    assert_eq!(body["provider"], "local");
    assert_eq!(body["fallback_reason"], "no_responders");
    let text = scrape(stack.router.as_ref().unwrap().admin_addr).await;
    assert_eq!(
        metric(
            &text,
            "llm_fallbacks_total",
            &[
                ("from", "cloud"),
                ("to", "local"),
                ("reason", "no_responders")
            ]
        ),
        Some(1.0)
    );
}
