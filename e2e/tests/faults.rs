//! Bad input and faults: each gets a precise error, nothing hangs, and the
//! workers keep serving.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use optiroute_common::nats::{NATS_SERVICE_ERROR, NATS_SERVICE_ERROR_CODE};
use optiroute_common::wire::{self, Format, GenerateRequest, GenerateResponse};
use optiroute_testkit::stack::{client, Parts};
use optiroute_testkit::{json_body, request_json, test_config, wait_until, NatsServer, Stack};
use serde_json::{json, Value};

async fn post_raw(stack: &Stack, body: &str) -> (u16, Value) {
    stack.post_raw("/generate", body.to_string()).await
}

#[tokio::test]
async fn bad_http_input_is_a_400_naming_the_field() {
    let nats = NatsServer::start();
    let stack = Stack::start(test_config(&nats.url())).await;
    let long = "x".repeat(32 * 1024 + 1);
    let cases: Vec<(String, &str)> = vec![
        ("{not json".into(), ""),
        ("[]".into(), ""),
        (r#"{"max_tokens": 5}"#.into(), "prompt"),
        (r#"{"prompt": ""}"#.into(), "prompt"),
        (r#"{"prompt": "   \n\t"}"#.into(), "prompt"),
        (json!({"prompt": long}).to_string(), "prompt"),
        (r#"{"prompt": "hi", "max_tokens": 0}"#.into(), "max_tokens"),
        (
            r#"{"prompt": "hi", "max_tokens": 4097}"#.into(),
            "max_tokens",
        ),
        (r#"{"prompt": "hi", "max_tokens": -3}"#.into(), "max_tokens"),
        (
            r#"{"prompt": "hi", "max_tokens": "ten"}"#.into(),
            "max_tokens",
        ),
        (r#"{"prompt": "hi", "provider": "mars"}"#.into(), "provider"),
        (r#"{"prompt": 42}"#.into(), "prompt"),
        (
            r#"{"prompt": "hi", "temperature": 9}"#.into(),
            "temperature",
        ),
    ];
    for (body, field) in cases {
        let (status, v) = post_raw(&stack, &body).await;
        assert_eq!(status, 400, "{body:.80} -> {v}");
        assert_eq!(v["error"]["code"], "bad_request", "{v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(field),
            "{body:.80}: `{message}` should name `{field}`"
        );
    }
    // The pipeline still serves after all that.
    let (status, _) = post_raw(&stack, r#"{"prompt":"still alive?"}"#).await;
    assert_eq!(status, 200);
    // Unknown route: our JSON error, not an empty 404.
    let resp = reqwest::get(stack.url("/nope")).await.unwrap();
    assert_eq!(resp.status(), 404);
    let v: Value = resp.json().await.unwrap();
    assert!(v["error"]["message"].is_string());
}

#[tokio::test]
async fn garbage_on_nats_gets_an_error_reply_and_workers_keep_serving() {
    let nats = NatsServer::start();
    let stack = Stack::start_parts(test_config(&nats.url()), Parts::WORKERS).await;
    let c = client(&stack.cfg, "vandal").await;
    for subject in [
        "optiroute.generate",
        "optiroute.provider.local",
        "optiroute.provider.cloud",
    ] {
        // Garbage bytes, read as MessagePack.
        let msg = c
            .request(subject, bytes::Bytes::from_static(b"\xc1\xff garbage"))
            .await
            .unwrap();
        let h = msg.headers.as_ref().expect("error headers");
        assert_eq!(
            h.get(NATS_SERVICE_ERROR_CODE).unwrap().as_str(),
            "400",
            "{subject}"
        );
        assert!(h.get(NATS_SERVICE_ERROR).is_some());
        let body: optiroute_common::error::ErrorBody =
            wire::decode(Format::MsgPack, &msg.payload).unwrap();
        assert_eq!(body.code, optiroute_common::ErrorKind::BadRequest);

        // A wrong-typed field, as JSON.
        let v = json_body(
            &request_json(&c, subject, &[], r#"{"prompt": ["x"], "max_tokens": 3}"#).await,
        );
        assert_eq!(v["code"], "bad_request", "{subject}: {v}");
        assert!(v["message"].as_str().unwrap().contains("prompt"), "{v}");

        // Valid shape, invalid value.
        let v = json_body(
            &request_json(&c, subject, &[], r#"{"prompt": "hi", "max_tokens": 0}"#).await,
        );
        assert!(v["message"].as_str().unwrap().contains("max_tokens"), "{v}");
    }
    // Still serving.
    let msg = c
        .request(
            "optiroute.generate",
            wire::encode(Format::MsgPack, &GenerateRequest::new("ok?")).unwrap(),
        )
        .await
        .unwrap();
    let r: GenerateResponse = wire::decode(Format::MsgPack, &msg.payload).unwrap();
    assert!(!r.completion.text.is_empty());
}

#[tokio::test]
async fn no_router_is_a_fast_503() {
    let nats = NatsServer::start();
    let stack = Stack::start_parts(
        test_config(&nats.url()),
        Parts {
            router: false,
            ..Parts::ALL
        },
    )
    .await;
    let started = Instant::now();
    let resp = reqwest::Client::new()
        .post(stack.url("/generate"))
        .json(&json!({"prompt": "anyone?"}))
        .send()
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(resp.status(), 503);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "no_responders");
    let ready = reqwest::get(stack.url("/ready")).await.unwrap();
    assert_eq!(ready.status(), 503);
    // The UI's panel counts it as failed, with no router seen.
    let (_, stats) = stack.get("/stats").await;
    let stats: Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["requests"]["failed"], 1, "{stats}");
    assert_eq!(stats["requests"]["total"], 0, "{stats}");
    assert_eq!(stats["routers"]["workers"], 0, "{stats}");
}

#[tokio::test]
async fn nats_outage_is_a_fast_503_and_everything_recovers() {
    let mut nats = NatsServer::start();
    let stack = Stack::start(test_config(&nats.url())).await;
    let http = reqwest::Client::new();
    let ok = http
        .post(stack.url("/generate"))
        .json(&json!({"prompt": "before"}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);

    nats.stop();
    // Wait until the ingress has noticed the disconnect.
    wait_until(
        "ingress to see NATS down",
        Duration::from_secs(10),
        || async { reqwest::get(stack.url("/ready")).await.unwrap().status() == 503 },
    )
    .await;
    let started = Instant::now();
    let resp = http
        .post(stack.url("/generate"))
        .json(&json!({"prompt": "during"}))
        .send()
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(resp.status(), 503);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "nats_unavailable");

    nats.restart();
    // Every process reconnects by itself; the path works end to end again.
    wait_until(
        "the pipeline to recover",
        Duration::from_secs(15),
        || async {
            match http
                .post(stack.url("/generate"))
                .json(&json!({"prompt": "after", "cache": "off"}))
                .send()
                .await
            {
                Ok(r) => r.status() == 200,
                Err(_) => false,
            }
        },
    )
    .await;
    let v: Value = http
        .post(stack.url("/generate"))
        .json(&json!({"prompt": "after again", "provider": "local"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["provider"], "local");
    assert_eq!(
        reqwest::get(stack.url("/ready")).await.unwrap().status(),
        200
    );
}

#[tokio::test]
async fn a_reply_that_does_not_come_in_time_is_a_504() {
    let nats = NatsServer::start();
    let mut cfg = test_config(&nats.url());
    cfg.ingress.request_timeout_ms = 300;
    cfg.local.simulated.base_ms = 2_000;
    let stack = Stack::start_parts(
        cfg,
        Parts {
            cloud: false,
            ..Parts::ALL
        },
    )
    .await;
    let started = Instant::now();
    let resp = reqwest::Client::new()
        .post(stack.url("/generate"))
        .json(&json!({"prompt": "slow one", "provider": "local"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 504);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "timeout");
}

#[tokio::test]
async fn expired_deadline_is_refused_without_work() {
    let nats = NatsServer::start();
    let stack = Stack::start_parts(test_config(&nats.url()), Parts::WORKERS).await;
    let c = client(&stack.cfg, "late").await;
    let late = [("Optiroute-Deadline", "1000")];
    let v = json_body(
        &request_json(
            &c,
            "optiroute.provider.local",
            &late,
            r#"{"prompt":"too late"}"#,
        )
        .await,
    );
    assert_eq!(v["code"], "timeout");
    let soon = [("Optiroute-Deadline", "soon")];
    let v = json_body(
        &request_json(
            &c,
            "optiroute.generate",
            &soon,
            r#"{"prompt":"bad header"}"#,
        )
        .await,
    );
    assert_eq!(v["code"], "bad_request");
    assert!(v["message"]
        .as_str()
        .unwrap()
        .contains("Optiroute-Deadline"));
}

/// A direct publisher asking for a ten-minute deadline holds a router slot
/// no longer than `router.max_deadline_ms`: the deadline is clamped (not
/// refused), and the request ends when the clamped deadline passes.
#[tokio::test]
async fn a_deadline_beyond_the_maximum_is_clamped() {
    let nats = NatsServer::start();
    let mut cfg = test_config(&nats.url());
    cfg.router.max_deadline_ms = 1_000;
    cfg.router.default_deadline_ms = 1_000;
    cfg.router.provider_timeout_ms = 60_000;
    // A local pool that would take 30 s.
    cfg.local.simulated.base_ms = 30_000;
    let stack = Stack::start_parts(
        cfg,
        Parts {
            ingress: false,
            cloud: false,
            ..Parts::ALL
        },
    )
    .await;
    let c = client(&stack.cfg, "patient").await;
    let ten_minutes =
        optiroute_common::nats::epoch_ms(std::time::SystemTime::now() + Duration::from_secs(600))
            .to_string();
    let started = Instant::now();
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        request_json(
            &c,
            "optiroute.generate",
            &[("Optiroute-Deadline", ten_minutes.as_str())],
            r#"{"prompt":"take your time","provider":"local"}"#,
        ),
    )
    .await
    .expect("answered at the clamped deadline, not after the 30 s of work");
    let waited = started.elapsed();
    let v = json_body(&reply);
    assert!(
        v["code"] == "timeout" || v["code"] == "all_providers_failed",
        "{v}"
    );
    assert!(waited >= Duration::from_millis(700), "{waited:?}");
    assert!(waited < Duration::from_secs(3), "{waited:?}");
}
