//! Users over a key's lifetime: batches owned by a key (and its budget
//! running out midway), the official OpenAI client, a restart of
//! everything, a stream that breaks off, all on a real nats-server.

mod support;

use std::time::{Duration, Instant};

use optiroute_accounts::model::{to_nanos, Period};
use optiroute_accounts::NewKey;
use optiroute_common::protocol::Subjects;
use optiroute_testkit::{metric, scrape, FakeUpstream, Mode, NatsServer, Stack};
use serde_json::{json, Value};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_belongs_to_its_key_and_lines_past_its_budget_end_as_budget_exceeded() {
    let nats = NatsServer::start();
    let up = fixed_usage_upstream().await;
    let cfg = config(&nats, &up);
    let stack = Stack::start(cfg.clone()).await;
    let worker = optiroute_batch::run(
        optiroute_testkit::stack::client(&cfg, "batch").await,
        &cfg,
        stack.shutdown.clone(),
    )
    .await
    .unwrap();
    let s = store(&cfg).await;
    let owner = s
        .create_key(NewKey {
            name: "batcher".into(),
            budget_usd: Some(5.0 * COST),
            budget_period: Some(Period::Total),
            ..NewKey::default()
        })
        .await
        .unwrap();
    let other = s
        .create_key(NewKey {
            name: "other".into(),
            ..NewKey::default()
        })
        .await
        .unwrap();
    until_known(std::slice::from_ref(&stack), &owner.key).await;
    until_known(std::slice::from_ref(&stack), &other.key).await;
    let input: String = (0..10)
        .map(|i| {
            format!(
                "{}\n",
                json!({"prompt": format!("batch line {i}"), "provider": "cloud", "max_tokens": 20})
            )
        })
        .collect();
    let resp = reqwest::Client::new()
        .post(stack.url("/v1/batches?id=owned"))
        .bearer_auth(&owner.key)
        .body(input.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status().as_u16(),
        200,
        "{}",
        resp.text().await.unwrap()
    );
    let status_url = stack.url("/v1/batches/owned");
    optiroute_testkit::wait_until("batch finished", Duration::from_secs(20), || {
        let (url, key) = (status_url.clone(), owner.key.clone());
        async move {
            let (_, body) = get_json(&url, &key).await;
            let v: Value = serde_json::from_str(&body).unwrap();
            v["pending"] == 0
                && v["done"].as_u64().unwrap_or(0) + v["failed"].as_u64().unwrap_or(0) == 10
        }
    })
    .await;
    // The queue holds the batch's token, never the key's secret.
    let nc = async_nats::connect(&cfg.nats.url).await.unwrap();
    let js = async_nats::jetstream::new(nc.clone());
    let mut jobs = js.get_stream(&cfg.batch.stream).await.unwrap();
    let last = jobs.info().await.unwrap().state.last_sequence;
    for seq in 1..=last {
        if let Ok(m) = jobs.get_raw_message(seq).await {
            let headers = format!("{:?}", m.headers);
            assert!(
                !headers.contains(&owner.key),
                "a job carries the key's secret"
            );
            assert!(!String::from_utf8_lossy(&m.payload).contains(&owner.key));
        }
    }
    // A job published into the batch by someone without its token (here,
    // with another key) is neither run nor given a result.
    let hits = up.hits();
    let mut h = async_nats::HeaderMap::new();
    h.insert("Content-Type", "application/json");
    h.insert("Optiroute-Api-Key", other.key.as_str());
    h.insert("Nats-Msg-Id", "intruder-1");
    js.publish_with_headers(
        Subjects::new(&cfg.nats.prefix).batch_job("owned"),
        h,
        json!({"line": 1, "prompt": "intruder", "provider": "cloud"})
            .to_string()
            .into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    optiroute_testkit::wait_until("the intruder dropped", Duration::from_secs(5), || {
        let n = worker.metrics.jobs.with_label_values(&["forbidden"]).get();
        async move { n == 1 }
    })
    .await;
    assert_eq!(up.hits(), hits, "an intruding job ran");
    // The batch's token runs that batch's lines only: not a request of
    // its own making, nor a line past the batch's end.
    let token = optiroute_common::protocol::headers::batch_token(&owner.key, "owned");
    for request_id in ["free-form", "owned-999", "owned-0"] {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Content-Type", "application/json");
        h.insert(
            "Optiroute-Api-Key",
            optiroute_common::protocol::headers::batch_credential("owned", &token).as_str(),
        );
        h.insert("Optiroute-Request-Id", request_id);
        let m = nc
            .request_with_headers(
                Subjects::new(&cfg.nats.prefix).generate,
                h,
                r#"{"prompt":"spend someone else's budget","provider":"cloud"}"#.into(),
            )
            .await
            .unwrap();
        let body: Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(body["code"], "invalid_api_key", "{request_id}: {body}");
    }
    // Another key does not see it; the admin does.
    assert_eq!(get_json(&status_url, &other.key).await.0, 404);
    assert_eq!(
        get_json(&status_url, "admin-key-for-tests-0123").await.0,
        200
    );
    let (code, text) = get_json(&stack.url("/v1/batches/owned/results"), &owner.key).await;
    assert_eq!(code, 200);
    let results: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(results.len(), 10, "one result per line");
    let ok = results.iter().filter(|r| r["status"] == "ok").count();
    let refused = results
        .iter()
        .filter(|r| r["status"] == "error" && r["error"]["code"] == "budget_exceeded")
        .count();
    println!("batch: {ok} served, {refused} budget_exceeded");
    assert_eq!(ok + refused, 10, "{text}");
    // A line reserves 2.32 answers' worth (76 prompt tokens at most and 20
    // out): 3 fit in a budget for 5, then less than a reservation is left.
    assert_eq!(ok, 3, "{ok} served of a budget for 5");
    // The budget raised, the same input submitted again runs just those lines.
    s.update_key(
        &owner.record.id,
        optiroute_accounts::KeyChanges {
            budget_usd: Some(Some(20.0 * COST)),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let hits_before = up.hits();
    let resp = reqwest::Client::new()
        .post(stack.url("/v1/batches?id=owned"))
        .bearer_auth(&owner.key)
        .body(input.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status().as_u16(),
        200,
        "{}",
        resp.text().await.unwrap()
    );
    optiroute_testkit::wait_until("batch finished again", Duration::from_secs(20), || {
        let (url, key) = (status_url.clone(), owner.key.clone());
        async move {
            let (_, body) = get_json(&url, &key).await;
            let v: Value = serde_json::from_str(&body).unwrap();
            v["pending"] == 0 && v["done"] == 10 && v["failed"] == 0
        }
    })
    .await;
    let (_, text) = get_json(&stack.url("/v1/batches/owned/results"), &owner.key).await;
    let results: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(results.len(), 10);
    assert!(results.iter().all(|r| r["status"] == "ok"), "{text}");
    assert_eq!(
        up.hits() - hits_before,
        refused,
        "only the refused lines ran again"
    );
}

/// The official `openai` Python package with keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_official_openai_python_client_uses_keys() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let status = std::process::Command::new("bash")
        .arg(format!("{root}/scripts/py-deps.sh"))
        .status()
        .unwrap();
    assert!(status.success(), "scripts/py-deps.sh failed");
    let nats = NatsServer::start();
    let up = fixed_usage_upstream().await;
    let cfg = config(&nats, &up);
    let stack = Stack::start(cfg.clone()).await;
    let s = store(&cfg).await;
    let key = s
        .create_key(NewKey {
            name: "py".into(),
            ..NewKey::default()
        })
        .await
        .unwrap();
    let spent = s
        .create_key(NewKey {
            name: "spent".into(),
            budget_usd: Some(0.0),
            ..NewKey::default()
        })
        .await
        .unwrap();
    until_known(std::slice::from_ref(&stack), &key.key).await;
    until_known(std::slice::from_ref(&stack), &spent.key).await;
    let out = tokio::process::Command::new(format!("{root}/.tools/venv/bin/python"))
        .arg(format!("{root}/e2e/py/openai_keys.py"))
        .arg(stack.url("/v1"))
        .arg(&key.key)
        .arg(&spent.key)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in ["key ok", "stream ok", "wrong key ok", "budget ok"] {
        assert!(stdout.contains(line), "{stdout}");
    }
    // The end user is recorded with the spend.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let records = spend_records(&cfg, &key.record.id).await;
        if records
            .iter()
            .any(|r| r.user.as_deref() == Some("end-user-42"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no record for the end user: {records:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_spend_and_budgets_survive_a_restart_of_every_process_and_nats() {
    let mut nats = NatsServer::start();
    let up = fixed_usage_upstream().await;
    let cfg = config(&nats, &up);
    let stack = Stack::start(cfg.clone()).await;
    let k = store(&cfg)
        .await
        .create_key(NewKey {
            name: "durable".into(),
            budget_usd: Some(10.0 * COST),
            budget_period: Some(Period::Total),
            ..NewKey::default()
        })
        .await
        .unwrap();
    until_known(std::slice::from_ref(&stack), &k.key).await;
    let url = stack.url("/generate");
    for i in 0..3 {
        let (status, _, body) = post(
            &url,
            Some(&k.key),
            &json!({"prompt": format!("before {i}"), "provider": "cloud", "max_tokens": 20}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    let entry = format!("b.k.{}.total", k.record.id);
    optiroute_testkit::wait_until("flushed", Duration::from_secs(5), || {
        let (cfg, entry) = (&cfg, &entry);
        async move { ledger_used(cfg, entry).await == 3 * to_nanos(COST) }
    })
    .await;
    // Everything stops (the stack gives its leases back), then NATS too.
    stack.shutdown.cancel();
    drop(stack);
    tokio::time::sleep(Duration::from_millis(300)).await;
    nats.restart();
    let stack = Stack::start(cfg.clone()).await;
    until_known(std::slice::from_ref(&stack), &k.key).await;
    assert_eq!(
        ledger_used(&cfg, &entry).await,
        3 * to_nanos(COST),
        "spend survived"
    );
    assert_eq!(
        spend_records(&cfg, &k.record.id).await.len(),
        3,
        "records survived"
    );
    // The budget goes on from there: 10 in total, 3 spent; a reservation
    // is 2.22 answers' worth (71 prompt tokens at most and 20 out), so 5
    // more fit and the next is refused.
    let url = stack.url("/generate");
    let mut served = 0;
    for i in 0..8 {
        let (status, _, body) = post(
            &url,
            Some(&k.key),
            &json!({"prompt": format!("after {i}"), "provider": "cloud", "max_tokens": 20}),
        )
        .await;
        match status {
            200 => served += 1,
            429 => assert_eq!(body["error"]["code"], "budget_exceeded"),
            other => panic!("{other}: {body}"),
        }
    }
    assert_eq!(served, 5, "{served} served after the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_that_breaks_off_is_charged_for_what_it_streamed() {
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::StreamBreaksAfter(3)).await;
    let cfg = config(&nats, &up);
    let stack = Stack::start(cfg.clone()).await;
    let k = store(&cfg)
        .await
        .create_key(NewKey {
            name: "streamer".into(),
            budget_usd: Some(1.0),
            budget_period: Some(Period::Total),
            ..NewKey::default()
        })
        .await
        .unwrap();
    until_known(std::slice::from_ref(&stack), &k.key).await;
    let resp = reqwest::Client::new()
        .post(stack.url("/v1/chat/completions"))
        .bearer_auth(&k.key)
        .json(&json!({"model": "cloud", "stream": true, "max_tokens": 50,
                      "messages": [{"role": "user", "content": "stream then break"}]}))
        .send()
        .await
        .unwrap();
    // The stream started (200) and ends with an error event.
    assert_eq!(resp.status().as_u16(), 200);
    let text = resp.text().await.unwrap();
    assert!(text.contains("stream_interrupted"), "{text}");
    // Charged: the ledger, the record and the metric agree, and are not zero.
    let deadline = Instant::now() + Duration::from_secs(10);
    let records = loop {
        let r = spend_records(&cfg, &k.record.id).await;
        if !r.is_empty() || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(records.len(), 1, "{records:?}");
    let charged = records[0].cost_nanos;
    assert!(charged > 0, "{records:?}");
    assert!(records[0].completion_tokens >= 3, "{records:?}");
    let entry = format!("b.k.{}.total", k.record.id);
    optiroute_testkit::wait_until("ledger flushed", Duration::from_secs(5), || {
        let (cfg, entry) = (&cfg, &entry);
        async move { ledger_used(cfg, entry).await == charged }
    })
    .await;
    let cloud = scrape(stack.cloud.as_ref().unwrap().admin_addr).await;
    let metered = metric(&cloud, "llm_total_cost_usd_total", &[("provider", "cloud")]).unwrap();
    assert!(
        (to_nanos(metered) as i64 - charged as i64).abs() <= 1,
        "{metered}"
    );
    // And the web UI's spend, which the ingress counts, says the same.
    let (status, stats) = stack.get("/stats").await;
    assert_eq!(status, 200, "{stats}");
    let stats: Value = serde_json::from_str(&stats).unwrap();
    let shown = stats["spend_usd"]["by_provider"]["cloud"].as_f64().unwrap();
    assert!(
        (to_nanos(shown) as i64 - charged as i64).abs() <= 1,
        "{stats}"
    );
}
