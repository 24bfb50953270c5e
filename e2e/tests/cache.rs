//! The response cache in JetStream KV: hits, TTL, coalescing within and
//! across router replicas, per-request control, what is never cached, and
//! failing open without JetStream.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures::future::join_all;
use optiroute_common::config::Config;
use optiroute_common::wire::{self, Format, GenerateRequest, GenerateResponse, ProviderChoice};
use optiroute_testkit::stack::{client, Parts};
use optiroute_testkit::{
    json_body, metric, request_json, scrape, test_config, wait_until, FakeUpstream, Mode,
    NatsServer, Stack,
};
use serde_json::{json, Value};

async fn ask(stack: &Stack, body: Value) -> Value {
    let (status, v) = stack.generate(&body).await;
    assert_eq!(status, 200, "{v}");
    v
}

async fn stack_with(
    up: &FakeUpstream,
    nats: &NatsServer,
    tweak: impl FnOnce(&mut Config),
) -> Stack {
    let mut cfg = test_config(&nats.url());
    cfg.cloud.upstream.base_url = up.base_url();
    tweak(&mut cfg);
    Stack::start(cfg).await
}

async fn router_metric(stack: &Stack, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metric(
        &scrape(stack.router.as_ref().unwrap().admin_addr).await,
        name,
        labels,
    )
}

#[tokio::test]
async fn miss_then_hit_without_a_second_provider_call() {
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::Ok).await;
    let stack = stack_with(&up, &nats, |_| {}).await;
    let q = json!({"prompt": "What is NATS?", "provider": "cloud"});
    let first = ask(&stack, q.clone()).await;
    assert_eq!(first["cached"], false);
    let cost = first["cost"].as_f64().unwrap();
    assert!(cost > 0.0);
    // Whitespace at the ends does not change the key.
    let second = ask(
        &stack,
        json!({"prompt": "  What is NATS?\n", "provider": "cloud"}),
    )
    .await;
    assert_eq!(second["cached"], true, "{second}");
    assert_eq!(second["cost"], 0.0);
    assert_eq!(second["provider"], "cloud");
    assert_eq!(second["model"], first["model"]);
    assert_eq!(second["text"], first["text"]);
    assert_eq!(up.hits(), 1);
    let saved = router_metric(&stack, "llm_cost_saved_usd_total", &[("provider", "cloud")])
        .await
        .unwrap();
    assert!((saved - cost).abs() < 1e-12);
    assert!(
        router_metric(&stack, "llm_cache_events_total", &[("event_type", "hit")])
            .await
            .unwrap()
            >= 1.0
    );
}

#[tokio::test]
async fn entries_expire_after_the_ttl() {
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::Ok).await;
    let stack = stack_with(&up, &nats, |c| c.cache.ttl_secs = 1).await;
    let q = json!({"prompt": "short lived", "provider": "cloud"});
    ask(&stack, q.clone()).await;
    let probe = json!({"prompt": "short lived", "provider": "cloud", "cache": "read_only"});
    wait_until(
        "the entry to be written",
        Duration::from_secs(5),
        || async { ask(&stack, probe.clone()).await["cached"] == true },
    )
    .await;
    wait_until("the entry to expire", Duration::from_secs(10), || async {
        ask(&stack, probe.clone()).await["cached"] == false
    })
    .await;
}

#[tokio::test]
async fn twenty_identical_requests_make_one_provider_call() {
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::Slow(Duration::from_millis(300))).await;
    let stack = stack_with(&up, &nats, |_| {}).await;
    let calls = (0..20).map(|_| {
        ask(
            &stack,
            json!({"prompt": "popular question", "provider": "cloud"}),
        )
    });
    let answers = join_all(calls).await;
    assert_eq!(up.hits(), 1);
    let text = &answers[0]["text"];
    assert!(answers.iter().all(|a| &a["text"] == text));
    assert_eq!(answers.iter().filter(|a| a["cached"] == false).count(), 1);
}

#[tokio::test]
async fn identical_requests_across_two_router_replicas_make_one_provider_call() {
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::Slow(Duration::from_millis(300))).await;
    let mut cfg = test_config(&nats.url());
    cfg.cloud.upstream.base_url = up.base_url();
    let stack = Stack::start_parts(cfg.clone(), Parts::WORKERS).await;
    let second =
        optiroute_router::run(client(&cfg, "router-2").await, &cfg, stack.shutdown.clone())
            .await
            .unwrap();
    wait_until(
        "the second router's cache",
        Duration::from_secs(5),
        || async { second.cache.is_connected() },
    )
    .await;
    let c = client(&cfg, "publisher").await;
    let mut req = GenerateRequest::new("shared across replicas");
    req.provider = ProviderChoice::Cloud;
    let body = wire::encode(Format::MsgPack, &req).unwrap();
    let calls = (0..20).map(|_| {
        let c = c.clone();
        let body = body.clone();
        async move {
            let msg = c.request("optiroute.generate", body).await.unwrap();
            wire::decode::<GenerateResponse>(Format::MsgPack, &msg.payload).unwrap()
        }
    });
    let answers = join_all(calls).await;
    assert_eq!(
        up.hits(),
        1,
        "one provider call for 20 requests on 2 replicas"
    );
    assert!(answers
        .iter()
        .all(|a| a.completion.text == answers[0].completion.text));
    let served = |text: String| {
        metric(&text, "optiroute_requests_total", &[("outcome", "ok")]).unwrap_or(0.0)
    };
    let a = served(scrape(stack.router.as_ref().unwrap().admin_addr).await);
    let b = served(scrape(second.admin_addr).await);
    assert_eq!(a + b, 20.0);
    assert!(a > 0.0 && b > 0.0, "both replicas took requests: {a} / {b}");
}

#[tokio::test]
async fn per_request_control_bypasses_and_refreshes() {
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::Ok).await;
    let stack = stack_with(&up, &nats, |_| {}).await;
    let q = |cache: &str| json!({"prompt": "controlled", "provider": "cloud", "cache": cache});
    let first = ask(&stack, q("on")).await;
    assert_eq!(up.hits(), 1);
    wait_until("the entry", Duration::from_secs(5), || async {
        ask(&stack, q("read_only")).await["cached"] == true
    })
    .await;

    let off = ask(&stack, q("off")).await;
    assert_eq!(off["cached"], false);
    assert_eq!(up.hits(), 2);

    // no-cache skips the read and refreshes the entry with the new answer.
    let resp = reqwest::Client::new()
        .post(stack.url("/generate"))
        .header("cache-control", "no-cache")
        .json(&q("on"))
        .send()
        .await
        .unwrap();
    let refreshed: Value = resp.json().await.unwrap();
    assert_eq!(refreshed["cached"], false);
    assert_eq!(up.hits(), 3);
    assert_ne!(refreshed["text"], first["text"]);
    wait_until("the refreshed entry", Duration::from_secs(5), || async {
        let v = ask(&stack, q("read_only")).await;
        v["cached"] == true && v["text"] == refreshed["text"]
    })
    .await;

    // no-store reads but never writes.
    let other = json!({"prompt": "never stored", "provider": "cloud"});
    let resp = reqwest::Client::new()
        .post(stack.url("/generate"))
        .header("cache-control", "no-store")
        .json(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        ask(
            &stack,
            json!({"prompt": "never stored", "provider": "cloud", "cache": "read_only"})
        )
        .await["cached"],
        false
    );
    assert!(
        router_metric(
            &stack,
            "llm_cache_events_total",
            &[("event_type", "bypass")]
        )
        .await
        .unwrap()
            >= 2.0
    );
}

#[tokio::test]
async fn errors_and_fallback_answers_are_not_cached() {
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::Status(503)).await;
    let stack = stack_with(&up, &nats, |c| c.cloud.breaker.failure_threshold = 100).await;
    let q = json!({"prompt": "flaky upstream", "provider": "cloud"});
    let a = ask(&stack, q.clone()).await;
    assert_eq!(a["fallback_reason"], "upstream_error");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b = ask(&stack, q.clone()).await;
    assert_eq!(b["cached"], false, "fallback answers are not cached");
    assert_eq!(up.hits(), 2);
    // Once the cloud recovers, the better answer is served and cached.
    up.set_mode(Mode::Ok);
    let c = ask(&stack, q.clone()).await;
    assert_eq!(c["provider"], "cloud");
    wait_until("the good answer cached", Duration::from_secs(5), || async {
        ask(&stack, q.clone()).await["cached"] == true
    })
    .await;

    // Errors are not cached either.
    up.set_mode(Mode::Status(400));
    let bad = json!({"prompt": "rejected upstream", "provider": "cloud"});
    for _ in 0..2 {
        let resp = reqwest::Client::new()
            .post(stack.url("/generate"))
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
    }
    assert_eq!(up.hits(), 5);
}

#[tokio::test]
async fn without_jetstream_requests_are_still_answered() {
    let nats = NatsServer::start_without_jetstream();
    let stack = Stack::start(test_config(&nats.url())).await;
    for _ in 0..3 {
        let v = ask(&stack, json!({"prompt": "no cache here"})).await;
        assert_eq!(v["cached"], false);
    }
    let errors = router_metric(&stack, "llm_cache_events_total", &[("event_type", "error")])
        .await
        .unwrap();
    assert!(errors >= 3.0, "{errors}");
}

#[tokio::test]
async fn a_dead_owners_placeholder_is_taken_over_when_it_expires() {
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::Ok).await;
    let stack = stack_with(&up, &nats, |_| {}).await;
    let mut req = GenerateRequest::new("orphaned question");
    req.provider = ProviderChoice::Cloud;
    let key = optiroute_router::cache::cache_key(&req, optiroute_common::wire::Pool::Cloud);
    // A router that died mid-request left its placeholder, due to expire soon.
    let js = async_nats::jetstream::new(client(&stack.cfg, "ghost").await);
    let kv = js.get_key_value("optiroute-cache").await.unwrap();
    let expires =
        optiroute_common::nats::epoch_ms(std::time::SystemTime::now() + Duration::from_millis(500));
    kv.put(&key, format!("pending:{expires}").into())
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let v = ask(
        &stack,
        json!({"prompt": "orphaned question", "provider": "cloud"}),
    )
    .await;
    let waited = started.elapsed();
    assert_eq!(v["cached"], false);
    assert_eq!(up.hits(), 1);
    assert!(
        waited >= Duration::from_millis(300),
        "it waited for the owner: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(5),
        "took over at expiry, not after the 10 s coalescing wait: {waited:?}"
    );
    wait_until(
        "the answer to replace the placeholder",
        Duration::from_secs(5),
        || async {
            ask(
                &stack,
                json!({"prompt": "orphaned question", "provider": "cloud", "cache": "read_only"}),
            )
            .await["cached"]
                == true
        },
    )
    .await;
}

/// `route_bias` changes which pool answers, so it changes the answer: a
/// cheap local answer given to a caller who asked for cheaper must not be
/// served to an `auto` caller whom routing sends to the cloud.
#[tokio::test]
async fn an_answer_routed_by_bias_is_not_served_to_a_caller_routed_elsewhere() {
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::Ok).await;
    let stack = stack_with(&up, &nats, |_| {}).await;
    let prompt = "Prove that sqrt(2) is irrational.";
    let cheap = ask(&stack, json!({"prompt": prompt, "route_bias": -1.0})).await;
    assert_eq!(cheap["routed_to"], "local", "{cheap}");
    assert_eq!(cheap["cached"], false);
    // The cheap answer is in the cache for callers routed the same way.
    wait_until(
        "the cheap answer cached",
        Duration::from_secs(5),
        || async {
            ask(
                &stack,
                json!({"prompt": prompt, "route_bias": -1.0, "cache": "read_only"}),
            )
            .await["cached"]
                == true
        },
    )
    .await;
    let auto = ask(&stack, json!({"prompt": prompt})).await;
    assert_eq!(auto["routed_to"], "cloud", "{auto}");
    assert_eq!(
        auto["cached"], false,
        "a local answer served to a cloud route: {auto}"
    );
    assert_eq!(auto["provider"], "cloud");
    assert_eq!(up.hits(), 1);
    // The key is the pool routing chose: an explicit `local` request for
    // the same prompt is the same question to the same pool.
    let local = ask(&stack, json!({"prompt": prompt, "provider": "local"})).await;
    assert_eq!(local["cached"], true, "{local}");
    assert_eq!(local["text"], cheap["text"]);
    assert_eq!(local["route_reason"], "provider local requested");
}

/// Fifty identical requests, sent at once with one deadline (a client
/// fanning out), wait on a leader whose provider call times out.
/// Leadership passes to one waiter at a time, so the struggling upstream
/// sees the leader's call and its successor's before the deadline passes,
/// never fifty at once.
#[tokio::test]
async fn fifty_waiters_behind_a_leader_that_times_out_make_at_most_two_upstream_calls() {
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::Hang).await;
    let mut cfg = test_config(&nats.url());
    cfg.cloud.upstream.base_url = up.base_url();
    // Each attempt gives up after 1 s; the requests after 1.5 s.
    cfg.cloud.upstream.timeout_ms = 1_000;
    // No local pool: the fallback fails at once, so the leader's failure is the timeout.
    // Held to the end: dropping it stops the workers.
    let _stack = Stack::start_parts(
        cfg.clone(),
        Parts {
            ingress: false,
            local: false,
            ..Parts::ALL
        },
    )
    .await;
    let c = client(&cfg, "fan-out").await;
    let deadline = optiroute_common::nats::epoch_ms(
        std::time::SystemTime::now() + Duration::from_millis(1_500),
    )
    .to_string();
    let headers = [("Optiroute-Deadline", deadline.as_str())];
    let body = r#"{"prompt": "popular and slow", "provider": "cloud"}"#;
    let calls = (0..50).map(|_| request_json(&c, "optiroute.generate", &headers, body));
    let answers: Vec<Value> = join_all(calls).await.iter().map(json_body).collect();
    for a in &answers {
        assert!(
            a["code"] == "timeout" || a["code"] == "all_providers_failed",
            "{a}"
        );
    }
    let hits = up.hits();
    assert!((1..=2).contains(&hits), "the upstream saw {hits} calls");
}

/// Beyond `cache.max_waiters_per_key` identical requests in flight, one more
/// is refused with 429 rather than piling onto the pool on its own.
#[tokio::test]
async fn waiters_beyond_the_cap_are_refused_with_429() {
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::Slow(Duration::from_millis(500))).await;
    let stack = stack_with(&up, &nats, |c| c.cache.max_waiters_per_key = 2).await;
    let body = json!({"prompt": "capped question", "provider": "cloud"});
    let calls = (0..6).map(|_| stack.generate(&body));
    let answers = join_all(calls).await;
    let ok = answers.iter().filter(|(s, _)| *s == 200).count();
    let refused: Vec<_> = answers.iter().filter(|(s, _)| *s == 429).collect();
    assert_eq!(ok, 3, "the leader and two waiters: {answers:?}");
    assert_eq!(refused.len(), 3, "{answers:?}");
    assert!(
        refused[0].1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("identical requests"),
        "{:?}",
        refused[0]
    );
    assert_eq!(up.hits(), 1);
}
