#![allow(clippy::unwrap_used)]
//! The web UI: the page and its assets are served, `/stats` reflects the
//! answers the ingress relayed and what the NATS services report, and the
//! chat page works in a real headless Chromium (e2e/ui/chat.test.mjs).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use optiroute_testkit::{test_config, FakeUpstream, Mode, NatsServer, Stack};
use serde_json::{json, Value};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

async fn ask(http: &reqwest::Client, stack: &Stack, body: Value) -> Value {
    let resp = http
        .post(stack.url("/generate"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

async fn stats(http: &reqwest::Client, stack: &Stack) -> Value {
    let resp = http.get(stack.url("/stats")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    resp.json().await.unwrap()
}

fn f(v: &Value) -> f64 {
    v.as_f64()
        .unwrap_or_else(|| panic!("expected a number, got {v}"))
}

#[tokio::test]
async fn page_assets_and_stats() {
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::Ok).await;
    let mut cfg = test_config(&nats.url());
    cfg.cloud.upstream.base_url = up.base_url();
    let stack = Stack::start(cfg).await;
    let http = reqwest::Client::new();

    // The page, with a label for every input.
    let resp = http.get(stack.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/html"), "{ct}");
    assert!(resp.headers().contains_key("content-security-policy"));
    let html = resp.text().await.unwrap();
    assert!(html.contains("<meta name=\"viewport\""));
    for id in ["prompt", "provider", "max-tokens"] {
        assert!(
            html.contains(&format!("id=\"{id}\"")),
            "no control #{id} in the page"
        );
        assert!(
            html.contains(&format!("<label for=\"{id}\"")),
            "no label for #{id}"
        );
    }
    for opt in ["auto", "local", "cloud"] {
        assert!(html.contains(&format!("<option value=\"{opt}\"")), "{opt}");
    }
    for (path, ct, needle) in [
        ("/ui/app.js", "text/javascript", "/v1/chat/completions"),
        ("/ui/style.css", "text/css", "@media"),
    ] {
        let resp = http.get(stack.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let got = resp.headers()["content-type"].to_str().unwrap().to_string();
        assert!(got.starts_with(ct), "{path}: {got}");
        assert!(resp.text().await.unwrap().contains(needle), "{path}");
        assert!(html.contains(path), "the page loads {path}");
    }

    // Before any prompt: zeros, and the services seen over NATS.
    let s = stats(&http, &stack).await;
    assert_eq!(s["requests"]["total"], 0, "{s}");
    assert!(s["cache"]["hit_ratio"].is_null(), "{s}");
    assert!(s["latency_s"]["p50"].is_null(), "{s}");
    assert_eq!(s["cloud_pool"]["workers"], 1, "{s}");
    // The breaker state is what the cloud worker publishes, before any call.
    assert_eq!(s["cloud_pool"]["breaker"], "closed", "{s}");
    assert_eq!(s["local_pool"]["workers"], 1, "{s}");
    assert_eq!(s["routers"]["workers"], 1, "{s}");
    assert_eq!(s["nats"]["connected"], true, "{s}");

    // A simple prompt (local), a hard one (cloud), then the simple one until
    // the cache answers it (the router writes the cache after replying).
    let simple = json!({"prompt": "Hello, what time zone is UTC?", "max_tokens": 50});
    let a = ask(&http, &stack, simple.clone()).await;
    assert_eq!(a["routed_to"], "local", "{a}");
    let hard = json!({"prompt": "Compare the trade-offs of optimistic and pessimistic concurrency control in a distributed database, step by step, and explain why each one fails under high contention.", "provider": "auto"});
    let b = ask(&http, &stack, hard).await;
    assert_eq!(b["routed_to"], "cloud", "{b}");
    assert_eq!(b["provider"], "cloud", "{b}");
    let cloud_cost = f(&b["cost"]);
    assert!(cloud_cost > 0.0, "{b}");
    let mut sent = 2;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let again = ask(&http, &stack, simple.clone()).await;
        sent += 1;
        if again["cached"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "the repeat never hit the cache");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The cloud answer again, from the cache: saves what it cost.
    let hard_again = json!({"prompt": "Compare the trade-offs of optimistic and pessimistic concurrency control in a distributed database, step by step, and explain why each one fails under high contention."});
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let again = ask(&http, &stack, hard_again.clone()).await;
        sent += 1;
        if again["cached"] == true {
            assert_eq!(again["cost"], 0.0);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the hard repeat never hit the cache"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // An invalid request is not an answer and is not counted.
    let resp = http
        .post(stack.url("/generate"))
        .json(&json!({"prompt": "  "}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    tokio::time::sleep(Duration::from_millis(1100)).await; // past the NATS part's reuse
    let s = stats(&http, &stack).await;
    let req = &s["requests"];
    assert_eq!(req["total"], sent, "{s}");
    assert_eq!(
        req["by_route"]["local"].as_u64().unwrap() + req["by_route"]["cloud"].as_u64().unwrap(),
        sent,
        "{s}"
    );
    assert!(req["by_route"]["cloud"].as_u64().unwrap() >= 2, "{s}");
    let spend = &s["spend_usd"];
    assert!(
        (f(&spend["by_provider"]["cloud"]) - cloud_cost).abs() < 1e-12,
        "{s}"
    );
    assert!(f(&spend["by_provider"]["local"]) >= 0.0, "{s}");
    assert!(
        (f(&spend["total"])
            - f(&spend["by_provider"]["cloud"])
            - f(&spend["by_provider"]["local"]))
        .abs()
            < 1e-12
    );
    let cache = &s["cache"];
    assert_eq!(cache["hits"], 2, "{s}");
    assert_eq!(cache["misses"].as_u64().unwrap() + 2, sent, "{s}");
    let ratio = f(&cache["hit_ratio"]);
    assert!((ratio - 2.0 / sent as f64).abs() < 1e-9, "{s}");
    // The hits saved at least what the cloud answer cost, known exactly.
    assert!(f(&cache["cost_saved_usd"]) >= cloud_cost - 1e-12, "{s}");
    let lat = &s["latency_s"];
    assert_eq!(lat["count"], sent, "{s}");
    assert!(
        f(&lat["p50"]) >= 0.0 && f(&lat["p95"]) >= f(&lat["p50"]),
        "{s}"
    );
    assert_eq!(s["cloud_pool"]["breaker"], "closed", "{s}");
    // The router's own counters, from `$SRV.STATS` (the invalid one was
    // refused at the ingress and never reached it, so nothing failed).
    assert!(s["routers"]["requests"].as_u64().unwrap() >= sent, "{s}");
    assert_eq!(s["requests"]["failed"], 0, "{s}");
    assert!(s["cloud_pool"]["requests"].as_u64().unwrap() >= 1, "{s}");

    // The cloud breaker opens after three failures; the panel says so.
    up.set_mode(Mode::Status(500));
    let deadline = Instant::now() + Duration::from_secs(20);
    for i in 0.. {
        let a = ask(
            &http,
            &stack,
            json!({"prompt": format!("Failing cloud call number {i}"), "provider": "cloud", "cache": "off"}),
        )
        .await;
        assert_eq!(a["provider"], "local", "{a}");
        if a["fallback_reason"] == "circuit_open" {
            break;
        }
        assert!(Instant::now() < deadline, "the breaker never opened");
    }
    // After a fallback the panel refreshes the NATS part within 250 ms
    // (not on every poll: while the breaker is open every call falls back).
    let mut s = stats(&http, &stack).await;
    let deadline = Instant::now() + Duration::from_secs(2);
    while s["cloud_pool"]["breaker"] != "open" && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        s = stats(&http, &stack).await;
    }
    assert_eq!(s["cloud_pool"]["breaker"], "open", "{s}");
    assert!(
        s["requests"]["fallbacks"]["by_reason"]["circuit_open"]
            .as_u64()
            .unwrap()
            >= 1,
        "{s}"
    );
}

/// Installs Chromium and playwright-core when they are missing.
/// While the cloud breaker is open every cloud call falls back, and a
/// fallback makes the panel's NATS part stale. Polls must not each turn into
/// a `$SRV.STATS` round: at most one per 250 ms.
#[tokio::test]
async fn polls_during_an_outage_do_not_each_ask_nats() {
    use futures::StreamExt;
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::Status(500)).await;
    let mut cfg = test_config(&nats.url());
    cfg.cloud.upstream.base_url = up.base_url();
    let stack = Stack::start(cfg).await;
    let http = reqwest::Client::new();
    let nc = async_nats::connect(nats.url()).await.unwrap();
    // Each refresh of the NATS part asks the routers' stats once.
    let mut rounds = nc.subscribe("$SRV.STATS.optiroute-router").await.unwrap();
    nc.flush().await.unwrap();
    let fail =
        |i: usize| json!({"prompt": format!("outage {i}"), "provider": "cloud", "cache": "off"});
    let deadline = Instant::now() + Duration::from_secs(20);
    for i in 0.. {
        if ask(&http, &stack, fail(i)).await["fallback_reason"] == "circuit_open" {
            break;
        }
        assert!(Instant::now() < deadline, "the breaker never opened");
    }
    let _ = stats(&http, &stack).await;
    let started = Instant::now();
    let polls = 20;
    for i in 0..polls {
        let a = ask(&http, &stack, fail(1000 + i)).await;
        assert_eq!(a["fallback_reason"], "circuit_open", "{a}");
        let _ = stats(&http, &stack).await;
    }
    let elapsed = started.elapsed();
    // Everything the ingress published before its last answer has reached
    // this connection once a round trip of its own comes back.
    nc.request("$SRV.PING", "".into()).await.unwrap();
    let mut n = 0;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(20), rounds.next()).await {
        n += 1;
    }
    // The first refresh before the loop, then at most one per 250 ms.
    let most = 2 + (elapsed.as_millis() / 250) as usize;
    assert!(
        n <= most && n < polls,
        "{n} NATS rounds for {polls} polls in {elapsed:?} (at most {most})"
    );
}

async fn ensure_browser_deps() {
    let root = root();
    let have = Path::new("/usr/bin/chromium").exists()
        && root
            .join(".tools/ui-test/node_modules/playwright-core/package.json")
            .exists()
        && std::process::Command::new("node")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    if have {
        return;
    }
    let out = tokio::process::Command::new("bash")
        .arg(root.join("scripts/ui-deps.sh"))
        .current_dir(&root)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/ui-deps.sh failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn chat_page_in_headless_chromium() {
    ensure_browser_deps().await;
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::Ok).await;
    let mut cfg = test_config(&nats.url());
    cfg.cloud.upstream.base_url = up.base_url();
    // Local answers take a visible moment, one word at a time, so the page
    // can be seen streaming them.
    cfg.local.simulated.per_token_ms = 40;
    let stack = Stack::start(cfg).await;
    // A second stack whose cloud upstream breaks after two streamed words:
    // the page shows the error under the partial answer.
    let broken_nats = NatsServer::start();
    let broken_up = FakeUpstream::start(Mode::StreamBreaksAfter(2)).await;
    let mut cfg = test_config(&broken_nats.url());
    cfg.cloud.upstream.base_url = broken_up.base_url();
    let broken = Stack::start(cfg).await;

    let root = root();
    let shots = root.join("target/ui-screenshots");
    let child = tokio::process::Command::new("node")
        .arg(root.join("e2e/ui/chat.test.mjs"))
        .current_dir(&root)
        .env("OPTIROUTE_UI_URL", stack.url(""))
        .env("OPTIROUTE_UI_BROKEN_URL", broken.url(""))
        .env("OPTIROUTE_UI_SCREENSHOTS", &shots)
        .kill_on_drop(true)
        .output();
    // The stack serves on this runtime while the browser runs.
    let out = tokio::time::timeout(Duration::from_secs(90), child)
        .await
        .expect("the browser test took over 90 s")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        out.status.success(),
        "e2e/ui/chat.test.mjs failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(shots.join("chat.png").exists());
}

/// The spend panel (e2e/ui/spend.test.mjs): with the admin key, this
/// month's spend by team and by key; with a user key, its own usage, and
/// chats sent with that key; a wrong key refused.
#[tokio::test]
async fn spend_panel_in_headless_chromium() {
    use optiroute_accounts::spend::{self, SpendLog, SpendRecord};
    use optiroute_common::protocol::{JetStreamNames, Subjects};

    const ADMIN: &str = "admin-key-0123456789abcdef";
    ensure_browser_deps().await;
    let nats = NatsServer::start();
    let mut cfg = test_config(&nats.url());
    cfg.auth.mode = optiroute_common::config::AuthMode::Required;
    cfg.auth.admin_key = Some(ADMIN.into());
    let parts = optiroute_testkit::stack::Parts {
        ingress: true,
        router: false,
        local: false,
        cloud: false,
    };
    let stack = Stack::start_parts(cfg, parts).await;
    let http = reqwest::Client::new();
    let admin = |path: &str, body: Value| {
        http.post(stack.url(path))
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
    };
    let resp = admin("/admin/teams", json!({"name": "red", "budget_usd": 5.0}))
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let key: Value = admin(
        "/admin/keys",
        json!({"name": "alice", "team": "red", "budget_usd": 1.0}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let (id, secret) = (key["id"].as_str().unwrap(), key["key"].as_str().unwrap());

    let js =
        async_nats::jetstream::new(optiroute_testkit::stack::client(&stack.cfg, "router").await);
    let prefix = &stack.cfg.nats.prefix;
    let mut stream = spend::ensure_stream(
        &js,
        &JetStreamNames::for_prefix(prefix).spend_stream,
        &Subjects::new(prefix).spend_all(),
        1,
        30,
    )
    .await
    .unwrap();
    SpendLog::new(js.clone(), prefix)
        .record(SpendRecord {
            ts_ms: optiroute_accounts::store::now_ms(),
            request_id: "r1".into(),
            key_id: id.into(),
            team: Some("red".into()),
            user: None,
            pool: optiroute_common::wire::Pool::Cloud,
            model: "m".into(),
            prompt_tokens: 100,
            completion_tokens: 50,
            cost_usd: 0.0125,
            cost_nanos: 12_500_000,
            cached: false,
            estimated: false,
        })
        .await;
    tokio::time::timeout(Duration::from_secs(10), async {
        while stream.info().await.unwrap().state.messages < 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the record stored");
    optiroute_testkit::wait_until(
        "the key known to the ingress",
        Duration::from_secs(10),
        || {
            let req = http.get(stack.url("/v1/usage")).bearer_auth(secret).send();
            async { req.await.unwrap().status() == 200 }
        },
    )
    .await;

    let root = root();
    let shots = root.join("target/ui-screenshots");
    let child = tokio::process::Command::new("node")
        .arg(root.join("e2e/ui/spend.test.mjs"))
        .current_dir(&root)
        .env("OPTIROUTE_UI_URL", stack.url(""))
        .env("OPTIROUTE_UI_ADMIN_KEY", ADMIN)
        .env("OPTIROUTE_UI_USER_KEY", secret)
        .env(
            "OPTIROUTE_UI_EXPECT",
            json!({"team": "red", "key": "alice", "cost": "$0.0125"}).to_string(),
        )
        .env("OPTIROUTE_UI_SCREENSHOTS", &shots)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(90), child)
        .await
        .expect("the browser test took over 90 s")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "e2e/ui/spend.test.mjs failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(shots.join("spend-user.png").exists());
}
