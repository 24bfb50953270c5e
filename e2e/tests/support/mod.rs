//! What the users tests share: a stack with auth on, keys made in the
//! accounts bucket, and readers of the ledger and the spend records.
#![allow(dead_code)]

use std::time::Duration;

use optiroute_accounts::model::Period;
use optiroute_accounts::spend::{scan, SpendRecord};
use optiroute_accounts::AccountStore;
use optiroute_common::config::{AuthMode, Config};
use optiroute_common::protocol::{JetStreamNames, Subjects};
use optiroute_testkit::stack::Parts;
use optiroute_testkit::{test_config, FakeUpstream, Mode, NatsServer, Stack};
use serde_json::{json, Value};

/// Every cloud answer uses 10 prompt and 20 completion tokens: at these
/// prices, 0.00005 USD.
pub const COST: f64 = 10.0 / 1000.0 * 0.001 + 20.0 / 1000.0 * 0.002;

pub fn config(nats: &NatsServer, up: &FakeUpstream) -> Config {
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

pub async fn fixed_usage_upstream() -> FakeUpstream {
    FakeUpstream::start(Mode::Usage(json!({
        "prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30
    })))
    .await
}

/// A full stack, a second ingress+router, and a third router.
pub async fn replicas(cfg: &Config) -> Vec<Stack> {
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

pub async fn store(cfg: &Config) -> AccountStore {
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

pub async fn post(url: &str, key: Option<&str>, body: &Value) -> (u16, Option<String>, Value) {
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
pub async fn until_known(stacks: &[Stack], key: &str) {
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

pub async fn spend_records(cfg: &Config, key_id: &str) -> Vec<SpendRecord> {
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

pub async fn ledger_used(cfg: &Config, entry: &str) -> u64 {
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
pub fn window_label(p: Period) -> String {
    p.window(optiroute_accounts::store::now_ms()).label
}

pub async fn get_json(url: &str, key: &str) -> (u16, String) {
    let resp = reqwest::Client::new()
        .get(url)
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}
