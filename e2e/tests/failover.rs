//! The pipeline on a 3-node JetStream cluster (every stream and bucket at
//! 3 replicas) loses the node that leads the cache bucket's stream while
//! two ingresses carry steady load and a 2,000-line batch runs: SIGKILL,
//! 5 s down, restart. Nothing but the requests caught in the election may
//! fail, and those only with 503 or 504 within their deadline; no answer
//! is wrong; the batch ends with one result per line; answers cached before
//! the kill are still in the bucket after it.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use async_nats::jetstream;
use optiroute_providers::simulated::SimulatedEngine;
use optiroute_testkit::load::{self, Load, Workload};
use optiroute_testkit::nats_cluster::wait_for_jetstream;
use optiroute_testkit::stack::{client, Parts};
use optiroute_testkit::{
    instances, test_config, wait_until, FakeUpstream, Mode, NatsCluster, Stack,
};
use serde_json::{json, Value};

const CONCURRENCY: usize = 16;
const HOT_PROMPTS: usize = 20;
const KEPT_PROMPTS: usize = 20;
const BATCH_LINES: usize = 2_000;

fn expected(prompt: &str) -> String {
    // The simulated engine's text for a default request (16 tokens).
    SimulatedEngine::text(prompt, SimulatedEngine::completion_tokens(u32::MAX))
}

/// A right answer: the local pool's text for the prompt or, after the local
/// pool failed, the cloud pool's (the fake upstream's) for the same prompt.
fn is_right(prompt: &str, body: &Value) -> bool {
    let text = body["text"].as_str().unwrap_or_default();
    match body["provider"].as_str() {
        Some("local") => text == expected(prompt),
        // The fake upstream answers `cloud answer <n> to: <prompt>`.
        Some("cloud") => {
            !body["fallback_reason"].is_null()
                && text
                    .strip_prefix("cloud answer ")
                    .and_then(|t| t.split_once(" to: "))
                    .is_some_and(|(n, p)| n.parse::<u64>().is_ok() && p == prompt)
        }
        _ => false,
    }
}

fn kept(i: usize) -> String {
    format!("failover: kept question {i}")
}

fn hot(i: usize) -> String {
    format!("failover: hot question {i}")
}

async fn ask(http: &reqwest::Client, base: &str, prompt: &str) -> (u16, Value) {
    let r = http
        .post(format!("{base}/generate"))
        .json(&json!({"prompt": prompt, "provider": "local"}))
        .send()
        .await;
    match r {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.json().await.unwrap_or(Value::Null))
        }
        Err(_) => (0, Value::Null),
    }
}

/// A hot prompt (a cache hit) and a new one (a miss) in turn.
struct Mix;

impl Workload for Mix {
    fn body(&self, n: u64) -> Value {
        let prompt = if n.is_multiple_of(2) {
            hot(n as usize / 2 % HOT_PROMPTS)
        } else {
            format!("failover: new question {n}")
        };
        json!({"prompt": prompt, "provider": "local"})
    }

    fn is_right(&self, body: &Value, answer: &Value) -> bool {
        is_right(body["prompt"].as_str().unwrap(), answer)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn losing_the_cache_leader_under_load_loses_nothing() {
    let mut cluster = NatsCluster::start(3);
    let mut cfg = test_config(&cluster.url());
    cfg.nats.replicas = 3;
    // A working cloud pool, so the router can fall back as in production.
    let upstream = FakeUpstream::start(Mode::Ok).await;
    cfg.cloud.upstream.base_url = upstream.base_url();
    // Users on: every request carries a key with a budget, so the ledger
    // and the spend records go through the node loss too.
    cfg.auth.mode = optiroute_common::config::AuthMode::Required;
    cfg.auth.admin_key = Some("failover-admin-key-0123".into());
    let deadline = Duration::from_millis(cfg.ingress.request_timeout_ms);
    let probe = client(&cfg, "probe").await;
    let js = jetstream::new(probe.clone());
    wait_for_jetstream(&js).await;
    let names = optiroute_common::protocol::JetStreamNames::for_prefix(&cfg.nats.prefix);
    let created = optiroute_accounts::AccountStore::open(&js, &names.accounts_bucket, 3)
        .await
        .unwrap()
        .create_key(optiroute_accounts::NewKey {
            name: "failover".into(),
            budget_usd: Some(1_000.0),
            budget_period: Some(optiroute_accounts::Period::Total),
            ..Default::default()
        })
        .await
        .unwrap();
    let key = created.key.clone();
    let mut auth = reqwest::header::HeaderMap::new();
    auth.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {key}").parse().unwrap(),
    );
    let http = reqwest::Client::builder()
        .default_headers(auth)
        .build()
        .unwrap();

    // Two ingresses and two routers; one local and one cloud pool; a batch worker.
    let a = Stack::start(cfg.clone()).await;
    let b = Stack::start_parts(cfg.clone(), Parts::FRONT).await;
    let batch = optiroute_batch::run(client(&cfg, "batch").await, &cfg, a.shutdown.clone())
        .await
        .unwrap();
    let bases = [a.url(""), b.url("")];
    // Both ingresses know the key.
    for base in &bases {
        wait_until("the key", Duration::from_secs(10), || {
            let (http, base) = (http.clone(), base.clone());
            async move { ask(&http, &base, "failover: key check").await.0 == 200 }
        })
        .await;
    }
    for s in [&a, &b] {
        let cache = s.router.as_ref().unwrap().cache.clone();
        wait_until("the cache bucket", Duration::from_secs(30), move || {
            let cache = cache.clone();
            async move { cache.is_connected() }
        })
        .await;
    }
    let stream = js.get_stream("KV_optiroute-cache").await.unwrap();
    assert_eq!(stream.cached_info().config.num_replicas, 3);

    // Cache the hot prompts (the load asks them again) and the kept ones
    // (nobody asks them again until the end): each asked twice, the second
    // time a hit, so it is in the bucket before the kill.
    let mut costs_before = 0i64;
    for prompt in (0..HOT_PROMPTS).map(hot).chain((0..KEPT_PROMPTS).map(kept)) {
        let (status, body) = ask(&http, &bases[0], &prompt).await;
        assert_eq!(status, 200, "{body}");
        assert!(is_right(&prompt, &body), "{body}");
        costs_before += optiroute_accounts::to_nanos(body["cost"].as_f64().unwrap()) as i64;
        // The answer is stored after the reply (the router does not make
        // the caller wait for it), and a read may reach a replica a moment
        // behind the write: ask through the other ingress until it is a hit
        // (each miss in between is answered and charged, and counted).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let (status, again) = ask(&http, &bases[1], &prompt).await;
            assert_eq!(status, 200, "{again}");
            assert!(is_right(&prompt, &again), "{again}");
            if again["cached"] == true {
                break;
            }
            costs_before += optiroute_accounts::to_nanos(again["cost"].as_f64().unwrap()) as i64;
            assert!(
                std::time::Instant::now() < deadline,
                "not a cache hit through the other ingress within 5 s: {again}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // Steady load, then a 2,000-line batch (still running at the kill).
    let load = Load::start_as(
        bases.to_vec(),
        CONCURRENCY,
        deadline + Duration::from_secs(2),
        Mix,
        Some(key.clone()),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let lines: String = (1..=BATCH_LINES)
        .map(|i| {
            json!({"custom_id": format!("f{i}"), "prompt": format!("failover batch {i}"), "provider": "local", "cache": "off"})
                .to_string()
                + "\n"
        })
        .collect();
    let r = http
        .post(a.url("/v1/batches?id=failover"))
        .body(lines)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    assert!(
        status == 200 || status == 201,
        "{status} {}",
        r.text().await.unwrap()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, before_kill) = b.get("/v1/batches/failover").await;
    let before_kill: Value = serde_json::from_str(&before_kill).unwrap();
    assert_ne!(
        before_kill["status"], "completed",
        "the batch ended before the kill: {before_kill}"
    );

    // SIGKILL the cache stream's leader, 5 s down, then back.
    let mut stream = js.get_stream("KV_optiroute-cache").await.unwrap();
    let leader = stream
        .info()
        .await
        .unwrap()
        .cluster
        .clone()
        .unwrap()
        .leader
        .unwrap();
    let victim = cluster.index_of(&leader).unwrap();
    let killed_at = load.t0.elapsed();
    cluster.kill(victim);
    tokio::time::sleep(Duration::from_secs(5)).await;
    cluster.restart(victim);
    // The restarted node catches up: the stream has its three copies again.
    wait_until(
        "the cache stream's 3 copies",
        Duration::from_secs(30),
        || {
            let js = js.clone();
            async move {
                let Ok(Ok(mut st)) = tokio::time::timeout(
                    Duration::from_secs(1),
                    js.get_stream("KV_optiroute-cache"),
                )
                .await
                else {
                    return false;
                };
                let Ok(Ok(info)) = tokio::time::timeout(Duration::from_secs(1), st.info()).await
                else {
                    return false;
                };
                info.cluster.as_ref().is_some_and(|c| {
                    c.leader.is_some()
                        && c.replicas.len() == 2
                        && c.replicas.iter().all(|r| r.current)
                })
            }
        },
    )
    .await;
    // Load after the restart; bench/cluster.sh runs it longer.
    let after = std::env::var("FAILOVER_AFTER_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    tokio::time::sleep(Duration::from_secs(after)).await;
    let samples = load.stop().await;

    // What happened.
    // The rate in the second before the kill, with the batch running.
    let rate_before = load::rate_between(&samples, killed_at - Duration::from_secs(1), killed_at);
    let failed: Vec<&load::Sample> = samples.iter().filter(|s| s.status != 200).collect();
    let fell_back = samples
        .iter()
        .filter(|s| s.status == 200 && s.provider.as_deref() == Some("cloud"))
        .count();
    println!(
        "failover: killed {leader} at {killed_at:.1?}; {} requests, {} failed (by status: {:?}), \
         {fell_back} answered by the cloud fallback; {rate_before:.0} req/s before; \
         longest gap without a success {:.2?}; full throughput again {:.2?} after the kill",
        samples.len(),
        failed.len(),
        load::failures_by_status(&samples),
        load::longest_gap(&samples),
        load::recovery(&samples, killed_at, rate_before),
    );

    // Every answer right; failures only 503/504, within the deadline, and
    // none for requests sent more than 2 s after the kill.
    assert!(samples.iter().all(|s| s.right), "a wrong answer");
    for s in &samples {
        assert!(s.took <= deadline + Duration::from_millis(500), "{s:?}");
    }
    let hits = samples.iter().filter(|s| s.cached).count();
    assert!(
        hits * 4 >= samples.len(),
        "{hits} of {} were cache hits",
        samples.len()
    );
    for s in &failed {
        assert!(
            s.status == 503 || s.status == 504,
            "a request failed with {} (0: no answer by the deadline + 2 s): {s:?}",
            s.status
        );
        assert!(
            s.done() >= killed_at,
            "a request failed before the kill: {s:?}"
        );
        assert!(
            s.sent <= killed_at + Duration::from_secs(2),
            "a request sent {:?} after the kill failed: {s:?}",
            s.sent - killed_at
        );
    }
    assert!(
        samples
            .iter()
            .filter(|s| s.sent > killed_at + Duration::from_secs(2))
            .count()
            > 100,
        "load kept running after the kill"
    );

    // The batch: complete, one result per line.
    let status_of = |id: &str| {
        let base = bases[1].clone();
        let id = id.to_string();
        let http = http.clone();
        async move {
            let r = http
                .get(format!("{base}/v1/batches/{id}"))
                .send()
                .await
                .ok()?;
            r.json::<Value>().await.ok()
        }
    };
    wait_until("the batch to complete", Duration::from_secs(120), || {
        let f = status_of("failover");
        async move { f.await.is_some_and(|s| s["status"] == "completed") }
    })
    .await;
    let text = http
        .get(format!("{}/v1/batches/failover/results", bases[0]))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let results: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(results.len(), BATCH_LINES);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["line"], i as u64 + 1, "{r}");
        assert_eq!(r["status"], "ok", "{r}");
        let prompt = format!("failover batch {}", i + 1);
        assert!(is_right(&prompt, &r["response"]), "{r}");
    }

    // Spend: the ledger's counter equals the spend records, and the replies'
    // costs add up to it, but for requests charged whose reply was lost
    // with the killed node (each at most one answer's cost).
    // Summed as the ledger sums: each reply's cost in nano-dollars.
    let nanos = |usd: f64| optiroute_accounts::to_nanos(usd) as i64;
    let replied: i64 = costs_before
        + samples
            .iter()
            .filter(|s| s.status == 200)
            .map(|s| nanos(s.cost))
            .sum::<i64>()
        + results
            .iter()
            .map(|r| nanos(r["response"]["cost"].as_f64().unwrap_or(0.0)))
            .sum::<i64>();
    let ledger = js.get_key_value(&names.ledger_bucket).await.unwrap();
    let entry = format!("b.k.{}.total", created.record.id);
    let max_answer = samples
        .iter()
        .map(|s| s.cost)
        .chain(
            results
                .iter()
                .map(|r| r["response"]["cost"].as_f64().unwrap_or(0.0)),
        )
        .fold(0.0, f64::max);
    let subject =
        optiroute_common::protocol::Subjects::new(&cfg.nats.prefix).spend(&created.record.id);
    let settle_by = std::time::Instant::now() + Duration::from_secs(20);
    let (used, recorded) = loop {
        let used = match ledger.get(&entry).await {
            Ok(Some(v)) => serde_json::from_slice::<Value>(&v).unwrap()["used"]
                .as_i64()
                .unwrap_or(0),
            _ => 0,
        };
        let mut sum = 0i64;
        let scanned = optiroute_accounts::spend::scan(
            &js,
            &names.spend_stream,
            &subject,
            0,
            Duration::from_secs(10),
            |r| sum += r.cost_nanos as i64,
        )
        .await;
        if (scanned.is_ok() && used == sum && used >= replied)
            || std::time::Instant::now() > settle_by
        {
            break (used, sum);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(used, recorded, "the ledger and the spend records disagree");
    assert!(used >= replied, "charged {used} but replied {replied}");
    // Replies lost with the node: requests that failed, and batch lines
    // run again after their first answer was lost on its way back.
    let rerun: i64 = results
        .iter()
        .map(|r| r["attempts"].as_i64().unwrap_or(1).max(1) - 1)
        .sum();
    let lost_replies = failed.len() as i64 + rerun + 1;
    println!(
        "failover spend: ledger {used} nano-USD = records {recorded}; replies {replied} \
         ({} of replies lost with the node, at most {} failed or re-run requests' worth)",
        used - replied,
        lost_replies
    );
    assert!(
        used - replied <= lost_replies * (optiroute_accounts::to_nanos(max_answer) as i64 + 1),
        "charged {used} but replied {replied}"
    );

    // Every OptiRoute part still serves, with no restart: both routers, both
    // pools, both ingresses and the batch worker.
    for (service, n) in [
        ("optiroute-router", 2),
        ("optiroute-local", 1),
        ("optiroute-cloud", 1),
    ] {
        assert_eq!(instances(&probe, service).await, n, "{service}");
    }
    for base in &bases {
        let r = reqwest::get(format!("{base}/ready")).await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{base}/ready");
    }
    assert!(!batch.is_finished(), "the batch worker stopped");

    // The answers cached before the kill are still in the bucket: a router
    // started now (no memory of them) serves them as hits.
    a.shutdown.cancel();
    b.shutdown.cancel();
    let c = Stack::start_parts(cfg.clone(), Parts::FRONT).await;
    let cache = c.router.as_ref().unwrap().cache.clone();
    wait_until("the cache bucket", Duration::from_secs(30), move || {
        let cache = cache.clone();
        async move { cache.is_connected() }
    })
    .await;
    let ready = c.url("/ready");
    wait_until("the new ingress", Duration::from_secs(30), || {
        let ready = ready.clone();
        async move { matches!(reqwest::get(ready).await, Ok(r) if r.status() == 200) }
    })
    .await;
    // The new ingress knows the key (its directory loads on start).
    wait_until(
        "the key on the new ingress",
        Duration::from_secs(10),
        || {
            let (http, base) = (http.clone(), c.url(""));
            async move { ask(&http, &base, "failover: key check").await.0 == 200 }
        },
    )
    .await;
    // The kept prompts were written once, before the kill, and never again.
    for i in 0..KEPT_PROMPTS {
        let (status, body) = ask(&http, &c.url(""), &kept(i)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["cached"], true, "{body}");
        assert_eq!(body["text"].as_str(), Some(expected(&kept(i)).as_str()));
    }
}
