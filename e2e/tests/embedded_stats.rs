//! The local pool running the embedded model reports its load (active
//! sequences, queue length, tokens/s) in the NATS service stats, where
//! routing and autoscaling can read it (`$SRV.STATS.optiroute-local`).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use optiroute_common::config::LocalEngineKind;
use optiroute_testkit::stack::{client, Parts};
use optiroute_testkit::{json_body, request_json, test_config, wait_until, NatsServer, Stack};
use serde_json::Value;

async fn load(c: &async_nats::Client) -> Value {
    let msg = c
        .request("$SRV.STATS.optiroute-local", "".into())
        .await
        .unwrap();
    json_body(&msg)["endpoints"][0]["data"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_pool_reports_active_sequences_queue_and_tokens_per_second() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new("bash")
        .arg(root.join("scripts/fetch-model.sh"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let nats = NatsServer::start();
    let mut cfg = test_config(&nats.url());
    cfg.local.engine = LocalEngineKind::Embedded;
    cfg.local.embedded.model_path = root
        .join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        .to_string_lossy()
        .into_owned();
    // One active sequence: the second request waits in line.
    cfg.local.embedded.max_concurrent = 1;
    cfg.local.default_deadline_ms = 60_000;
    let stack = Stack::start_parts(
        cfg,
        Parts {
            ingress: false,
            router: false,
            local: true,
            cloud: false,
        },
    )
    .await;
    let c = client(&stack.cfg, "observer").await;
    let idle = load(&c).await;
    assert_eq!(idle["engine"], "embedded", "{idle}");
    assert_eq!(idle["active_sequences"], 0);
    assert_eq!(idle["queued_sequences"], 0);
    assert_eq!(idle["max_active_sequences"], 1);
    assert_eq!(idle["tokens_per_second"], 0.0);

    let body = r#"{"prompt": "Write a long story about the sea.", "max_tokens": 160}"#;
    let calls: Vec<_> = (0..2)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move {
                json_body(&request_json(&c, "optiroute.provider.local", &[], body).await)
            })
        })
        .collect();
    wait_until("one active, one queued", Duration::from_secs(30), || {
        let c = c.clone();
        async move {
            let l = load(&c).await;
            l["active_sequences"] == 1 && l["queued_sequences"] == 1
        }
    })
    .await;
    wait_until("tokens/s above zero", Duration::from_secs(30), || {
        let c = c.clone();
        async move { load(&c).await["tokens_per_second"].as_f64().unwrap() > 0.0 }
    })
    .await;
    for call in calls {
        let reply = call.await.unwrap();
        assert!(reply["text"].as_str().is_some(), "{reply}");
    }
    let after = load(&c).await;
    assert_eq!(after["active_sequences"], 0, "{after}");
    assert_eq!(after["queued_sequences"], 0, "{after}");
    assert!(
        after["generated_tokens_total"].as_u64().unwrap() > 2,
        "{after}"
    );
}
