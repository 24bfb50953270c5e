//! The real binaries, each its own process, talking only over NATS: what
//! `scripts/up.sh` starts. Checks the HTTP path (routed by the default,
//! learned router with the embedding model up.sh fetches), per-process
//! metrics, config errors and graceful shutdown on SIGTERM.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use optiroute_testkit::procs::{bin_dir, free_ports, Proc};
use optiroute_testkit::{wait_until, NatsServer};
use serde_json::{json, Value};

#[tokio::test]
async fn the_real_binaries_serve_and_stop_cleanly() {
    // The embedding model the default router reads, as up.sh fetches it.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let fetched = Command::new("bash")
        .arg(root.join("scripts/fetch-embed-model.sh"))
        .output()
        .unwrap();
    assert!(
        fetched.status.success(),
        "{}",
        String::from_utf8_lossy(&fetched.stderr)
    );
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let [http, router, local, cloud, batch]: [u16; 5] = free_ports(5).try_into().unwrap();
    let config = dir.path().join("optiroute.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[nats]
url = "{url}"
max_reconnect_delay_ms = 200
[ingress]
listen = "127.0.0.1:{http}"
admin_listen = "127.0.0.1:0"
[router]
admin_listen = "127.0.0.1:{router}"
[cache]
max_bytes = 33554432
[local]
admin_listen = "127.0.0.1:{local}"
engine = "simulated"
[local.simulated]
base_ms = 5
per_token_ms = 0
[cloud]
admin_listen = "127.0.0.1:{cloud}"
[batch]
admin_listen = "127.0.0.1:{batch}"
# The stream and buckets have byte limits; these fit the test server's store.
max_queue_bytes = 33554432
max_results_bytes = 33554432
max_meta_bytes = 4194304
"#,
            url = nats.url()
        ),
    )
    .unwrap();
    let mut procs: Vec<Proc> = [
        "optiroute-local",
        "optiroute-cloud",
        "optiroute-router",
        "optiroute-batch",
        "optiroute-ingress",
    ]
    .into_iter()
    .map(|n| Proc::start(n, &config))
    .collect();

    let base = format!("http://127.0.0.1:{http}");
    wait_until("the ingress to be ready", Duration::from_secs(30), || {
        let url = format!("{base}/ready");
        async move { matches!(reqwest::get(url).await, Ok(r) if r.status() == 200) }
    })
    .await;
    // Every pool is subscribed before the first request (the ingress's /ready checks routers only).
    let nc = async_nats::connect(nats.url()).await.unwrap();
    for service in ["optiroute-local", "optiroute-cloud"] {
        wait_until(service, Duration::from_secs(30), || {
            let nc = nc.clone();
            async move {
                nc.request(format!("$SRV.PING.{service}"), "".into())
                    .await
                    .is_ok()
            }
        })
        .await;
    }
    let client = reqwest::Client::new();
    let v: Value = client
        .post(format!("{base}/generate"))
        .json(&json!({"prompt": "Hello"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["provider"], "local", "{v}");
    let reason = v["route_reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("learned score "),
        "the default router: {v}"
    );
    // A complex prompt is routed to the cloud, which has no token here: local answers and says why.
    let complex = "Design a fault-tolerant, multi-region payment ledger; compare event sourcing with a relational double-entry design step by step and justify the consistency model.";
    let v: Value = client
        .post(format!("{base}/generate"))
        .json(&json!({"prompt": complex}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["routed_to"], "cloud", "{v}");
    assert!(
        v["route_reason"]
            .as_str()
            .unwrap_or_default()
            .starts_with("learned score "),
        "{v}"
    );
    assert_eq!(v["provider"], "local");
    assert_eq!(v["fallback_reason"], "not_configured");

    // Every process exposes its metrics.
    for (port, name) in [
        (http, "http_request_duration_seconds"),
        (router, "llm_cache_events_total"),
        (router, "optiroute_learned_router_active 1"),
        (local, "llm_total_cost_usd_total"),
        (cloud, "llm_circuit_breaker_state"),
    ] {
        let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(text.contains(name), "port {port} lacks {name}");
        assert!(text.contains("optiroute_build_info"));
    }

    // A batch through the `optiroute batch` command and the batch worker process.
    let input = dir.path().join("batch.jsonl");
    std::fs::write(
        &input,
        "{\"prompt\": \"one\", \"provider\": \"local\"}\n{\"custom_id\": \"b\", \"prompt\": \"two\"}\n{\"prompt\": \"three\", \"cache\": \"off\"}\n",
    )
    .unwrap();
    let cli = bin_dir().join("optiroute");
    let submitted = Command::new(&cli)
        .args(["batch", "submit"])
        .arg(&input)
        .args(["--wait", "--url", &base])
        .output()
        .unwrap();
    assert!(
        submitted.status.success(),
        "{}",
        String::from_utf8_lossy(&submitted.stderr)
    );
    let first: Value = serde_json::from_str(
        String::from_utf8_lossy(&submitted.stdout)
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let id = first["id"].as_str().unwrap();
    let results = Command::new(&cli)
        .args(["batch", "results", id, "--url", &base])
        .output()
        .unwrap();
    assert!(results.status.success());
    let lines: Vec<Value> = String::from_utf8_lossy(&results.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert!(lines.iter().all(|l| l["status"] == "ok"), "{lines:?}");
    assert_eq!(lines[1]["custom_id"], "b");
    let text = reqwest::get(format!("http://127.0.0.1:{batch}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("optiroute_batch_jobs_total"));

    // SIGTERM: each drains and exits 0, ingress first as an operator would.
    for p in procs.iter_mut().rev() {
        let status = p.terminate(Duration::from_secs(15));
        assert!(status.success(), "{} exited with {status}", p.name);
    }
}

#[test]
fn a_bad_config_key_is_named_and_the_exit_code_is_2() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[cache]\nttl_seconds = 5\n").unwrap();
    let out = Command::new(bin_dir().join("optiroute-router"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ttl_seconds"), "{err}");

    let out = Command::new(bin_dir().join("optiroute-ingress"))
        .arg("--bogus")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(bin_dir().join("optiroute-local"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--config"));
}
