//! Keys, budgets, rate limits and tenant-scoped caching through real
//! replicas on a real nats-server: 2 ingresses and 3 routers share every
//! limit through the ledger.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use optiroute_accounts::model::{to_nanos, Period};
use optiroute_accounts::spend::{scan, SpendRecord};
use optiroute_accounts::{AccountStore, NewKey, NewTeam};
use optiroute_common::config::{AuthMode, CacheScope, Config};
use optiroute_common::protocol::{JetStreamNames, Subjects};
use optiroute_testkit::stack::Parts;
use optiroute_testkit::{metric, scrape, test_config, FakeUpstream, Mode, NatsServer, Stack};
use serde_json::{json, Value};

/// Every cloud answer uses 10 prompt and 20 completion tokens: at these
/// prices, 0.00005 USD.
const COST: f64 = 10.0 / 1000.0 * 0.001 + 20.0 / 1000.0 * 0.002;

fn config(nats: &NatsServer, up: &FakeUpstream) -> Config {
    let mut c = test_config(&nats.url());
    c.auth.mode = AuthMode::Required;
    c.auth.admin_key = Some("admin-key-for-tests-0123".into());
    c.cloud.upstream.base_url = up.base_url();
    c.cloud.input_price_per_1k = 0.001;
    c.cloud.output_price_per_1k = 0.002;
    c.ingress.request_timeout_ms = 15_000;
    c.router.max_deadline_ms = 15_000;
    c
}

async fn fixed_usage_upstream() -> FakeUpstream {
    FakeUpstream::start(Mode::Usage(json!({
        "prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30
    })))
    .await
}

/// A full stack, a second ingress+router, and a third router.
async fn replicas(cfg: &Config) -> Vec<Stack> {
    vec![
        Stack::start(cfg.clone()).await,
        Stack::start_parts(cfg.clone(), Parts::FRONT).await,
        Stack::start_parts(
            cfg.clone(),
            Parts {
                ingress: false,
                router: true,
                local: false,
                cloud: false,
            },
        )
        .await,
    ]
}

async fn store(cfg: &Config) -> AccountStore {
    let nc = async_nats::connect(&cfg.nats.url).await.unwrap();
    let js = async_nats::jetstream::new(nc);
    AccountStore::open(
        &js,
        &JetStreamNames::for_prefix(&cfg.nats.prefix).accounts_bucket,
        1,
    )
    .await
    .unwrap()
}

async fn post(url: &str, key: Option<&str>, body: &Value) -> (u16, Option<String>, Value) {
    let mut r = reqwest::Client::new().post(url).json(body);
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (status, retry, resp.json().await.unwrap_or(Value::Null))
}

/// Waits until every ingress accepts `key` (its watch has it).
async fn until_known(stacks: &[Stack], key: &str) {
    for s in stacks.iter().filter(|s| s.ingress.is_some()) {
        let url = s.url("/v1/models");
        let _ = url;
        let gen = s.url("/generate");
        optiroute_testkit::wait_until("key known", Duration::from_secs(5), || {
            let gen = gen.clone();
            async move {
                // A bad body: 400 once the key is known, 401 before.
                post(&gen, Some(key), &json!({})).await.0 == 400
            }
        })
        .await;
    }
}

async fn spend_records(cfg: &Config, key_id: &str) -> Vec<SpendRecord> {
    let nc = async_nats::connect(&cfg.nats.url).await.unwrap();
    let js = async_nats::jetstream::new(nc);
    let names = JetStreamNames::for_prefix(&cfg.nats.prefix);
    let mut out = Vec::new();
    scan(
        &js,
        &names.spend_stream,
        &Subjects::new(&cfg.nats.prefix).spend(key_id),
        0,
        Duration::from_secs(10),
        |r| out.push(r),
    )
    .await
    .unwrap();
    out
}

async fn ledger_used(cfg: &Config, entry: &str) -> u64 {
    let nc = async_nats::connect(&cfg.nats.url).await.unwrap();
    let kv = async_nats::jetstream::new(nc)
        .get_key_value(JetStreamNames::for_prefix(&cfg.nats.prefix).ledger_bucket)
        .await
        .unwrap();
    match kv.get(entry).await.unwrap() {
        Some(v) => serde_json::from_slice::<Value>(&v).unwrap()["used"]
            .as_u64()
            .unwrap(),
        None => 0,
    }
}

/// Sends 300 distinct cloud requests at once, spread over the ingresses,
/// each with one of `keys`: (costs of the answers, refusals).
async fn burst(stacks: &[Stack], keys: &[String]) -> (Vec<f64>, usize) {
    let urls: Vec<String> = stacks
        .iter()
        .filter(|s| s.ingress.is_some())
        .map(|s| s.url("/generate"))
        .collect();
    let mut tasks = Vec::new();
    for i in 0..300 {
        let url = urls[i % urls.len()].clone();
        let key = keys[i % keys.len()].clone();
        tasks.push(tokio::spawn(async move {
            post(
                &url,
                Some(&key),
                &json!({"prompt": format!("budget question {i}"), "provider": "cloud", "max_tokens": 20}),
            )
            .await
        }));
    }
    let (mut costs, mut refused) = (Vec::new(), 0);
    for t in tasks {
        let (status, retry, body) = t.await.unwrap();
        match status {
            200 => costs.push(body["cost"].as_f64().unwrap()),
            429 => {
                assert!(retry.is_some(), "429 without Retry-After");
                // Spent, or (transient) held by requests in flight past
                // the wait: the latter is a rate limit, retried shortly.
                if body["error"]["code"] == "budget_exceeded" {
                    assert_eq!(body["error"]["type"], "insufficient_quota");
                    let message = body["error"]["message"].as_str().unwrap();
                    assert!(message.contains("resets at"), "{body}");
                } else {
                    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
                }
                refused += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    (costs, refused)
}

fn window_label(p: Period) -> String {
    p.window(optiroute_accounts::store::now_ms()).label
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_budget_is_never_overspent_across_two_ingresses_and_three_routers() {
    let nats = NatsServer::start();
    let up = fixed_usage_upstream().await;
    let cfg = config(&nats, &up);
    let stacks = replicas(&cfg).await;
    let created = store(&cfg)
        .await
        .create_key(NewKey {
            name: "budgeted".into(),
            budget_usd: Some(100.0 * COST),
            budget_period: Some(Period::Day),
            ..NewKey::default()
        })
        .await
        .unwrap();
    until_known(&stacks, &created.key).await;
    let (costs, refused) = burst(&stacks, std::slice::from_ref(&created.key)).await;
    let spent: u64 = costs.iter().map(|c| to_nanos(*c)).sum();
    let budget = to_nanos(100.0 * COST);
    println!(
        "served {} refused {refused} spent {spent} of {budget} nano-USD",
        costs.len()
    );
    assert!(spent <= budget, "overspent: {spent} > {budget}");
    // The stated bound: unused budget is less than one request's
    // reservation (a prompt of ~19 bytes: 83 tokens at most, and 20 out:
    // 2.46 answers' worth) once nothing is in flight, so 98 of the 100 fit.
    assert!(costs.len() >= 98, "served only {}", costs.len());
    assert_eq!(costs.len() + refused, 300);
    // Every view of spend agrees: the ledger's counter, the records, the metric.
    let entry = format!("b.k.{}.{}", created.record.id, window_label(Period::Day));
    optiroute_testkit::wait_until("ledger flushed", Duration::from_secs(5), || {
        let (cfg, entry) = (&cfg, &entry);
        async move { ledger_used(cfg, entry).await == spent }
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let records = loop {
        let r = spend_records(&cfg, &created.record.id).await;
        if r.len() >= costs.len() || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(records.len(), costs.len(), "one record per served request");
    assert_eq!(records.iter().map(|r| r.cost_nanos).sum::<u64>(), spent);
    let ids: HashSet<&str> = records.iter().map(|r| r.request_id.as_str()).collect();
    assert_eq!(ids.len(), records.len(), "a record counted twice");
    let cloud = scrape(stacks[0].cloud.as_ref().unwrap().admin_addr).await;
    let metered = metric(&cloud, "llm_total_cost_usd_total", &[("provider", "cloud")]).unwrap();
    assert!(
        (metered - costs.iter().sum::<f64>()).abs() < 1e-9,
        "{metered}"
    );
    assert_eq!(
        up.hits(),
        costs.len(),
        "an upstream call that was not served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_team_budget_is_shared_by_its_keys_and_never_overspent() {
    let nats = NatsServer::start();
    let up = fixed_usage_upstream().await;
    let cfg = config(&nats, &up);
    let stacks = replicas(&cfg).await;
    let s = store(&cfg).await;
    s.create_team(NewTeam {
        name: "research".into(),
        budget_usd: Some(100.0 * COST),
        budget_period: Some(Period::Month),
    })
    .await
    .unwrap();
    let mut keys = Vec::new();
    let mut ids = Vec::new();
    for name in ["alice", "bob"] {
        let k = s
            .create_key(NewKey {
                name: name.into(),
                team: Some("research".into()),
                ..NewKey::default()
            })
            .await
            .unwrap();
        until_known(&stacks, &k.key).await;
        keys.push(k.key);
        ids.push(k.record.id);
    }
    let (costs, refused) = burst(&stacks, &keys).await;
    let spent: u64 = costs.iter().map(|c| to_nanos(*c)).sum();
    println!("served {} refused {refused}", costs.len());
    assert!(spent <= to_nanos(100.0 * COST));
    assert!(costs.len() >= 98, "served only {}", costs.len());
    let entry = format!("b.t.research.{}", window_label(Period::Month));
    optiroute_testkit::wait_until("ledger flushed", Duration::from_secs(5), || {
        let (cfg, entry) = (&cfg, &entry);
        async move { ledger_used(cfg, entry).await == spent }
    })
    .await;
    let cloud = scrape(stacks[0].cloud.as_ref().unwrap().admin_addr).await;
    let metered = metric(&cloud, "llm_total_cost_usd_total", &[("team", "research")]).unwrap();
    assert!((metered - costs.iter().sum::<f64>()).abs() < 1e-9);
    let mut recorded = 0;
    for id in &ids {
        recorded += spend_records(&cfg, id)
            .await
            .iter()
            .map(|r| r.cost_nanos)
            .sum::<u64>();
    }
    assert_eq!(recorded, spent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rpm_is_shared_by_two_ingresses_and_answers_429_with_retry_after() {
    let nats = NatsServer::start();
    let up = fixed_usage_upstream().await;
    let cfg = config(&nats, &up);
    let stacks = replicas(&cfg).await;
    let k = store(&cfg)
        .await
        .create_key(NewKey {
            name: "limited".into(),
            rpm: Some(30),
            ..NewKey::default()
        })
        .await
        .unwrap();
    until_known(&stacks, &k.key).await;
    // until_known spent no request of the limit: bad bodies stop at the ingress.
    let urls = [stacks[0].url("/generate"), stacks[1].url("/generate")];
    let mut tasks = Vec::new();
    for i in 0..100 {
        let url = urls[i % 2].clone();
        let key = k.key.clone();
        tasks.push(tokio::spawn(async move {
            post(
                &url,
                Some(&key),
                &json!({"prompt": format!("rate {i}"), "provider": "local"}),
            )
            .await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let (status, retry, body) = t.await.unwrap();
        match status {
            200 => ok += 1,
            429 => {
                assert_eq!(body["error"]["code"], "rate_limited", "{body}");
                let secs: u64 = retry.expect("Retry-After").parse().unwrap();
                assert!((1..=60).contains(&secs), "{secs}");
            }
            other => panic!("{other}: {body}"),
        }
    }
    println!("{ok} of 100 admitted at rpm 30");
    assert!(ok <= 30, "{ok} admitted");
    assert!(ok >= 28, "{ok} admitted");
    // The bucket refills at 30 a minute: one more within a few seconds.
    optiroute_testkit::wait_until("refilled", Duration::from_secs(8), || {
        let (url, key) = (urls[0].clone(), k.key.clone());
        async move {
            post(
                &url,
                Some(&key),
                &json!({"prompt": "again", "provider": "local"}),
            )
            .await
            .0 == 200
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_are_checked_on_every_entry_point_and_a_revoke_lands_within_a_second() {
    let nats = NatsServer::start();
    let up = fixed_usage_upstream().await;
    let cfg = config(&nats, &up);
    let stacks = replicas(&cfg).await;
    let s = store(&cfg).await;
    let k = s
        .create_key(NewKey {
            name: "soon revoked".into(),
            providers: Some(vec![optiroute_common::wire::Pool::Local]),
            ..NewKey::default()
        })
        .await
        .unwrap();
    until_known(&stacks, &k.key).await;
    let url = stacks[0].url("/generate");
    // No key, a wrong key: 401 invalid_api_key.
    for key in [None, Some("sk-or-wrong")] {
        let (status, _, body) = post(&url, key, &json!({"prompt": "hi"})).await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(body["error"]["code"], "invalid_api_key");
    }
    // A pool the key may not use: 403.
    let (status, _, body) = post(
        &url,
        Some(&k.key),
        &json!({"prompt": "hi", "provider": "cloud"}),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "permission_denied");
    // Auto routing stays on the allowed pool, even for a cloud-worthy prompt.
    let (status, _, body) = post(
        &url,
        Some(&k.key),
        &json!({"prompt": "Prove that there are infinitely many primes and analyze the complexity of the sieve of Eratosthenes in detail."}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["provider"], "local");
    // Direct NATS: no key or a wrong key gets an error reply with code 401.
    let nc = async_nats::connect(&cfg.nats.url).await.unwrap();
    let subject = Subjects::new(&cfg.nats.prefix).generate;
    for key in [None, Some("sk-or-wrong")] {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Content-Type", "application/json");
        if let Some(k) = key {
            h.insert("Optiroute-Api-Key", k);
        }
        let m = nc
            .request_with_headers(subject.clone(), h, r#"{"prompt":"hi"}"#.into())
            .await
            .unwrap();
        let code = m
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Service-Error-Code"))
            .unwrap();
        assert_eq!(code.as_str(), "401");
        let body: Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(body["code"], "invalid_api_key");
    }
    // Revoke: refused within 1 s on every ingress, and on NATS.
    s.revoke_key(&k.record.id).await.unwrap();
    let revoked = Instant::now();
    for st in stacks.iter().filter(|s| s.ingress.is_some()) {
        let url = st.url("/generate");
        optiroute_testkit::wait_until("revoked", Duration::from_secs(1), || {
            let (url, key) = (url.clone(), k.key.clone());
            async move { post(&url, Some(&key), &json!({"prompt": "hi"})).await.0 == 401 }
        })
        .await;
    }
    println!("revoke took effect everywhere in {:?}", revoked.elapsed());
    let mut h = async_nats::HeaderMap::new();
    h.insert("Content-Type", "application/json");
    h.insert("Optiroute-Api-Key", k.key.as_str());
    let m = nc
        .request_with_headers(subject, h, r#"{"prompt":"hi"}"#.into())
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(body["code"], "invalid_api_key", "{body}");
}

async fn cache_answers(scope: CacheScope) -> (Value, Value) {
    let nats = NatsServer::start();
    let up = fixed_usage_upstream().await;
    let mut cfg = config(&nats, &up);
    cfg.cache.scope = scope;
    let stack = Stack::start(cfg.clone()).await;
    let s = store(&cfg).await;
    let mut keys = Vec::new();
    for team in ["red", "blue"] {
        s.create_team(NewTeam {
            name: team.into(),
            ..NewTeam::default()
        })
        .await
        .unwrap();
        let k = s
            .create_key(NewKey {
                name: team.into(),
                team: Some(team.into()),
                ..NewKey::default()
            })
            .await
            .unwrap();
        until_known(std::slice::from_ref(&stack), &k.key).await;
        keys.push(k.key);
    }
    let url = stack.url("/generate");
    let body = json!({"prompt": "What is the capital of France?", "provider": "cloud"});
    let (s1, _, first) = post(&url, Some(&keys[0]), &body).await;
    assert_eq!(s1, 200, "{first}");
    // The write lands after the reply: wait for it to be a hit for its own team.
    optiroute_testkit::wait_until("cached", Duration::from_secs(5), || {
        let (url, key, body) = (url.clone(), keys[0].clone(), body.clone());
        async move { post(&url, Some(&key), &body).await.2["cached"] == true }
    })
    .await;
    let (s2, _, other_team) = post(&url, Some(&keys[1]), &body).await;
    assert_eq!(s2, 200, "{other_team}");
    // And a namespace narrows even one team's scope.
    let mut ns = body.clone();
    ns["cache_namespace"] = json!("project-x");
    let (_, _, namespaced) = post(&url, Some(&keys[0]), &ns).await;
    assert_eq!(namespaced["cached"], false, "a namespace is its own scope");
    (first, other_team)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_teams_cached_answers_are_not_served_to_another_unless_global() {
    let (_, other) = cache_answers(CacheScope::Team).await;
    assert_eq!(other["cached"], false, "team scope: {other}");
    assert!(other["cost"].as_f64().unwrap() > 0.0);
    let (_, other) = cache_answers(CacheScope::Global).await;
    assert_eq!(other["cached"], true, "global scope: {other}");
}

async fn get_json(url: &str, key: &str) -> (u16, String) {
    let resp = reqwest::Client::new()
        .get(url)
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

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
}
