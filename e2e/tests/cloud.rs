//! The cloud pool against a fake OpenAI-compatible upstream: circuit
//! breaker, timeouts, rate limits, client errors, missing credentials, and
//! cost accounting.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use optiroute_common::config::Config;
use optiroute_testkit::stack::Parts;
use optiroute_testkit::{
    metric, scrape, test_config, wait_until, FakeUpstream, Mode, NatsServer, Stack,
};
use serde_json::{json, Value};

async fn ask(stack: &Stack, body: Value) -> (u16, Value) {
    stack.generate(&body).await
}

/// A cloud request that must not be served from the cache.
fn cloud_prompt(i: usize) -> Value {
    json!({"prompt": format!("question number {i}"), "provider": "cloud", "cache": "off"})
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

#[tokio::test]
async fn breaker_opens_after_three_failures_then_one_probe_closes_it() {
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::Status(500)).await;
    let stack = stack_with(&up, &nats, |c| c.cloud.breaker.open_ms = 400).await;

    for i in 0..3 {
        let (status, v) = ask(&stack, cloud_prompt(i)).await;
        assert_eq!(status, 200);
        assert_eq!(v["provider"], "local");
        assert_eq!(v["routed_to"], "cloud");
        assert_eq!(v["fallback_reason"], "upstream_error");
    }
    assert_eq!(up.hits(), 3);
    for i in 3..8 {
        let (_, v) = ask(&stack, cloud_prompt(i)).await;
        assert_eq!(v["fallback_reason"], "circuit_open", "{v}");
        assert_eq!(v["provider"], "local");
    }
    assert_eq!(up.hits(), 3, "an open breaker makes no upstream call");
    let cloud_admin = stack.cloud.as_ref().unwrap().admin_addr;
    assert_eq!(
        metric(
            &scrape(cloud_admin).await,
            "llm_circuit_breaker_state",
            &[("provider", "cloud")]
        ),
        Some(1.0)
    );

    // After the open period exactly one probe reaches the upstream; it succeeds and closes the breaker.
    up.set_mode(Mode::Ok);
    let mut i = 100;
    wait_until(
        "a probe to close the breaker",
        Duration::from_secs(5),
        || {
            i += 1;
            let stack = &stack;
            async move { ask(stack, cloud_prompt(i)).await.1["provider"] == "cloud" }
        },
    )
    .await;
    assert_eq!(up.hits(), 4, "one probe, then closed");
    let (_, v) = ask(&stack, cloud_prompt(1000)).await;
    assert_eq!(v["provider"], "cloud");
    assert_eq!(up.hits(), 5);
    let text = scrape(cloud_admin).await;
    assert_eq!(
        metric(&text, "llm_circuit_breaker_state", &[("provider", "cloud")]),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &text,
            "llm_circuit_breaker_transitions_total",
            &[("to", "open")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            "llm_circuit_breaker_transitions_total",
            &[("to", "half_open")]
        ),
        Some(1.0)
    );
    let router = scrape(stack.router.as_ref().unwrap().admin_addr).await;
    // Five above, plus those sent while waiting for the open period to end.
    assert!(
        metric(
            &router,
            "llm_fallbacks_total",
            &[("reason", "circuit_open")]
        )
        .unwrap()
            >= 5.0
    );
    assert_eq!(
        metric(
            &router,
            "llm_fallbacks_total",
            &[("reason", "upstream_error")]
        ),
        Some(3.0)
    );
}

#[tokio::test]
async fn hanging_upstream_times_out_and_local_answers_within_the_deadline() {
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::Hang).await;
    let stack = stack_with(&up, &nats, |c| {
        c.cloud.upstream.timeout_ms = 300;
        c.ingress.request_timeout_ms = 2_000;
    })
    .await;
    let started = Instant::now();
    let (status, v) = ask(&stack, cloud_prompt(0)).await;
    assert_eq!(status, 200);
    assert_eq!(v["provider"], "local");
    assert_eq!(v["fallback_reason"], "timeout");
    assert!(started.elapsed() < Duration::from_secs(2));
    let text = scrape(stack.cloud.as_ref().unwrap().admin_addr).await;
    assert_eq!(
        metric(&text, "llm_upstream_errors_total", &[("kind", "timeout")]),
        Some(1.0)
    );
}

#[tokio::test]
async fn rate_limit_honours_a_longer_retry_after() {
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::RateLimited(30)).await;
    let stack = stack_with(&up, &nats, |c| {
        c.cloud.breaker.failure_threshold = 1;
        c.cloud.breaker.open_ms = 50;
    })
    .await;
    let (_, v) = ask(&stack, cloud_prompt(0)).await;
    assert_eq!(v["fallback_reason"], "rate_limited");
    up.set_mode(Mode::Ok);
    // Well past the 50 ms open period, Retry-After (30 s) still holds the breaker open.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, v) = ask(&stack, cloud_prompt(1)).await;
    assert_eq!(v["fallback_reason"], "circuit_open");
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn client_errors_are_passed_back_not_retried() {
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::Status(400)).await;
    let stack = stack_with(&up, &nats, |_| {}).await;
    for i in 0..4 {
        let (status, v) = ask(&stack, cloud_prompt(i)).await;
        assert_eq!(status, 400, "{v}");
        assert_eq!(v["error"]["code"], "upstream_client_error");
    }
    assert_eq!(up.hits(), 4, "client errors never open the breaker");
    let local = scrape(stack.local.as_ref().unwrap().admin_addr).await;
    assert_eq!(
        metric(
            &local,
            "optiroute_requests_total",
            &[("service", "optiroute-local")]
        ),
        Some(0.0),
        "no fallback to local"
    );
}

#[tokio::test]
async fn no_token_means_not_configured_and_local_answers() {
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::Ok).await;
    let stack = stack_with(&up, &nats, |c| c.cloud.upstream.api_key = None).await;
    let (status, v) = ask(&stack, cloud_prompt(0)).await;
    assert_eq!(status, 200);
    assert_eq!(v["provider"], "local");
    assert_eq!(v["fallback_reason"], "not_configured");
    assert_eq!(up.hits(), 0);
    let ready = reqwest::get(format!(
        "http://{}/ready",
        stack.cloud.as_ref().unwrap().admin_addr
    ))
    .await
    .unwrap();
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.unwrap();
    assert!(body["reason"]
        .as_str()
        .unwrap()
        .starts_with("not_configured"));
}

#[tokio::test]
async fn no_cloud_workers_falls_back_fast() {
    let nats = NatsServer::start();
    let mut cfg = test_config(&nats.url());
    cfg.router.provider_timeout_ms = 10_000;
    let stack = Stack::start_parts(
        cfg,
        Parts {
            cloud: false,
            ..Parts::ALL
        },
    )
    .await;
    let started = Instant::now();
    let (_, v) = ask(&stack, cloud_prompt(0)).await;
    assert_eq!(v["fallback_reason"], "no_responders");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "no waiting for a timeout: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn missing_usage_is_estimated_and_marked() {
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::NoUsage).await;
    let stack = stack_with(&up, &nats, |_| {}).await;
    let (_, v) = ask(&stack, cloud_prompt(0)).await;
    assert_eq!(v["provider"], "cloud");
    assert_eq!(v["usage"]["estimated"], true);
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn cost_counters_equal_the_sum_of_reply_costs() {
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::Ok).await;
    let stack = stack_with(&up, &nats, |c| c.local.simulated.base_ms = 5).await;
    let mut total = 0.0;
    let mut cloud_total = 0.0;
    for i in 0..12 {
        let provider = if i % 3 == 0 { "cloud" } else { "local" };
        // Repeats hit the cache, which must add no cost anywhere.
        let (_, v) = ask(
            &stack,
            json!({"prompt": format!("cost check {}", i % 8), "provider": provider}),
        )
        .await;
        let cost = v["cost"].as_f64().unwrap();
        if v["cached"] == true {
            assert_eq!(cost, 0.0);
        }
        if v["provider"] == "cloud" && v["cached"] == false {
            // 10 prompt + 20 completion tokens at $0.0002 per 1k each way.
            assert!((cost - 30.0 * 0.0002 / 1000.0).abs() < 1e-12, "{cost}");
            cloud_total += cost;
        }
        total += cost;
    }
    let local = metric(
        &scrape(stack.local.as_ref().unwrap().admin_addr).await,
        "llm_total_cost_usd_total",
        &[("provider", "local")],
    )
    .unwrap();
    let cloud = metric(
        &scrape(stack.cloud.as_ref().unwrap().admin_addr).await,
        "llm_total_cost_usd_total",
        &[("provider", "cloud")],
    )
    .unwrap();
    assert!(local > 0.0);
    assert!(
        (cloud - cloud_total).abs() < 1e-12,
        "{cloud} vs {cloud_total}"
    );
    assert!(
        (local + cloud - total).abs() < 1e-9,
        "{local} + {cloud} vs {total}"
    );
}

/// `Retry-After: 18446744073709551615` (u64::MAX seconds) must neither
/// panic the worker (the request would then wait out its deadline and the
/// breaker never open) nor open the breaker for ever: the open period is
/// clamped to `cloud.breaker.max_open_ms`.
#[tokio::test]
async fn a_huge_retry_after_opens_the_breaker_for_at_most_max_open() {
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::RateLimited(u64::MAX)).await;
    let stack = stack_with(&up, &nats, |c| {
        c.cloud.breaker.failure_threshold = 1;
        c.cloud.breaker.open_ms = 50;
        c.cloud.breaker.max_open_ms = 1_000;
    })
    .await;
    let started = Instant::now();
    let (status, v) = ask(&stack, cloud_prompt(0)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["fallback_reason"], "rate_limited", "{v}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered at once, not at the provider timeout: {:?}",
        started.elapsed()
    );
    up.set_mode(Mode::Ok);
    let (_, v) = ask(&stack, cloud_prompt(1)).await;
    assert_eq!(
        v["fallback_reason"], "circuit_open",
        "the breaker opened: {v}"
    );
    // Within max_open_ms (1 s), not in 584 billion years, a probe goes through.
    let mut i = 2;
    wait_until(
        "the breaker to admit a probe",
        Duration::from_secs(5),
        || {
            i += 1;
            let q = cloud_prompt(i);
            async { ask(&stack, q).await.1["provider"] == "cloud" }
        },
    )
    .await;
    assert_eq!(up.hits(), 2);
}

/// Token counts from the upstream are saturated, never overflowed: two
/// u32::MAX counts (whose sum overflows) and counts beyond any integer
/// type are served as u32::MAX, priced, and counted once.
#[tokio::test]
async fn huge_upstream_token_counts_saturate() {
    let nats = NatsServer::start();
    let max = u64::from(u32::MAX);
    let up = FakeUpstream::start(Mode::Usage(json!({
        "prompt_tokens": max, "completion_tokens": max, "total_tokens": 2 * max
    })))
    .await;
    let stack = stack_with(&up, &nats, |_| {}).await;
    let (status, a) = ask(&stack, cloud_prompt(0)).await;
    assert_eq!(status, 200, "{a}");
    assert_eq!(a["provider"], "cloud", "{a}");
    assert_eq!(a["usage"]["prompt_tokens"], max);
    assert_eq!(a["usage"]["completion_tokens"], max);
    assert_eq!(a["usage"]["total_tokens"], max, "saturated, not wrapped");
    up.set_mode(Mode::Usage(json!({
        "prompt_tokens": 1e30, "completion_tokens": 18446744073709551615u64, "total_tokens": 1e300
    })));
    let (status, b) = ask(&stack, cloud_prompt(1)).await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["provider"], "cloud", "{b}");
    assert_eq!(b["usage"]["prompt_tokens"], max);
    assert_eq!(b["usage"]["completion_tokens"], max);
    // Both priced as 2 × u32::MAX tokens at $0.0002 per 1k, and counted once.
    let each = 2.0 * max as f64 * 0.0002 / 1000.0;
    for v in [&a, &b] {
        let cost = v["cost"].as_f64().unwrap();
        assert!((cost - each).abs() < 1e-9, "{cost} vs {each}");
    }
    let counted = metric(
        &scrape(stack.cloud.as_ref().unwrap().admin_addr).await,
        "llm_total_cost_usd_total",
        &[("provider", "cloud")],
    )
    .unwrap();
    assert!((counted - 2.0 * each).abs() < 1e-9, "{counted}");
}
