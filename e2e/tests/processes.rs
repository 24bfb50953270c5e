//! The real binaries, each its own process, talking only over NATS: what
//! `scripts/up.sh` starts. Checks the HTTP path, per-process metrics, config
//! errors and graceful shutdown on SIGTERM.
#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use optiroute_testkit::{wait_until, NatsServer};
use serde_json::{json, Value};

/// The stack's binaries, from the same build as this test (what
/// `scripts/build.sh`, run by `up.sh` and `test.sh`, makes): the folder this
/// test binary's `deps/` sits in. Brought up to date once per run (a no-op
/// after `scripts/test.sh`), so the test never runs stale ones.
fn bin_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        // <target>/<profile>/deps/processes-<hash>
        let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
        let target = profile_dir.parent().unwrap();
        let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--workspace", "--quiet", "--target-dir"])
            .arg(target)
            .current_dir(&root);
        for bin in STACK_BINS.iter().chain(&["optiroute"]) {
            cmd.args(["--bin", bin]);
        }
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().unwrap();
        assert!(status.success(), "building the stack's binaries failed");
        profile_dir
    })
    .clone()
}

/// What `scripts/build.sh` builds (and `scripts/up.sh` starts); the tests
/// also run the `optiroute` CLI.
const STACK_BINS: [&str; 5] = [
    "optiroute-ingress",
    "optiroute-router",
    "optiroute-local",
    "optiroute-cloud",
    "optiroute-batch",
];

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed on drop.
struct Proc {
    name: &'static str,
    child: Child,
}

impl Proc {
    fn start(name: &'static str, config: &std::path::Path) -> Proc {
        let child = Command::new(bin_dir().join(name))
            .arg("--config")
            .arg(config)
            .env_remove("HF_API_TOKEN")
            .env_remove("OPTIROUTE_CLOUD_API_KEY")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Proc { name, child }
    }

    /// SIGTERM, then the exit status within `within`.
    fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not stop within {within:?} of SIGTERM",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn the_real_binaries_serve_and_stop_cleanly() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (http, router, local, cloud, batch) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
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
    assert_eq!(v["provider"], "local");
    assert_eq!(v["fallback_reason"], "not_configured");

    // Every process exposes its metrics.
    for (port, name) in [
        (http, "http_request_duration_seconds"),
        (router, "llm_cache_events_total"),
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
