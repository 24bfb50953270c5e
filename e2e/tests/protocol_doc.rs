//! `docs/protocol.md` is enough to talk to OptiRoute from another language:
//! `e2e/py/protocol_client.py`, written from the document alone with
//! `nats-py` and `msgpack`, drives a real stack over a real nats-server
//! (JSON and MessagePack requests, errors, a streamed answer and its
//! cancellation, a provider subject, `$SRV` discovery, a batch job
//! published straight to the work queue and its result read from KV).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use optiroute_batch::BatchClient;
use optiroute_testkit::stack::{client, Parts};
use optiroute_testkit::{test_config, NatsServer, Stack};

#[tokio::test]
async fn a_python_client_written_from_the_protocol_document_works() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let deps = tokio::process::Command::new("bash")
        .arg(format!("{root}/scripts/py-deps.sh"))
        .status();
    let deps = tokio::time::timeout(Duration::from_secs(300), deps)
        .await
        .expect("scripts/py-deps.sh took over 5 minutes")
        .unwrap();
    assert!(deps.success(), "scripts/py-deps.sh failed");

    let nats = NatsServer::start();
    let mut cfg = test_config(&nats.url());
    // Streamed tokens 50 ms apart, so the client can cancel mid-answer.
    cfg.local.simulated.per_token_ms = 50;
    let stack = Stack::start_parts(cfg.clone(), Parts::WORKERS).await;
    let _worker = optiroute_batch::run(client(&cfg, "batch").await, &cfg, stack.shutdown.clone())
        .await
        .unwrap();
    // The work-queue stream and the results bucket exist before the
    // client publishes (an operator or any OptiRoute process makes them).
    BatchClient::open(client(&cfg, "setup").await, &cfg)
        .await
        .unwrap();

    let run = tokio::process::Command::new(format!("{root}/.tools/venv/bin/python"))
        .arg(format!("{root}/e2e/py/protocol_client.py"))
        .env("OPTIROUTE_NATS_URL", nats.url())
        .env("OPTIROUTE_PREFIX", &cfg.nats.prefix)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .expect("the Python client ran over 90 s")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for step in [
        "ok: json request",
        "ok: json cache hit",
        "ok: msgpack request",
        "ok: json error",
        "ok: msgpack error",
        "ok: encoding by header",
        "ok: past deadline is 504",
        "ok: foreign stream inbox is 400",
        "ok: stream",
        "ok: cancel",
        "ok: provider reply",
        "ok: services",
        "ok: batch result",
        "all ok",
    ] {
        assert!(stdout.contains(step), "missing `{step}` in:\n{stdout}");
    }
    println!("{stdout}");
}
