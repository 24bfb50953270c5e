//! Spend records for the admin tests: made, published and summed as the
//! answers show them.
#![allow(dead_code)]

use std::time::Duration;

use optiroute_accounts::spend::{self, SpendLog, SpendRecord};
use optiroute_accounts::to_nanos;
use optiroute_common::config::Config;
use optiroute_common::protocol::{JetStreamNames, Subjects};
use optiroute_common::wire::Pool;
use serde_json::{json, Value};

pub fn record(
    key_id: &str,
    team: Option<&str>,
    user: Option<&str>,
    pool: Pool,
    cost: f64,
    ts_ms: u64,
    n: u32,
) -> SpendRecord {
    SpendRecord {
        ts_ms,
        request_id: format!("req-{key_id}-{n}"),
        key_id: key_id.to_string(),
        team: team.map(str::to_string),
        user: user.map(str::to_string),
        pool,
        model: "m".into(),
        prompt_tokens: 10 + n,
        completion_tokens: 20 + 2 * n,
        cost_usd: cost,
        cost_nanos: to_nanos(cost),
        cached: cost == 0.0,
        estimated: false,
    }
}

/// Publishes `records` with [`SpendLog::record`] and waits until the stream holds them.
pub async fn publish(cfg: &Config, records: &[SpendRecord]) {
    let js = async_nats::jetstream::new(optiroute_testkit::stack::client(cfg, "router").await);
    let names = JetStreamNames::for_prefix(&cfg.nats.prefix);
    let subjects = Subjects::new(&cfg.nats.prefix);
    let mut stream = spend::ensure_stream(&js, &names.spend_stream, &subjects.spend_all(), 1, 30)
        .await
        .unwrap();
    let log = SpendLog::new(js.clone(), &cfg.nats.prefix);
    for r in records {
        log.record(r.clone()).await;
    }
    // Records are packed (several a message): count records, not messages.
    let want = records.len() as u64;
    let stored = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let mut n = 0u64;
            if stream.info().await.unwrap().state.messages > 0 {
                spend::scan(
                    &js,
                    &names.spend_stream,
                    &subjects.spend_all(),
                    0,
                    Duration::from_secs(5),
                    |_| n += 1,
                )
                .await
                .unwrap();
            }
            if n >= want {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the spend records stored within 10 s");
    assert_eq!(stored, want);
}

/// Sums of the records as the answers show them.
pub fn sums<'a>(rs: impl IntoIterator<Item = &'a SpendRecord>) -> Value {
    let mut t = spend::Totals::default();
    for r in rs {
        t.add(r);
    }
    serde_json::to_value(t).unwrap()
}

pub fn figures(v: &Value) -> Value {
    json!({
        "requests": v["requests"], "cached": v["cached"], "prompt_tokens": v["prompt_tokens"],
        "completion_tokens": v["completion_tokens"], "cost_nanos": v["cost_nanos"],
        "cost_usd": v["cost_usd"], "by_pool": v["by_pool"],
    })
}
