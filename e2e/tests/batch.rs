//! Batch runs on JetStream: submit, collect in order, no duplicates, worker
//! crashes, retries with backoff, error results, cancellation, direct publishing.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use optiroute_batch::{BatchClient, BatchStatus, ResultStatus};
use optiroute_common::config::Config;
use optiroute_testkit::stack::{client, Parts};
use optiroute_testkit::{metric, scrape, test_config, wait_until, NatsServer, Stack};
use serde_json::{json, Value};

fn input(n: usize) -> String {
    let mut out = String::new();
    for i in 1..=n {
        let line = match i % 3 {
            0 => {
                json!({"custom_id": format!("c{i}"), "prompt": format!("question {i}"), "provider": "local", "cache": "off"})
            }
            1 => {
                json!({"custom_id": format!("c{i}"), "messages": [{"role": "user", "content": format!("chat {i}")}], "provider": "local", "cache": "off"})
            }
            _ => json!({"prompt": format!("plain {i}"), "max_tokens": 5, "cache": "off"}),
        };
        out.push_str(&line.to_string());
        out.push('\n');
        if i % 50 == 0 {
            out.push('\n'); // blank lines are not jobs
        }
    }
    out
}

async fn worker(cfg: &Config, stack: &Stack) -> optiroute_batch::Running {
    optiroute_batch::run(client(cfg, "batch").await, cfg, stack.shutdown.clone())
        .await
        .unwrap()
}

async fn wait_finished(b: &BatchClient, id: &str, within: Duration) -> BatchStatus {
    wait_until("the batch to finish", within, || async {
        let s = b.status(id).await.unwrap();
        s.finished() && s.pending == 0
    })
    .await;
    b.status(id).await.unwrap()
}

#[tokio::test]
async fn a_batch_runs_through_the_router_and_results_come_back_in_order() {
    let nats = NatsServer::start();
    let cfg = test_config(&nats.url());
    let stack = Stack::start(cfg.clone()).await;
    let w1 = worker(&cfg, &stack).await;
    let w2 = worker(&cfg, &stack).await;
    let mut file = input(120);
    file.push_str("{\"prompt\": \"\"}\n{not json\n");
    let (_, submitted) = stack.post_raw("/v1/batches", file.clone()).await;
    let id = submitted["id"].as_str().unwrap().to_string();
    assert_eq!(submitted["total"], 122);
    let b = BatchClient::open(client(&cfg, "c").await, &cfg)
        .await
        .unwrap();
    let s = wait_finished(&b, &id, Duration::from_secs(30)).await;
    assert_eq!((s.done, s.failed, s.status.as_str()), (120, 2, "completed"));
    assert!(s.cost_usd > 0.0);

    // Submitting the same file again adds no job.
    let (_, again) = stack.post_raw("/v1/batches", file).await;
    assert_eq!(again["id"], id.as_str());
    assert_eq!(again["total"], 122);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let jobs_ok = metric(
        &scrape(w1.admin_addr).await,
        "optiroute_batch_jobs_total",
        &[("outcome", "ok")],
    )
    .unwrap_or(0.0)
        + metric(
            &scrape(w2.admin_addr).await,
            "optiroute_batch_jobs_total",
            &[("outcome", "ok")],
        )
        .unwrap_or(0.0);
    assert_eq!(jobs_ok, 120.0, "each job ran exactly once");
    assert!(
        metric(
            &scrape(w1.admin_addr).await,
            "optiroute_batch_jobs_total",
            &[]
        )
        .unwrap_or(0.0)
            > 0.0,
        "both workers took jobs"
    );
    assert!(
        metric(
            &scrape(w2.admin_addr).await,
            "optiroute_batch_jobs_total",
            &[]
        )
        .unwrap_or(0.0)
            > 0.0,
        "both workers took jobs"
    );

    // Results: one line per input line, in order.
    let (_, text) = stack.get(&format!("/v1/batches/{id}/results")).await;
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 122);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["line"], i as u64 + 1);
    }
    assert_eq!(lines[0]["custom_id"], "c1");
    assert_eq!(lines[0]["status"], "ok");
    assert_eq!(lines[0]["response"]["provider"], "local");
    assert!(lines[0]["response"]["text"]
        .as_str()
        .unwrap()
        .starts_with("[simulated]"));
    assert_eq!(lines[120]["status"], "error");
    assert_eq!(lines[120]["error"]["code"], "bad_request");
    assert!(lines[121]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("JSON"));

    let (_, st) = stack.get(&format!("/v1/batches/{id}")).await;
    let st: Value = serde_json::from_str(&st).unwrap();
    assert_eq!(st["status"], "completed");
    assert_eq!(stack.get("/v1/batches/nope").await.0, 404);
    assert_eq!(stack.get("/v1/batches/bad.id").await.0, 400);
}

#[tokio::test]
async fn a_worker_that_dies_mid_batch_loses_nothing() {
    let nats = NatsServer::start();
    let mut cfg = test_config(&nats.url());
    cfg.local.simulated.base_ms = 20;
    cfg.batch.max_in_flight = 4;
    cfg.batch.ack_wait_ms = 1_000;
    let stack = Stack::start(cfg.clone()).await;
    let doomed = worker(&cfg, &stack).await;
    let b = BatchClient::open(client(&cfg, "c").await, &cfg)
        .await
        .unwrap();
    let s = b
        .submit(input(150).as_bytes(), Some("crash-test"))
        .await
        .unwrap();
    assert_eq!(s.total, 150);
    wait_until("some progress", Duration::from_secs(10), || async {
        b.status("crash-test").await.unwrap().done >= 20
    })
    .await;
    doomed.abort(); // jobs in flight are never acknowledged
    let _survivor = worker(&cfg, &stack).await;
    let s = wait_finished(&b, "crash-test", Duration::from_secs(60)).await;
    assert_eq!((s.done, s.failed), (150, 0));
    let results = b.results("crash-test").await.unwrap();
    assert!(results.iter().all(|r| r.status == ResultStatus::Ok));
    assert!(
        results.iter().any(|r| r.attempts > 1),
        "the dead worker's jobs were delivered again"
    );
}

#[tokio::test]
async fn failures_are_retried_with_backoff_then_become_error_results() {
    let nats = NatsServer::start();
    let mut cfg = test_config(&nats.url());
    cfg.batch.max_deliver = 3;
    cfg.batch.backoff_ms = vec![50, 50];
    // No router at first: every job fails with no_responders.
    let stack = Stack::start_parts(
        cfg.clone(),
        Parts {
            router: false,
            ingress: false,
            ..Parts::ALL
        },
    )
    .await;
    let w = worker(&cfg, &stack).await;
    let b = BatchClient::open(client(&cfg, "c").await, &cfg)
        .await
        .unwrap();
    b.submit(input(5).as_bytes(), Some("doomed")).await.unwrap();
    let s = wait_finished(&b, "doomed", Duration::from_secs(20)).await;
    assert_eq!((s.done, s.failed), (0, 5));
    let results = b.results("doomed").await.unwrap();
    for r in &results {
        assert_eq!(
            r.error.as_ref().unwrap().code,
            optiroute_common::ErrorKind::NoResponders
        );
        assert_eq!(r.attempts, 3);
    }
    assert!(
        metric(
            &scrape(w.admin_addr).await,
            "optiroute_batch_jobs_total",
            &[("outcome", "retried")]
        )
        .unwrap()
            >= 10.0
    );

    // With longer backoff, a router that comes back in time saves the jobs.
    let mut patient = cfg.clone();
    patient.batch.max_deliver = 20;
    patient.batch.backoff_ms = vec![200];
    patient.batch.consumer = "patient".into();
    // A second deployment on the same NATS system: its own prefix, stream and buckets.
    patient.nats.prefix = "patient".into();
    patient.batch.stream = "PATIENT_BATCH".into();
    patient.batch.meta_bucket = "patient-batches".into();
    patient.batch.results_bucket = "patient-batch-results".into();
    patient.cache.bucket = "patient-cache".into();
    let b2 = BatchClient::open(client(&patient, "c2").await, &patient)
        .await
        .unwrap();
    let _w2 = worker(&patient, &stack).await;
    let _local = optiroute_providers::run_local(
        client(&patient, "l2").await,
        &patient,
        stack.shutdown.clone(),
    )
    .await
    .unwrap();
    b2.submit(input(6).as_bytes(), Some("saved")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _router = optiroute_router::run(
        client(&patient, "r2").await,
        &patient,
        stack.shutdown.clone(),
    )
    .await
    .unwrap();
    let s = wait_finished(&b2, "saved", Duration::from_secs(30)).await;
    assert_eq!((s.done, s.failed), (6, 0));
    assert!(b2
        .results("saved")
        .await
        .unwrap()
        .iter()
        .any(|r| r.attempts > 1));
}

#[tokio::test]
async fn a_cancelled_batch_stops_and_accounts_for_every_line() {
    let nats = NatsServer::start();
    let mut cfg = test_config(&nats.url());
    cfg.local.simulated.base_ms = 200;
    cfg.batch.max_in_flight = 1;
    let stack = Stack::start(cfg.clone()).await;
    let _w = worker(&cfg, &stack).await;
    let http = reqwest::Client::new();
    let submitted: Value = http
        .post(stack.url("/v1/batches?id=stop-me"))
        .body(input(30))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(submitted["id"], "stop-me");
    let b = BatchClient::open(client(&cfg, "c").await, &cfg)
        .await
        .unwrap();
    wait_until("a first result", Duration::from_secs(10), || async {
        b.status("stop-me").await.unwrap().done >= 1
    })
    .await;
    let st: Value = http
        .post(stack.url("/v1/batches/stop-me/cancel"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(st["status"], "cancelled");
    let s = wait_finished(&b, "stop-me", Duration::from_secs(10)).await;
    assert_eq!(s.done + s.cancelled + s.failed, 30);
    assert!(s.cancelled >= 20, "{s:?}");
    assert_eq!(s.pending, 0);
}

#[tokio::test]
async fn other_systems_can_publish_jobs_directly() {
    let nats = NatsServer::start();
    let cfg = test_config(&nats.url());
    let stack = Stack::start_parts(cfg.clone(), Parts::WORKERS).await;
    let _w = worker(&cfg, &stack).await;
    let b = BatchClient::open(client(&cfg, "c").await, &cfg)
        .await
        .unwrap();
    let producer = client(&cfg, "producer").await;
    let mut h = async_nats::HeaderMap::new();
    h.insert("Content-Type", "application/json");
    let js = async_nats::jetstream::new(producer);
    js.publish_with_headers(
        "optiroute.batch.external",
        h,
        r#"{"line": 7, "custom_id": "ext", "prompt": "from elsewhere", "provider": "local"}"#
            .into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    wait_until(
        "the external job's result",
        Duration::from_secs(10),
        || async { b.result("external", 7).await.unwrap().is_some() },
    )
    .await;
    let r = b.result("external", 7).await.unwrap().unwrap();
    assert_eq!(r.custom_id.as_deref(), Some("ext"));
    assert_eq!(r.status, ResultStatus::Ok);
}

/// Generations the local pool has run so far.
fn provider_calls(stack: &Stack) -> u64 {
    stack
        .local
        .as_ref()
        .unwrap()
        .metrics
        .provider_latency
        .with_label_values(&["local"])
        .get_sample_count()
}

/// Jobs still in the work queue (a job leaves it when acked or terminated).
async fn queued(b: &BatchClient) -> u64 {
    b.jobs_stream().get_info().await.unwrap().state.messages
}

async fn publish_json(cfg: &Config, subject: &str, body: String) {
    let js = async_nats::jetstream::new(client(cfg, "producer").await);
    let mut h = async_nats::HeaderMap::new();
    h.insert("Content-Type", "application/json");
    js.publish_with_headers(subject.to_string(), h, body.into())
        .await
        .unwrap()
        .await
        .unwrap();
}

fn worker_jobs(w: &optiroute_batch::Running, outcome: &str) -> u64 {
    w.metrics.jobs.with_label_values(&[outcome]).get()
}

#[tokio::test]
async fn a_job_on_a_malformed_subject_ends_without_running() {
    let nats = NatsServer::start();
    let cfg = test_config(&nats.url());
    let parts = Parts::WORKERS;
    let stack = Stack::start_parts(cfg.clone(), parts).await;
    let w = worker(&cfg, &stack).await;
    let b = BatchClient::open(client(&cfg, "c").await, &cfg)
        .await
        .unwrap();
    publish_json(
        &cfg,
        "optiroute.batch.a:b",
        json!({"line": 1, "prompt": "to a bad subject", "provider": "local", "cache": "off"})
            .to_string(),
    )
    .await;
    wait_until(
        "the job to leave the queue",
        Duration::from_secs(10),
        || async { queued(&b).await == 0 },
    )
    .await;
    assert_eq!(worker_jobs(&w, "rejected"), 1);
    assert_eq!(provider_calls(&stack), 0, "validated before any work");
}

#[tokio::test]
async fn an_oversize_custom_id_ends_with_one_error_result() {
    let nats = NatsServer::start();
    let cfg = test_config(&nats.url());
    let parts = Parts::WORKERS;
    let stack = Stack::start_parts(cfg.clone(), parts).await;
    let _w = worker(&cfg, &stack).await;
    let b = BatchClient::open(client(&cfg, "c").await, &cfg)
        .await
        .unwrap();
    // The job fits in max_payload (1 MiB); its result, with the answer, does not.
    let custom_id = "x".repeat((1 << 20) - 200);
    publish_json(
        &cfg,
        "optiroute.batch.big",
        json!({"line": 1, "custom_id": custom_id, "prompt": "hello", "provider": "local", "cache": "off"})
            .to_string(),
    )
    .await;
    wait_until(
        "the job to leave the queue",
        Duration::from_secs(15),
        || async { queued(&b).await == 0 },
    )
    .await;
    assert!(provider_calls(&stack) <= 1, "paid at most once");
    let r = b.result("big", 1).await.unwrap().expect("an error result");
    assert_eq!(r.status, ResultStatus::Error);
    let e = r.error.unwrap();
    assert_eq!(e.code, optiroute_common::ErrorKind::BadRequest);
    assert!(e.message.contains("custom_id"), "{}", e.message);
}

#[tokio::test]
async fn a_redelivered_job_whose_result_exists_is_not_run_again() {
    let nats = NatsServer::start();
    let cfg = test_config(&nats.url());
    let parts = Parts::WORKERS;
    let stack = Stack::start_parts(cfg.clone(), parts).await;
    let w = worker(&cfg, &stack).await;
    let b = BatchClient::open(client(&cfg, "c").await, &cfg)
        .await
        .unwrap();
    let job = json!({"line": 1, "custom_id": "once", "prompt": "pay once", "provider": "local", "cache": "off"})
        .to_string();
    publish_json(&cfg, "optiroute.batch.once", job.clone()).await;
    wait_until("the first result", Duration::from_secs(10), || async {
        b.result("once", 1).await.unwrap().is_some()
    })
    .await;
    let first = b.result("once", 1).await.unwrap().unwrap();
    assert_eq!(provider_calls(&stack), 1);
    // The same job again, as after an ack lost on the way to the server.
    publish_json(&cfg, "optiroute.batch.once", job).await;
    wait_until(
        "the copy to leave the queue",
        Duration::from_secs(10),
        || async { queued(&b).await == 0 },
    )
    .await;
    assert_eq!(
        provider_calls(&stack),
        1,
        "the copy was not generated again"
    );
    assert_eq!(worker_jobs(&w, "duplicate"), 1);
    assert_eq!(b.result("once", 1).await.unwrap().unwrap(), first);
}

#[tokio::test]
async fn a_custom_id_over_256_bytes_is_refused_at_submission() {
    let nats = NatsServer::start();
    let cfg = test_config(&nats.url());
    let stack = Stack::start(cfg.clone()).await;
    let file = format!(
        "{}\n{}\n",
        json!({"custom_id": "ok", "prompt": "a"}),
        json!({"custom_id": "y".repeat(257), "prompt": "b"})
    );
    let (status, body) = stack.post_raw("/v1/batches?id=long-ids", file).await;
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("line 2") && message.contains("custom_id"),
        "{message}"
    );
}

#[tokio::test]
async fn a_result_that_cannot_be_stored_ends_the_job_after_bounded_tries() {
    let nats = NatsServer::start();
    let mut cfg = test_config(&nats.url());
    cfg.batch.store_attempts = 3;
    // A results bucket that holds only a few results: the rest cannot be stored.
    let js = async_nats::jetstream::new(client(&cfg, "admin").await);
    js.create_key_value(async_nats::jetstream::kv::Config {
        bucket: cfg.batch.results_bucket.clone(),
        history: 1,
        max_bytes: 2048,
        ..Default::default()
    })
    .await
    .unwrap();
    let parts = Parts::WORKERS;
    let stack = Stack::start_parts(cfg.clone(), parts).await;
    let w = worker(&cfg, &stack).await;
    let b = BatchClient::open(client(&cfg, "c").await, &cfg)
        .await
        .unwrap();
    for line in 1..=8 {
        publish_json(
            &cfg,
            "optiroute.batch.full",
            json!({"line": line, "prompt": format!("fill {line}"), "provider": "local", "cache": "off"})
                .to_string(),
        )
        .await;
    }
    wait_until("every job to end", Duration::from_secs(30), || async {
        queued(&b).await == 0
    })
    .await;
    assert_eq!(provider_calls(&stack), 8, "each job generated once");
    let failed = worker_jobs(&w, "store_failed");
    assert!(failed >= 1, "some results did not fit");
    assert_eq!(worker_jobs(&w, "ok") + failed, 8);
}

/// Jobs published straight onto a submitted batch's subject with a line
/// outside 1..=total (0, total + 1, far beyond) are ended without running
/// and without touching that batch's counts or cost; a status stays
/// `running`, not `completed`, while anything of the batch is queued.
#[tokio::test]
async fn direct_jobs_outside_a_submitted_batchs_lines_are_ended_uncounted() {
    let nats = NatsServer::start();
    let cfg = test_config(&nats.url());
    let parts = Parts::WORKERS;
    let stack = Stack::start_parts(cfg.clone(), parts).await;
    let b = BatchClient::open(client(&cfg, "c").await, &cfg)
        .await
        .unwrap();
    b.submit(input(3).as_bytes(), Some("victim")).await.unwrap();
    // Nothing ran yet: the batch is not completed, whatever its counts.
    let s = b.status("victim").await.unwrap();
    assert_eq!((s.status.as_str(), s.pending), ("running", 3));
    let w = worker(&cfg, &stack).await;
    let before = wait_finished(&b, "victim", Duration::from_secs(20)).await;
    assert_eq!((before.done, before.failed), (3, 0));
    let calls = provider_calls(&stack);
    assert_eq!(calls, 3);
    for line in [0, 4, 1_000] {
        publish_json(
            &cfg,
            "optiroute.batch.victim",
            json!({"line": line, "prompt": format!("intruder {line}"), "provider": "local", "cache": "off"})
                .to_string(),
        )
        .await;
    }
    wait_until(
        "the intruders to leave the queue",
        Duration::from_secs(10),
        || async { queued(&b).await == 0 },
    )
    .await;
    assert_eq!(worker_jobs(&w, "out_of_range"), 3);
    assert_eq!(provider_calls(&stack), calls, "no intruder was generated");
    let after = b.status("victim").await.unwrap();
    assert_eq!(
        (
            after.done,
            after.failed,
            after.cancelled,
            after.cost_usd,
            after.status.as_str()
        ),
        (
            before.done,
            before.failed,
            before.cancelled,
            before.cost_usd,
            "completed"
        )
    );
    assert_eq!(b.result("victim", 4).await.unwrap(), None);
}

/// A job handled for longer than `batch.ack_wait_ms` (here a provider
/// slower than it) keeps its delivery alive with progress acks: it is not
/// delivered to the second worker and paid for twice.
#[tokio::test]
async fn a_job_slower_than_ack_wait_runs_once() {
    let nats = NatsServer::start();
    let mut cfg = test_config(&nats.url());
    cfg.local.simulated.base_ms = 1_500;
    cfg.batch.ack_wait_ms = 500;
    let parts = Parts::WORKERS;
    let stack = Stack::start_parts(cfg.clone(), parts).await;
    let w1 = worker(&cfg, &stack).await;
    let w2 = worker(&cfg, &stack).await;
    let b = BatchClient::open(client(&cfg, "c").await, &cfg)
        .await
        .unwrap();
    publish_json(
        &cfg,
        "optiroute.batch.slow",
        json!({"line": 1, "prompt": "take your time", "provider": "local", "cache": "off"})
            .to_string(),
    )
    .await;
    wait_until(
        "the job to leave the queue and both workers to be idle",
        Duration::from_secs(20),
        || async {
            queued(&b).await == 0 && w1.metrics.in_flight.get() + w2.metrics.in_flight.get() == 0
        },
    )
    .await;
    let r = b.result("slow", 1).await.unwrap().expect("a result");
    assert_eq!(r.status, ResultStatus::Ok);
    assert_eq!(r.attempts, 1);
    let handled = |o| worker_jobs(&w1, o) + worker_jobs(&w2, o);
    assert_eq!((handled("ok"), handled("duplicate")), (1, 0));
    assert_eq!(provider_calls(&stack), 1, "generated once");
}
