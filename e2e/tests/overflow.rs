//! Load-aware routing: simple prompts overflow to the cloud when the local
//! pool could not start them within `router.routing.local_max_wait_ms`,
//! and queue for it when overflow is off.

use std::time::Duration;

use optiroute_common::config::Config;
use optiroute_testkit::{metric, scrape, test_config, FakeUpstream, Mode, NatsServer, Stack};
use serde_json::{json, Value};

/// A local pool with one slot and a 2 s service time.
fn config(nats: &NatsServer, up: &FakeUpstream, max_wait_ms: u64) -> Config {
    let mut c = test_config(&nats.url());
    c.local.max_in_flight = 1;
    c.local.simulated.base_ms = 2_000;
    c.local.simulated.max_ms = 2_000;
    c.cloud.upstream.base_url = up.base_url();
    c.router.routing.local_max_wait_ms = max_wait_ms;
    c.ingress.request_timeout_ms = 30_000;
    c.router.provider_timeout_ms = 30_000;
    c
}

/// Ten simple prompts at once: the pools that answered, and the answers.
async fn burst(stack: &Stack) -> Vec<Value> {
    let url = stack.url("/generate");
    let mut tasks = Vec::new();
    for i in 0..10 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let resp = reqwest::Client::new()
                .post(url)
                .json(&json!({"prompt": format!("hi {i}"), "max_tokens": 5}))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), 200);
            resp.json::<Value>().await.unwrap()
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Waits until the router has read the local pool's stats once.
async fn stats_read() {
    tokio::time::sleep(Duration::from_millis(600)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn simple_prompts_overflow_to_the_cloud_when_the_local_pool_is_full() {
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::Ok).await;
    let stack = Stack::start(config(&nats, &up, 500)).await;
    stats_read().await;
    let answers = burst(&stack).await;
    let local = answers.iter().filter(|a| a["provider"] == "local").count();
    let overflowed: Vec<&Value> = answers
        .iter()
        .filter(|a| a["provider"] == "cloud")
        .collect();
    println!(
        "{local} local, {} overflowed: {}",
        overflowed.len(),
        answers[0]["route_reason"]
    );
    assert_eq!(local, 1, "one slot: one prompt is served locally at once");
    assert_eq!(overflowed.len(), 9);
    for a in &overflowed {
        assert_eq!(a["routed_to"], "cloud");
        let reason = a["route_reason"].as_str().unwrap();
        assert!(reason.starts_with("overflow:"), "{reason}");
    }
    let router = scrape(stack.router.as_ref().unwrap().admin_addr).await;
    assert_eq!(
        metric(
            &router,
            "llm_route_decisions_total",
            &[("reason", "overflow")]
        ),
        Some(9.0)
    );
    // The local pool reports its saturation and the replicas it needs.
    let local_admin = stack.local.as_ref().unwrap().admin_addr;
    optiroute_testkit::wait_until("load reported", Duration::from_secs(12), || async move {
        let text = scrape(local_admin).await;
        metric(
            &text,
            "optiroute_pool_desired_replicas",
            &[("pool", "local")],
        )
        .is_some_and(|v| v > 0.0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_overflow_off_simple_prompts_queue_for_the_local_pool() {
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::Ok).await;
    let stack = Stack::start(config(&nats, &up, 0)).await;
    stats_read().await;
    let started = std::time::Instant::now();
    let answers = burst(&stack).await;
    assert!(answers.iter().all(|a| a["provider"] == "local"));
    assert_eq!(up.hits(), 0);
    // One slot of 2 s: the tenth waited for the nine before it.
    assert!(
        started.elapsed() >= Duration::from_secs(18),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_prompts_that_would_wait_past_the_objective_overflow() {
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::Ok).await;
    let mut cfg = config(&nats, &up, 470);
    // 100 ms a prompt: the 5th in line waits 400 ms, the 6th 500 ms.
    cfg.local.simulated.base_ms = 100;
    cfg.local.simulated.max_ms = 100;
    let stack = Stack::start(cfg).await;
    // One prompt first, so the pool's stats know its service time.
    let (status, _) = stack
        .generate(&json!({"prompt": "warm up", "cache": "off"}))
        .await;
    assert_eq!(status, 200);
    stats_read().await;
    let answers = burst(&stack).await;
    let local = answers.iter().filter(|a| a["provider"] == "local").count();
    println!("{local} of 10 local");
    for a in answers.iter().filter(|a| a["provider"] == "cloud") {
        let reason = a["route_reason"].as_str().unwrap();
        assert!(reason.contains("expected wait is"), "{reason}");
    }
    // 1 being served + 4 queued within 470 ms (400 ms for the last).
    assert_eq!(local, 5, "{answers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cached_local_answer_is_served_not_overflowed() {
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::Ok).await;
    let stack = Stack::start(config(&nats, &up, 500)).await;
    stats_read().await;
    let ask = |prompt: &'static str| {
        let url = stack.url("/generate");
        async move {
            reqwest::Client::new()
                .post(url)
                .json(&json!({"prompt": prompt, "max_tokens": 5}))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let first = ask("hi cached").await;
    assert_eq!(first["provider"], "local", "{first}");
    // The pool's one slot busy for 2 s...
    let busy = tokio::spawn(ask("hi busy"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ...the cached prompt is served from the cache, not sent to the cloud.
    let again = ask("hi cached").await;
    assert_eq!(again["cached"], true, "{again}");
    assert_eq!(again["routed_to"], "local", "{again}");
    assert_eq!(up.hits(), 0);
    busy.await.unwrap();
}
