//! `optiroute keys|teams` against an in-process ingress, and `optiroute
//! spend export` against the spend stream of a real nats-server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use optiroute_accounts::model::Period;
use optiroute_accounts::spend::{self, SpendLog, SpendRecord};
use optiroute_accounts::store::now_ms;
use optiroute_accounts::to_nanos;
use optiroute_common::config::Config;
use optiroute_common::protocol::{JetStreamNames, Subjects};
use optiroute_common::wire::Pool;
use optiroute_testkit::{test_config, NatsServer};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const ADMIN: &str = "admin-key-0123456789abcdef";

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs `optiroute args...`, with `OPTIROUTE_ADMIN_KEY` set to `env_admin`.
async fn optiroute(args: &[&str], env_admin: Option<&str>) -> Out {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_optiroute"));
    cmd.args(args).env_remove("OPTIROUTE_ADMIN_KEY");
    cmd.env_remove("OPTIROUTE_CONFIG");
    if let Some(k) = env_admin {
        cmd.env("OPTIROUTE_ADMIN_KEY", k);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("the CLI answers within 30 s")
        .unwrap();
    Out {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs a command that must succeed and print one JSON value.
async fn json(args: &[&str]) -> Value {
    let out = optiroute(args, Some(ADMIN)).await;
    assert!(out.ok, "optiroute {args:?}: {}", out.stderr);
    serde_json::from_str(out.stdout.trim()).unwrap()
}

async fn start_ingress(cfg: &Config, shutdown: &CancellationToken) -> String {
    let client = optiroute_common::nats::connect(&cfg.nats, "ingress")
        .await
        .unwrap();
    let running = optiroute_ingress::run(client, cfg, shutdown.clone())
        .await
        .unwrap();
    format!("http://{}", running.addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_teams_commands() {
    let nats = NatsServer::start();
    let mut cfg = test_config(&nats.url());
    cfg.auth.admin_key = Some(ADMIN.into());
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let url = start_ingress(&cfg, &shutdown).await;
    let u = url.as_str();

    let team = json(&[
        "teams",
        "create",
        "red",
        "--budget-usd",
        "5",
        "--budget-period",
        "day",
        "--url",
        u,
    ])
    .await;
    assert_eq!(team["name"], "red");
    assert_eq!(team["budget_usd"], 5.0);
    assert_eq!(team["budget_period"], "day");

    // The admin key from the flag (and no env) works too.
    let out = optiroute(
        &[
            "keys",
            "create",
            "alice",
            "--team",
            "red",
            "--budget-usd",
            "1.5",
            "--rpm",
            "10",
            "--providers",
            "local,cloud",
            "--url",
            u,
            "--admin-key",
            ADMIN,
        ],
        None,
    )
    .await;
    assert!(out.ok, "{}", out.stderr);
    let created: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    let secret = created["key"].as_str().unwrap().to_string();
    assert!(secret.starts_with("sk-or-"));
    assert_eq!(created["rpm"], 10);
    assert_eq!(created["providers"], serde_json::json!(["local", "cloud"]));

    let list = json(&["keys", "list", "--url", u]).await;
    assert_eq!(list["keys"][0]["id"], id.as_str());
    assert!(
        !list.to_string().contains(&secret),
        "a listing never shows a secret"
    );
    let shown = json(&["keys", "show", &id, "--url", u]).await;
    assert_eq!(shown["name"], "alice");
    assert!(shown.get("hash").is_none());

    let updated = json(&[
        "keys",
        "update",
        &id,
        "--rpm",
        "none",
        "--budget-usd",
        "2",
        "--name",
        "alice2",
        "--url",
        u,
    ])
    .await;
    assert!(updated.get("rpm").is_none(), "{updated}");
    assert_eq!(updated["budget_usd"], 2.0);
    assert_eq!(updated["name"], "alice2");

    let revoked = json(&["keys", "revoke", &id, "--url", u]).await;
    assert_eq!(revoked["revoked"], true);

    let teams = json(&["teams", "list", "--url", u]).await;
    assert_eq!(teams["teams"][0]["name"], "red");
    let red = json(&["teams", "update", "red", "--budget-usd", "none", "--url", u]).await;
    assert!(red.get("budget_usd").is_none(), "{red}");
    assert_eq!(json(&["teams", "show", "red", "--url", u]).await, red);
    let deleted = json(&["teams", "delete", "red", "--url", u]).await;
    assert_eq!(deleted["deleted"], true);

    // Failures: exit code 2 and the server's reason on stderr.
    let out = optiroute(
        &[
            "keys",
            "list",
            "--url",
            u,
            "--admin-key",
            "wrong-wrong-wrong",
        ],
        None,
    )
    .await;
    assert!(!out.ok);
    assert!(out.stderr.contains("401"), "{}", out.stderr);
    let out = optiroute(&["keys", "list", "--url", u], None).await;
    assert!(!out.ok);
    assert!(out.stderr.contains("OPTIROUTE_ADMIN_KEY"), "{}", out.stderr);
    let out = optiroute(&["teams", "show", "red", "--url", u], Some(ADMIN)).await;
    assert!(!out.ok);
    assert!(out.stderr.contains("404"), "{}", out.stderr);
    let out = optiroute(
        &["keys", "create", "x", "--rpm", "0", "--url", u],
        Some(ADMIN),
    )
    .await;
    assert!(!out.ok);
    assert!(
        out.stderr.contains("400") && out.stderr.contains("`rpm`"),
        "{}",
        out.stderr
    );
    let out = optiroute(
        &["keys", "create", "x", "--rpm", "many", "--url", u],
        Some(ADMIN),
    )
    .await;
    assert!(!out.ok);
    assert!(out.stderr.contains("--rpm"), "{}", out.stderr);
    let out = optiroute(&["teams", "revoke", "red", "--url", u], Some(ADMIN)).await;
    assert!(!out.ok, "teams are deleted, not revoked");
}

fn record(key_id: &str, pool: Pool, cost: f64, ts_ms: u64, n: u32) -> SpendRecord {
    SpendRecord {
        ts_ms,
        request_id: format!("req-{key_id}-{n}"),
        key_id: key_id.to_string(),
        team: Some("red".into()),
        user: n.is_multiple_of(2).then(|| format!("user-{n}")),
        pool,
        model: "m".into(),
        prompt_tokens: n,
        completion_tokens: 2 * n,
        cost_usd: cost,
        cost_nanos: to_nanos(cost),
        cached: false,
        estimated: false,
    }
}

fn lines(out: &Out) -> Vec<SpendRecord> {
    assert!(out.ok, "{}", out.stderr);
    out.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_export_writes_the_records() {
    let nats = NatsServer::start();
    let cfg = test_config(&nats.url());
    let client = optiroute_common::nats::connect(&cfg.nats, "router")
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    let names = JetStreamNames::for_prefix(&cfg.nats.prefix);
    let subjects = Subjects::new(&cfg.nats.prefix);
    let mut stream = spend::ensure_stream(&js, &names.spend_stream, &subjects.spend_all(), 1, 30)
        .await
        .unwrap();
    let now = now_ms();
    let old = Period::Month.window(now).start_ms - 86_400_000;
    let records = vec![
        record("key_a", Pool::Cloud, 0.001_234_5, now, 1),
        record("key_b", Pool::Local, 0.000_000_7, now, 2),
        record("key_a", Pool::Local, 0.25, old, 3),
        record("key_a", Pool::Cloud, 0.0, now, 4),
    ];
    // One at a time, so the stream's order is the records' order.
    let log = SpendLog::new(js.clone(), &cfg.nats.prefix);
    for (i, r) in records.iter().enumerate() {
        log.record(r.clone()).await;
        tokio::time::timeout(Duration::from_secs(10), async {
            while stream.info().await.unwrap().state.messages < i as u64 + 1 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the record stored");
    }

    let url = cfg.nats.url.clone();
    let export = |extra: &'static [&'static str]| {
        let url = url.clone();
        async move {
            let mut args = vec!["spend", "export", "--nats-url", url.as_str()];
            args.extend_from_slice(extra);
            optiroute(&args, None).await
        }
    };
    let all = lines(&export(&["--since", "all"]).await);
    assert_eq!(all, records);
    let month = lines(&export(&["--since", "month"]).await);
    let current: Vec<SpendRecord> = records.iter().filter(|r| r.ts_ms == now).cloned().collect();
    assert_eq!(month, current);
    let a_only = lines(&export(&["--since", "2000-01-01", "--key", "key_a"]).await);
    let want: Vec<SpendRecord> = records
        .iter()
        .filter(|r| r.key_id == "key_a")
        .cloned()
        .collect();
    assert_eq!(a_only, want);
    let out = export(&["--since", "2999-01-01T00:00:00Z"]).await;
    assert!(out.ok && out.stdout.is_empty(), "{}", out.stderr);

    let out = export(&["--since", "last tuesday"]).await;
    assert!(!out.ok);
    assert!(out.stderr.contains("--since"), "{}", out.stderr);
    let out = export(&[]).await;
    assert!(!out.ok);
    assert!(out.stderr.contains("--since is required"), "{}", out.stderr);
    let out = export(&["--since", "all", "--key", "a.b"]).await;
    assert!(!out.ok);
}
