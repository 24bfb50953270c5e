//! One record per served request on the spend stream (`<PREFIX>_SPEND`,
//! subjects `<prefix>.spend.<key id>`), and the totals read back from it:
//! `/v1/usage`, `/admin/spend` and `optiroute spend export` all derive
//! from these records, so every view adds up to the same spend.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_nats::HeaderMap;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Semaphore};

use optiroute_common::protocol::headers::NATS_MSG_ID;
use optiroute_common::wire::Pool;
use optiroute_common::{Error, ErrorKind};

use crate::model::{rfc3339, Nanos};

/// The key id of anonymous requests (auth off).
pub const ANONYMOUS: &str = "anonymous";

/// Most records being published (waiting for their acks) at once; one
/// more waits for a slot, so a slow stream slows replies instead of
/// growing a queue.
const MAX_IN_FLIGHT: usize = 1024;

/// One served request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpendRecord {
    /// Unix ms when the request was admitted (the time that chose its
    /// budget windows, so the ledger and the records agree on its period).
    pub ts_ms: u64,
    pub request_id: String,
    pub key_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The pool that answered.
    pub pool: Pool,
    pub model: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// What this request was charged, exactly as in its reply's `cost`.
    pub cost_usd: f64,
    /// The same in nano-dollars: the unit budgets are counted in.
    pub cost_nanos: Nanos,
    pub cached: bool,
    /// The tokens are an estimate (a stream that broke off before the
    /// upstream reported its usage).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub estimated: bool,
}

/// Publishes records. Records are packed: every [`PACK_WINDOW`] (or
/// [`PACK_MAX`] records) one message per key holds its records, one JSON
/// object a line, so the stream takes one write for many requests. Each
/// message is published with a fresh message id that its retries reuse,
/// so JetStream's deduplication stores it once.
#[derive(Clone)]
pub struct SpendLog {
    tx: mpsc::Sender<SpendRecord>,
    closing: tokio_util::sync::CancellationToken,
    packer: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
    /// Records dropped because the queue stayed full (JetStream down):
    /// logged one by one, counted here.
    pub dropped: Arc<std::sync::atomic::AtomicU64>,
}

/// Longest a reply waits for room in the queue before its record is
/// dropped (with an error logged): a stream that is down must not hold
/// replies that were already charged.
const QUEUE_WAIT: Duration = Duration::from_millis(50);

/// Longest a record waits to be packed with others.
pub const PACK_WINDOW: Duration = Duration::from_millis(20);
/// Most records packed into one message.
pub const PACK_MAX: usize = 512;
/// Records waiting to be published; one more waits for room, so a slow
/// stream slows replies instead of growing a queue.
const QUEUE: usize = 16_384;

/// Creates the spend stream if it is missing.
pub async fn ensure_stream(
    js: &jetstream::Context,
    name: &str,
    subject: &str,
    replicas: usize,
    retention_days: u64,
) -> Result<stream::Stream, Error> {
    let config = stream::Config {
        name: name.to_string(),
        description: Some("OptiRoute spend: one record per served request".into()),
        subjects: vec![subject.to_string()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        max_age: Duration::from_secs(retention_days.max(1) * 86_400),
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    };
    let s = tokio::time::timeout(Duration::from_secs(10), js.get_or_create_stream(config))
        .await
        .map_err(|_| Error::new(ErrorKind::Timeout, "spend stream: no answer within 10 s"))?
        .map_err(|e| Error::new(ErrorKind::NatsUnavailable, format!("spend stream: {e}")))?;
    Ok(s)
}

impl SpendLog {
    pub fn new(js: jetstream::Context, prefix: &str) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let subjects = optiroute_common::protocol::Subjects::new(prefix);
        let closing = tokio_util::sync::CancellationToken::new();
        let packer = tokio::spawn(pack(js, subjects, rx, closing.clone()));
        SpendLog {
            tx,
            closing,
            packer: Arc::new(std::sync::Mutex::new(Some(packer))),
            dropped: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        }
    }

    /// Queues `rec` for publishing; waits at most [`QUEUE_WAIT`] for room.
    /// `false`: dropped (logged, and counted in [`Self::dropped`]).
    pub async fn record(&self, rec: SpendRecord) -> bool {
        use tokio::sync::mpsc::error::SendTimeoutError;
        match self.tx.send_timeout(rec, QUEUE_WAIT).await {
            Ok(()) => true,
            Err(SendTimeoutError::Timeout(r) | SendTimeoutError::Closed(r)) => {
                self.dropped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(request_id = %r.request_id, key_id = %r.key_id, cost_usd = r.cost_usd, "spend record dropped: the spend stream is not keeping up");
                false
            }
        }
    }

    /// Publishes what is queued and waits (up to `limit`) until it is stored.
    pub async fn close(&self, limit: Duration) {
        self.closing.cancel();
        let packer = self.packer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(p) = packer {
            if tokio::time::timeout(limit, p).await.is_err() {
                tracing::warn!("spend records still unpublished at shutdown");
            }
        }
    }
}

/// Packs queued records per key and publishes them; ends when every
/// [`SpendLog`] is gone and the queue is drained.
async fn pack(
    js: jetstream::Context,
    subjects: optiroute_common::protocol::Subjects,
    mut rx: mpsc::Receiver<SpendRecord>,
    closing: tokio_util::sync::CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let publishing = tokio_util::task::TaskTracker::new();
    loop {
        let first = tokio::select! {
            r = rx.recv() => r,
            _ = closing.cancelled() => rx.try_recv().ok(),
        };
        let Some(first) = first else {
            break;
        };
        let mut batch = vec![first];
        let until = tokio::time::Instant::now() + PACK_WINDOW;
        while batch.len() < PACK_MAX {
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(r)) => batch.push(r),
                _ => break,
            }
        }
        let mut by_key: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut counts: BTreeMap<String, (usize, f64)> = BTreeMap::new();
        for r in &batch {
            let body = by_key.entry(r.key_id.clone()).or_default();
            if serde_json::to_writer(&mut *body, r).is_err() {
                tracing::error!(request_id = %r.request_id, "spend record not encodable");
                continue;
            }
            body.push(b'\n');
            let c = counts.entry(r.key_id.clone()).or_default();
            c.0 += 1;
            c.1 += r.cost_usd;
        }
        for (key_id, body) in by_key {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let subject = subjects.spend(&key_id);
            let js = js.clone();
            let (n, cost) = counts.get(&key_id).copied().unwrap_or_default();
            publishing.spawn(async move {
                let _slot = slot;
                publish(&js, subject, bytes::Bytes::from(body), &key_id, n, cost).await;
            });
        }
    }
    publishing.close();
    publishing.wait().await;
}

/// Tries to store one packed message: about 40 s, longer than a JetStream
/// leader election after a node loss.
const ATTEMPTS: u32 = 24;

/// Publishes one packed message, retried [`ATTEMPTS`] times (backoff to 2 s).
async fn publish(
    js: &jetstream::Context,
    subject: String,
    body: bytes::Bytes,
    key_id: &str,
    records: usize,
    cost_usd: f64,
) {
    let mut headers = HeaderMap::new();
    headers.insert(NATS_MSG_ID, nuid::next().as_str());
    let mut delay = Duration::from_millis(50);
    for attempt in 1..=ATTEMPTS {
        let sent = js
            .publish_with_headers(subject.clone(), headers.clone(), body.clone())
            .await;
        let acked = match sent {
            Ok(ack) => tokio::time::timeout(Duration::from_secs(5), ack)
                .await
                .map_err(|_| "no ack within 5 s".to_string())
                .and_then(|r| r.map(|_| ()).map_err(|e| e.to_string())),
            Err(e) => Err(e.to_string()),
        };
        match acked {
            Ok(()) => return,
            Err(e) if attempt == ATTEMPTS => {
                tracing::error!(%key_id, records, cost_usd, error = %e, "spend records lost after every attempt (about 40 s)");
            }
            Err(e) => {
                tracing::warn!(error = %e, attempt, "spend records not stored yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// The records of one stored message (one JSON object a line; a message
/// written before packing holds one).
pub fn records_of(
    payload: &[u8],
) -> impl Iterator<Item = Result<SpendRecord, serde_json::Error>> + '_ {
    payload
        .split(|b| *b == b'\n')
        .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
        .map(serde_json::from_slice::<SpendRecord>)
}

/// Totals of a group of records.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Totals {
    pub requests: u64,
    pub cached: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_nanos: Nanos,
    pub cost_usd: f64,
    /// Requests, tokens and cost by the pool that answered.
    pub by_pool: BTreeMap<String, PoolTotals>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PoolTotals {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_nanos: Nanos,
    pub cost_usd: f64,
}

impl Totals {
    pub fn add(&mut self, r: &SpendRecord) {
        self.requests += 1;
        self.cached += u64::from(r.cached);
        self.prompt_tokens += u64::from(r.prompt_tokens);
        self.completion_tokens += u64::from(r.completion_tokens);
        self.cost_nanos += r.cost_nanos;
        self.cost_usd = crate::model::to_usd(self.cost_nanos);
        let p = self.by_pool.entry(r.pool.as_str().to_string()).or_default();
        p.requests += 1;
        p.prompt_tokens += u64::from(r.prompt_tokens);
        p.completion_tokens += u64::from(r.completion_tokens);
        p.cost_nanos += r.cost_nanos;
        p.cost_usd = crate::model::to_usd(p.cost_nanos);
    }
}

/// Reads the records on `filter` (a key's subject, or every key's)
/// stored at or after `since_ms`, up to the stream's end when the read
/// began, calling `each` for every one. Gives up after `limit`.
pub async fn scan(
    js: &jetstream::Context,
    stream_name: &str,
    filter: &str,
    since_ms: u64,
    limit: Duration,
    mut each: impl FnMut(SpendRecord),
) -> Result<(), Error> {
    let unavailable = |e: &dyn std::fmt::Display| {
        Error::new(ErrorKind::NatsUnavailable, format!("spend stream: {e}"))
    };
    let work = async {
        let mut stream = js
            .get_stream(stream_name)
            .await
            .map_err(|e| unavailable(&e))?;
        let last = stream
            .info()
            .await
            .map_err(|e| unavailable(&e))?
            .state
            .last_sequence;
        if last == 0 {
            return Ok(());
        }
        let deliver_policy = if since_ms == 0 {
            consumer::DeliverPolicy::All
        } else {
            let start_time = async_nats::datetime::parse_rfc3339(&rfc3339(since_ms))
                .map_err(|e| Error::internal(format!("start time: {e}")))?;
            consumer::DeliverPolicy::ByStartTime { start_time }
        };
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: filter.to_string(),
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable(&e))?;
        if consumer.cached_info().num_pending == 0 {
            return Ok(());
        }
        let mut messages = consumer.messages().await.map_err(|e| unavailable(&e))?;
        while let Some(m) = messages.next().await {
            let m = m.map_err(|e| unavailable(&e))?;
            let info = m.info().map_err(|e| unavailable(&e))?;
            for r in records_of(&m.payload) {
                match r {
                    Ok(r) => each(r),
                    Err(e) => {
                        tracing::warn!(seq = info.stream_sequence, error = %e, "unreadable spend record skipped")
                    }
                }
            }
            if info.stream_sequence >= last || info.pending == 0 {
                break;
            }
        }
        Ok::<(), Error>(())
    };
    tokio::time::timeout(limit, work).await.map_err(|_| {
        Error::new(
            ErrorKind::Timeout,
            format!("reading spend records took longer than {limit:?}"),
        )
    })?
}

/// How far a record's own time (`ts_ms`, the replying router's clock) may
/// trail the time the stream stored it (the NATS server's clock): reads
/// start this much earlier and then keep records by `ts_ms`.
pub const CLOCK_SKEW_MS: u64 = 5 * 60_000;

/// Like [`scan`], keeping the records whose `ts_ms` falls in
/// `[start_ms, end_ms)` (no end: up to now). A record belongs to the
/// window its reply was made in, whenever the stream stored it.
pub async fn scan_window(
    js: &jetstream::Context,
    stream_name: &str,
    filter: &str,
    start_ms: u64,
    end_ms: Option<u64>,
    limit: Duration,
    mut each: impl FnMut(SpendRecord),
) -> Result<(), Error> {
    let since = if start_ms == 0 {
        0
    } else {
        start_ms.saturating_sub(CLOCK_SKEW_MS).max(1)
    };
    scan(js, stream_name, filter, since, limit, |r| {
        if r.ts_ms >= start_ms && end_ms.is_none_or(|end| r.ts_ms < end) {
            each(r);
        }
    })
    .await
}
