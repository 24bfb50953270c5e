//! What `sync_interval: always` costs on a 3-node cluster, side by side
//! with nats-server's default (`2m`), in one run: a batch end to end (the
//! zero-latency simulated pool, so the JetStream writes are what is left)
//! and a compare-and-set on a KV counter (what a spend or budget update
//! is). Not a test: run by `bench/cluster.sh`, which prints the figures.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use optiroute_testkit::nats_cluster::wait_for_jetstream;
use optiroute_testkit::stack::client;
use optiroute_testkit::{test_config, wait_until, NatsCluster, Stack};
use serde_json::{json, Value};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Batch seconds, and p50/p99 of a counter's compare-and-set.
async fn measure(sync: &str, lines: usize, updates: usize) -> (f64, Duration, Duration) {
    let cluster = NatsCluster::start_with_sync(3, sync);
    let mut cfg = test_config(&cluster.url());
    cfg.nats.replicas = 3;
    cfg.local.simulated.base_ms = 0;
    cfg.batch.max_in_flight = 64;
    let probe = client(&cfg, "probe").await;
    let js = jetstream::new(probe.clone());
    wait_for_jetstream(&js).await;
    let stack = Stack::start(cfg.clone()).await;
    let _worker = optiroute_batch::run(client(&cfg, "batch").await, &cfg, stack.shutdown.clone())
        .await
        .unwrap();

    let body: String = (1..=lines)
        .map(|i| {
            json!({"prompt": format!("bench {i}"), "provider": "local", "cache": "off"}).to_string()
                + "\n"
        })
        .collect();
    let t = Instant::now();
    let r = reqwest::Client::new()
        .post(stack.url("/v1/batches?id=bench"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let url = stack.url("/v1/batches/bench");
    wait_until("the batch", Duration::from_secs(600), || {
        let url = url.clone();
        async move {
            let s: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
            s["status"] == "completed"
        }
    })
    .await;
    let batch_secs = t.elapsed().as_secs_f64();

    let bucket = js
        .create_key_value(kv::Config {
            bucket: "bench-spend".into(),
            num_replicas: 3,
            history: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut revision = bucket.put("key-1", "0".into()).await.unwrap();
    let mut took = Vec::with_capacity(updates);
    for i in 1..=updates {
        let t = Instant::now();
        revision = bucket
            .update("key-1", i.to_string().into(), revision)
            .await
            .unwrap();
        took.push(t.elapsed());
    }
    took.sort();
    (batch_secs, percentile(&took, 0.5), percentile(&took, 0.99))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a benchmark: bench/cluster.sh runs it"]
async fn sync_always_against_the_default() {
    let lines = env_usize("BENCH_LINES", 2_000);
    let updates = env_usize("BENCH_UPDATES", 2_000);
    let rounds = env_usize("BENCH_ROUNDS", 2);
    println!("cluster: 3 nodes, R3, {lines}-line batch, {updates} KV compare-and-sets, {rounds} rounds each, in turns");
    println!("sync_interval  round  batch_s  lines/s  cas_p50_ms  cas_p99_ms");
    for round in 1..=rounds {
        // ABBA: neither setting always goes first.
        let order = if round % 2 == 1 {
            ["2m", "always"]
        } else {
            ["always", "2m"]
        };
        for sync in order {
            let (secs, p50, p99) = measure(sync, lines, updates).await;
            println!(
                "{sync:<13}  {round:<5}  {secs:<7.2}  {:<7.0}  {:<10.3}  {:.3}",
                lines as f64 / secs,
                p50.as_secs_f64() * 1e3,
                p99.as_secs_f64() * 1e3
            );
        }
    }
}
