//! Batch uploads and state at scale: upload limits, the concurrent-upload
//! cap, status from counters, a submission cut off and completed.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use optiroute_batch::{BatchClient, ResultStatus};
use optiroute_common::config::Config;
use optiroute_testkit::stack::client;
use optiroute_testkit::{test_config, wait_until, NatsServer, Stack};
use serde_json::{json, Value};

fn lines(n: usize, tag: &str) -> String {
    (1..=n)
        .map(|i| {
            json!({"custom_id": format!("{tag}{i}"), "prompt": format!("{tag} question {i}"), "provider": "local", "cache": "off"})
                .to_string()
                + "\n"
        })
        .collect()
}

async fn post(stack: &Stack, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(stack.url(path))
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

async fn worker(cfg: &Config, stack: &Stack) -> optiroute_batch::Running {
    optiroute_batch::run(client(cfg, "batch").await, cfg, stack.shutdown.clone())
        .await
        .unwrap()
}

#[tokio::test]
async fn uploads_over_the_line_size_or_line_count_are_refused_with_413() {
    let nats = NatsServer::start();
    let cfg = test_config(&nats.url());
    let stack = Stack::start(cfg.clone()).await;
    // A line over `batch.max_line_bytes` (1 MiB by default).
    let big = format!(
        "{}\n{}\n",
        json!({"prompt": "fine"}),
        json!({"prompt": "x".repeat(1_100_000)})
    );
    let (status, body) = post(&stack, "/v1/batches?id=big-line", big).await;
    assert_eq!(status, 413, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("line 2") && message.contains("bytes"),
        "{message}"
    );
    // More lines than `batch.max_lines` (100,000 by default).
    let many = "{\"prompt\": \"p\"}\n".repeat(100_001);
    let (status, body) = post(&stack, "/v1/batches?id=many-lines", many).await;
    assert_eq!(status, 413, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("100000 lines"), "{message}");
    // Nothing was created for either.
    assert_eq!(stack.get("/v1/batches/big-line").await.0, 404);
    assert_eq!(stack.get("/v1/batches/many-lines").await.0, 404);
}

#[tokio::test]
async fn uploads_beyond_the_concurrent_cap_are_refused_with_503() {
    let nats = NatsServer::start();
    let cfg = test_config(&nats.url());
    let cap = 4; // the default of `batch.max_concurrent_uploads`
    let stack = Stack::start(cfg.clone()).await;
    // `cap` uploads that have sent a first line and stay open.
    let mut senders = Vec::new();
    let mut open = Vec::new();
    for i in 0..cap {
        let (mut tx, rx) = futures::channel::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
        tx.try_send(Ok(Bytes::from(lines(1, &format!("slow{i}-")))))
            .unwrap();
        senders.push(tx);
        let url = stack.url(&format!("/v1/batches?id=slow-{i}"));
        open.push(tokio::spawn(async move {
            let resp = reqwest::Client::new()
                .post(url)
                .body(reqwest::Body::wrap_stream(rx))
                .send()
                .await
                .unwrap();
            resp.status().as_u16()
        }));
    }
    let small = lines(2, "quick");
    wait_until("an upload to be refused", Duration::from_secs(10), || {
        let small = small.clone();
        let stack = &stack;
        async move {
            let (status, body) = post(stack, "/v1/batches?id=quick", small).await;
            if status == 503 {
                let message = body["error"]["message"].as_str().unwrap();
                assert!(message.contains("too many batch uploads"), "{message}");
            }
            status == 503
        }
    })
    .await;
    // The open uploads end; each succeeds, and the next upload is taken.
    drop(senders);
    for u in open {
        assert_eq!(u.await.unwrap(), 200);
    }
    assert_eq!(post(&stack, "/v1/batches?id=quick", small).await.0, 200);
}

#[tokio::test]
async fn status_comes_from_counters_and_agrees_with_the_results() {
    let nats = NatsServer::start();
    let cfg = test_config(&nats.url());
    let stack = Stack::start(cfg.clone()).await;
    let _w1 = worker(&cfg, &stack).await;
    let _w2 = worker(&cfg, &stack).await;
    let mut file = lines(80, "c");
    file.push_str("{\"prompt\": \"\"}\n");
    let (status, submitted) = post(&stack, "/v1/batches?id=counted", file).await;
    assert_eq!(status, 200, "{submitted}");
    let b = BatchClient::open(client(&cfg, "c").await, &cfg)
        .await
        .unwrap();
    wait_until("the batch to finish", Duration::from_secs(30), || async {
        let s = b.status("counted").await.unwrap();
        s.finished() && s.pending == 0
    })
    .await;
    let s = b.status("counted").await.unwrap();
    assert_eq!((s.status.as_str(), s.done, s.failed), ("completed", 80, 1));
    let results = b.results("counted").await.unwrap();
    assert_eq!(results.len(), 81);
    let cost: f64 = results.iter().map(|r| r.cost()).sum();
    assert!(cost > 0.0);
    assert!(
        (s.cost_usd - cost).abs() < 1e-12,
        "{} vs {cost}",
        s.cost_usd
    );
    assert_eq!(
        results
            .iter()
            .filter(|r| r.status == ResultStatus::Ok)
            .count(),
        80
    );
    // The status does not read the results: one removed behind its back
    // changes nothing in it (it did when each status re-read them all).
    let kv = jetstream::new(client(&cfg, "kv").await)
        .get_key_value(&cfg.batch.results_bucket)
        .await
        .unwrap();
    kv.purge("counted.1").await.unwrap();
    let again = b.status("counted").await.unwrap();
    assert_eq!((again.done, again.failed), (80, 1));

    // Counters lost (as when a worker dies between a result and its count):
    // with nothing queued, the status recounts the results once they have
    // been still for a few seconds.
    let meta = jetstream::new(client(&cfg, "kv2").await)
        .get_key_value(&cfg.batch.meta_bucket)
        .await
        .unwrap();
    meta.purge("counted.n").await.unwrap();
    wait_until("the status to recount", Duration::from_secs(20), || async {
        let s = b.status("counted").await.unwrap();
        s.status == "completed"
    })
    .await;
    let s = b.status("counted").await.unwrap();
    // Line 1's result was removed above: it counts as failed (lost).
    assert_eq!((s.done, s.failed), (79, 2));
}

#[tokio::test]
async fn a_submission_cut_off_midway_is_incomplete_and_completed_by_resubmitting() {
    let nats = NatsServer::start();
    let cfg = test_config(&nats.url());
    let stack = Stack::start(cfg.clone()).await;
    // A queue that takes 50 jobs: the 51st publish fails, as it would on a
    // full stream or a NATS outage.
    let js = jetstream::new(client(&cfg, "admin").await);
    let mut queue = stream::Config {
        name: cfg.batch.stream.clone(),
        subjects: vec!["optiroute.batch.*".into()],
        retention: stream::RetentionPolicy::WorkQueue,
        duplicate_window: Duration::from_secs(3600),
        max_messages: 50,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    };
    js.create_stream(queue.clone()).await.unwrap();
    let file = lines(120, "r");
    let (status, body) = post(&stack, "/v1/batches?id=cut", file.clone()).await;
    assert_eq!(status, 503, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("submit the same input again"), "{message}");
    let (_, st) = stack.get("/v1/batches/cut").await;
    let st: Value = serde_json::from_str(&st).unwrap();
    assert_eq!(st["status"], "incomplete", "{st}");
    assert_eq!(st["total"], 120);
    assert!(st["submitted"].as_u64().unwrap() < 120, "{st}");

    // The queue drains, the operator lifts the limit, the same file again.
    let w = worker(&cfg, &stack).await;
    let b = BatchClient::open(client(&cfg, "c").await, &cfg)
        .await
        .unwrap();
    wait_until(
        "the queued jobs to run",
        Duration::from_secs(20),
        || async { b.status("cut").await.unwrap().done == 50 },
    )
    .await;
    queue.max_messages = -1;
    js.update_stream(queue).await.unwrap();
    let (status, body) = post(&stack, "/v1/batches?id=cut", file).await;
    assert_eq!(status, 200, "{body}");
    wait_until("the batch to finish", Duration::from_secs(30), || async {
        let s = b.status("cut").await.unwrap();
        s.finished() && s.pending == 0
    })
    .await;
    let s = b.status("cut").await.unwrap();
    assert_eq!((s.status.as_str(), s.done), ("completed", 120));
    let (_, st) = stack.get("/v1/batches/cut").await;
    let st: Value = serde_json::from_str(&st).unwrap();
    assert_eq!(st["submitted"], 120, "{st}");
    let results = b.results("cut").await.unwrap();
    assert_eq!(results.len(), 120);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.status, ResultStatus::Ok);
        assert_eq!(r.custom_id.as_deref(), Some(format!("r{}", i + 1).as_str()));
    }
    // Exactly one generation per line.
    let generated = stack
        .local
        .as_ref()
        .unwrap()
        .metrics
        .provider_latency
        .with_label_values(&["local"])
        .get_sample_count();
    assert_eq!(generated, 120);
    assert_eq!(w.metrics.jobs.with_label_values(&["ok"]).get(), 120);
}

/// Stored error messages are capped (`optiroute_batch::model::MAX_ERROR_MESSAGE_BYTES`,
/// 1 KiB): serde's "invalid type" message repeats the offending string,
/// so an invalid line near the line limit made an error result over
/// NATS's max_payload (1 MiB). Its store failed, the submission answered
/// 503, and resubmitting failed the same way forever.
#[tokio::test]
async fn an_invalid_line_with_a_huge_error_message_is_stored_with_the_message_capped() {
    let nats = NatsServer::start();
    let cfg = test_config(&nats.url());
    let stack = Stack::start(cfg.clone()).await;
    let head = r#"{"prompt":"hi","max_tokens":""#;
    let x = "x".repeat(cfg.batch.max_line_bytes - head.len() - 2 - 8);
    let line = format!("{head}{x}\"}}");
    assert!(line.len() <= cfg.batch.max_line_bytes);
    let (status, body) = post(&stack, "/v1/batches?id=huge-error", format!("{line}\n")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["status"].as_str(), body["failed"].as_u64()),
        (Some("completed"), Some(1)),
        "{body}"
    );
    let b = BatchClient::open(client(&cfg, "c").await, &cfg)
        .await
        .unwrap();
    let r = b
        .result("huge-error", 1)
        .await
        .unwrap()
        .expect("an error result");
    assert_eq!(r.status, ResultStatus::Error);
    let message = r.error.unwrap().message;
    assert!(message.len() <= 1024, "{} bytes", message.len());
    assert!(
        message.contains("max_tokens") && message.contains("invalid type"),
        "{message}"
    );
}

/// The same through a worker: a job published directly whose decode error
/// is bigger than max_payload (each combining accent, 2 bytes in the job,
/// is 7 in serde's message) ends with its real, capped, error.
#[tokio::test]
async fn a_direct_job_with_a_huge_error_message_gets_its_capped_error_stored() {
    let nats = NatsServer::start();
    let cfg = test_config(&nats.url());
    let stack = Stack::start_parts(cfg.clone(), optiroute_testkit::stack::Parts::WORKERS).await;
    let w = worker(&cfg, &stack).await;
    // Creates the stream and buckets (the worker does too, in the background).
    BatchClient::open(client(&cfg, "c").await, &cfg)
        .await
        .unwrap();
    let accents = "\u{301}".repeat(200_000);
    let job = json!({"line": 1, "prompt": "hi", "max_tokens": accents}).to_string();
    let js = jetstream::new(client(&cfg, "producer").await);
    let mut h = async_nats::HeaderMap::new();
    h.insert("Content-Type", "application/json");
    js.publish_with_headers("optiroute.batch.huge-direct", h, job.into())
        .await
        .unwrap()
        .await
        .unwrap();
    // The line is not usable (the job does not decode): the result is
    // kept under `<id>.invalid-<stream sequence>`.
    let results = jetstream::new(client(&cfg, "kv").await)
        .get_key_value(&cfg.batch.results_bucket)
        .await
        .unwrap();
    let key = "huge-direct.invalid-1";
    wait_until("the job's result", Duration::from_secs(30), || async {
        results.get(key).await.unwrap().is_some()
    })
    .await;
    let stored = results.get(key).await.unwrap().unwrap();
    let r: optiroute_batch::BatchResult =
        optiroute_common::wire::decode(optiroute_common::wire::Format::MsgPack, &stored).unwrap();
    assert_eq!(r.status, ResultStatus::Error);
    let e = r.error.unwrap();
    assert_eq!(
        e.code,
        optiroute_common::ErrorKind::BadRequest,
        "{}",
        e.message
    );
    assert!(e.message.len() <= 1024, "{} bytes", e.message.len());
    assert!(e.message.contains("max_tokens"), "{}", e.message);
    assert_eq!(w.metrics.jobs.with_label_values(&["store_failed"]).get(), 0);
}

/// A failed result of `line`, as a worker stores it.
fn failed_result(line: u64) -> optiroute_batch::BatchResult {
    optiroute_batch::BatchResult {
        line,
        custom_id: None,
        status: ResultStatus::Error,
        response: None,
        error: Some(optiroute_common::error::ErrorBody {
            code: optiroute_common::ErrorKind::Internal,
            message: "failed".into(),
            param: None,
            retry_after_secs: None,
            charged: None,
        }),
        attempts: 1,
    }
}

/// The races between a worker's count and a status's recount, driven step
/// by step against a real nats-server: a count written late (its write
/// failed, or the status recounted between the worker's result and its
/// count) after a recount already counted that result is not counted again,
/// and a recount never overwrites a count written while it scanned.
#[tokio::test]
async fn a_count_written_after_a_recount_does_not_count_twice() {
    use optiroute_batch::counters::{self, Counts, Tally};
    let nats = NatsServer::start();
    let cfg = test_config(&nats.url());
    let b = BatchClient::open(client(&cfg, "c").await, &cfg)
        .await
        .unwrap();
    b.submit(lines(3, "race").as_bytes(), Some("race"))
        .await
        .unwrap();
    let meta = b.meta("race").await.unwrap();
    let store = b.meta_store();

    // A worker stores line 1's result; its count is not written yet.
    let tally = Tally::new();
    let r1 = failed_result(1);
    let rev1 = b.create_result("race", &r1).await.unwrap().unwrap();
    tally.record("race", rev1, Counts::of(&r1));
    // Its first write fails (here: to a bucket that is gone).
    let js = jetstream::new(client(&cfg, "admin").await);
    let gone = js
        .create_key_value(jetstream::kv::Config {
            bucket: "gone".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    js.delete_key_value("gone").await.unwrap();
    assert!(!tally.flush(&gone).await, "the write failed");
    // A status recounts in that window, then the count lands.
    assert_eq!(b.recount("race", &meta).await.unwrap().failed, 1);
    assert!(tally.flush(store).await);
    let (c, _) = counters::read(store, "race").await.unwrap();
    assert_eq!(c.failed, 1, "line 1 counted twice: {c:?}");

    // A result stored after the recount still counts, once.
    let r2 = failed_result(2);
    let rev2 = b.create_result("race", &r2).await.unwrap().unwrap();
    tally.record("race", rev2, Counts::of(&r2));
    assert!(tally.flush(store).await);
    assert_eq!(counters::read(store, "race").await.unwrap().0.failed, 2);

    // A recount that scanned while a count landed is dropped, not written
    // over that count: here the count of line 3 lands between the recount's
    // reads (simulated by writing it before, with the recount starting from
    // the counters' previous revision).
    let r3 = failed_result(3);
    let rev3 = b.create_result("race", &r3).await.unwrap().unwrap();
    let (_, before) = counters::read(store, "race").await.unwrap();
    counters::add(store, "race", &[(rev3, Counts::of(&r3))])
        .await
        .unwrap();
    let stale = Counts {
        failed: 2,
        verified: true,
        counted_through: rev2,
        ..Counts::default()
    };
    assert!(!counters::replace(store, "race", &stale, before)
        .await
        .unwrap());
    assert_eq!(counters::read(store, "race").await.unwrap().0.failed, 3);
    let s = b.status("race").await.unwrap();
    assert_eq!((s.failed, s.done), (3, 0));
}

/// A counter write that fails is tried again by the writer on its own,
/// without waiting for the next job to wake it.
#[tokio::test]
async fn a_failed_counter_write_is_retried_without_a_new_job() {
    use optiroute_batch::counters::{self, Counts, Tally};
    let nats = NatsServer::start();
    let cfg = test_config(&nats.url());
    let js = jetstream::new(client(&cfg, "admin").await);
    let bucket = jetstream::kv::Config {
        bucket: "scratch".into(),
        ..Default::default()
    };
    let store = js.create_key_value(bucket.clone()).await.unwrap();
    let tally = Tally::new();
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = tokio::spawn(tally.clone().run(
        store.clone(),
        Duration::from_millis(10),
        stop.clone(),
    ));
    // The bucket goes away: the write fails.
    js.delete_key_value("scratch").await.unwrap();
    let one = Counts {
        done: 1,
        ..Counts::default()
    };
    tally.record("x", 1, one);
    wait_until("a failed write", Duration::from_secs(20), || async {
        tally.write_failures() >= 1
    })
    .await;
    // It comes back: the kept count is written with nothing else recorded.
    js.create_key_value(bucket).await.unwrap();
    wait_until(
        "the count to be written",
        Duration::from_secs(20),
        || async {
            counters::read(&store, "x")
                .await
                .is_ok_and(|(c, _)| c.done == 1)
        },
    )
    .await;
    stop.cancel();
    writer.await.unwrap();
    assert_eq!(counters::read(&store, "x").await.unwrap().0.done, 1);
}
