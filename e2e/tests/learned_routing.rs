//! `router.routing.kind = "learned"` through the whole pipeline over a real
//! nats-server: with the shipped weights and the embedding model the
//! answer's `route_reason` is the learned router's; with a weights file
//! that is missing or corrupt, the router still serves every request, routed
//! by the feature router, and `route_reason` says why.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use optiroute_common::config::RouterKind;
use optiroute_testkit::{test_config, FakeUpstream, Mode, NatsServer, Stack};
use serde_json::{json, Value};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The embedding model, fetched on first use as the embed tests do.
fn model_dir() -> String {
    let out = std::process::Command::new("bash")
        .arg(root().join("scripts/fetch-embed-model.sh"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/fetch-embed-model.sh failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    root()
        .join("models/all-MiniLM-L6-v2")
        .to_string_lossy()
        .into_owned()
}

async fn ask(stack: &Stack, prompt: &str) -> Value {
    let resp = reqwest::Client::new()
        .post(stack.url("/generate"))
        .json(&json!({ "prompt": prompt }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

#[tokio::test]
async fn learned_router_explains_its_decisions_and_falls_back_without_weights() {
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::Ok).await;
    let hard = "Implement a thread-safe bounded queue in C++ using condition variables.";

    let mut cfg = test_config(&nats.url());
    cfg.cloud.upstream.base_url = up.base_url();
    cfg.router.routing.kind = RouterKind::Learned;
    cfg.router.embedding.model_dir = model_dir();
    let stack = Stack::start(cfg.clone()).await;
    let body = ask(&stack, hard).await;
    assert_eq!(body["routed_to"], "cloud", "{body}");
    let reason = body["route_reason"].as_str().unwrap();
    assert!(reason.starts_with("learned "), "{reason}");
    let body = ask(&stack, "hello").await;
    assert_eq!(body["routed_to"], "local", "{body}");
    drop(stack);

    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("corrupt.json");
    std::fs::write(&corrupt, "{\"format\": ").unwrap();
    for (file, why) in [
        (dir.path().join("missing.json"), "missing.json"),
        (corrupt, "not a weights file"),
    ] {
        let mut cfg = cfg.clone();
        cfg.nats.prefix = format!("lr{}", why.len());
        cfg.router.routing.learned.weights_file = Some(file.to_string_lossy().into_owned());
        let stack = Stack::start(cfg).await;
        let body = ask(&stack, hard).await;
        assert_eq!(body["routed_to"], "cloud", "{body}");
        let reason = body["route_reason"].as_str().unwrap();
        assert!(
            reason.starts_with("learned router unavailable (weights ") && reason.contains(why),
            "{reason}"
        );
        assert!(reason.contains("features: score"), "{reason}");
    }
}

async fn router_metric(stack: &Stack, name: &str) -> f64 {
    let text = optiroute_testkit::scrape(stack.router.as_ref().unwrap().admin_addr).await;
    optiroute_testkit::metric(&text, name, &[]).unwrap_or(0.0)
}

/// The learned router and the semantic cache read one embedding per
/// request; a repeated prompt (an exact hit) computes none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_learned_router_and_the_semantic_cache_share_one_embedding() {
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::Ok).await;
    let mut cfg = test_config(&nats.url());
    cfg.cloud.upstream.base_url = up.base_url();
    cfg.router.routing.kind = RouterKind::Learned;
    cfg.router.embedding.model_dir = model_dir();
    let stack = Stack::start(cfg).await;
    let ask_semantic = |prompt: &'static str| {
        let stack = &stack;
        async move {
            let (status, v) = stack
                .generate(&json!({"prompt": prompt, "semantic": true}))
                .await;
            assert_eq!(status, 200, "{v}");
            v
        }
    };
    let hard = "Implement a thread-safe bounded queue in C++ using condition variables.";
    let first = ask_semantic(hard).await;
    assert!(
        first["route_reason"]
            .as_str()
            .unwrap()
            .starts_with("learned "),
        "{first}"
    );
    assert_eq!(first["cached"], false, "{first}");
    assert!(
        first.get("semantic_miss").is_some(),
        "the semantic cache looked: {first}"
    );
    assert_eq!(
        router_metric(&stack, "llm_embedding_seconds_count").await,
        1.0
    );
    let again = ask_semantic(hard).await;
    assert_eq!(again["cached"], true, "{again}");
    assert_eq!(again["route_reason"], first["route_reason"]);
    assert_eq!(
        router_metric(&stack, "llm_embedding_seconds_count").await,
        1.0
    );
}
