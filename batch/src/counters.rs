//! Per-batch counters, so a status is two reads whatever the batch's size.
//!
//! Kept in the meta bucket under `<id>.n` (a batch id has no `.`), changed
//! by compare-and-set. A result is counted by whoever created it (the
//! create-if-absent arbitrates), so each line counts once. Workers add up
//! what they finish and write it every few milliseconds ([`Tally`]), one
//! write per batch instead of one per job; a write that fails is retried
//! on a timer. A worker that dies between storing a result and writing its
//! count leaves the counters short: the status then recounts the results
//! once (see `BatchClient::recount`).
//!
//! Invariant: every stored result is counted exactly once, whichever comes
//! first of its creator's delta and a recount. Each delta carries the
//! results-bucket revision of the result it counts (the revision its
//! create-if-absent returned). A recount reads the counters' revision,
//! then the results bucket's last revision `S`, counts only results with
//! a revision up to `S` (every one of them existed before the scan
//! began, so the scan sees it), and writes `counted_through = S` with an
//! update on the revision it read first: if any delta landed meanwhile,
//! the update fails and the recount is dropped, so no delta is ever
//! overwritten. A delta applied later counts only if its result's revision
//! is above `counted_through`: the recount counted the others already.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::kv;
use optiroute_common::nats::epoch_ms;
use optiroute_common::wire::{self, Format};
use optiroute_common::{Error, ErrorKind};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::model::{BatchResult, ResultStatus};

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    pub done: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub cost_usd: f64,
    /// When they last changed (epoch ms).
    #[serde(default)]
    pub updated_ms: u64,
    /// Set by a recount that found the queue empty: not recounted again
    /// until something changes.
    #[serde(default)]
    pub verified: bool,
    /// Results-bucket revision through which the last recount counted the
    /// results: deltas of results at or below it are counted already.
    #[serde(default)]
    pub counted_through: u64,
}

/// One result's count, with the results-bucket revision its
/// create-if-absent returned.
pub type Delta = (u64, Counts);

impl Counts {
    pub fn of(r: &BatchResult) -> Counts {
        let mut c = Counts {
            cost_usd: r.cost(),
            ..Counts::default()
        };
        match r.status {
            ResultStatus::Ok => c.done = 1,
            ResultStatus::Error => c.failed = 1,
            ResultStatus::Cancelled => c.cancelled = 1,
            ResultStatus::Pending => {}
        }
        c
    }

    pub fn add(&mut self, o: &Counts) {
        self.done += o.done;
        self.failed += o.failed;
        self.cancelled += o.cancelled;
        self.cost_usd += o.cost_usd;
    }

    pub fn finished(&self) -> u64 {
        self.done + self.failed + self.cancelled
    }
}

pub fn key(id: &str) -> String {
    format!("{id}.n")
}

fn js_error(e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::NatsUnavailable, format!("batch counters: {e}"))
}

/// The counters of a batch (zero when none were written) and their revision.
pub async fn read(meta: &kv::Store, id: &str) -> Result<(Counts, u64), Error> {
    match meta.entry(key(id)).await.map_err(js_error)? {
        Some(e) if e.operation == kv::Operation::Put => {
            Ok((wire::decode(Format::Json, &e.value)?, e.revision))
        }
        _ => Ok((Counts::default(), 0)),
    }
}

/// Changes the counters with compare-and-set, retrying on conflict (bounded).
pub async fn change(meta: &kv::Store, id: &str, f: impl Fn(&mut Counts)) -> Result<Counts, Error> {
    let mut delay = Duration::from_millis(2);
    for _ in 0..100 {
        let (mut c, revision) = read(meta, id).await?;
        f(&mut c);
        c.updated_ms = epoch_ms(SystemTime::now());
        let body = wire::encode(Format::Json, &c)?;
        let written = if revision == 0 {
            meta.create(key(id), body)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        } else {
            meta.update(key(id), body, revision)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        match written {
            Ok(()) => return Ok(c),
            Err(e) => tracing::debug!(batch = %id, error = %e, "counter write conflict; retrying"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(200));
    }
    Err(js_error("too many conflicting writes"))
}

/// Adds the deltas of results a recount has not counted yet (see the
/// module's invariant) to a batch's counters.
pub async fn add(meta: &kv::Store, id: &str, deltas: &[Delta]) -> Result<(), Error> {
    change(meta, id, |c| {
        let through = c.counted_through;
        for (revision, d) in deltas {
            if *revision > through {
                c.add(d);
                c.verified = false;
            }
        }
    })
    .await
    .map(|_| ())
}

/// Writes `counts` in place of the counters if they are still at
/// `revision` (0: none yet): `Ok(false)` when they changed meanwhile.
pub async fn replace(
    meta: &kv::Store,
    id: &str,
    counts: &Counts,
    revision: u64,
) -> Result<bool, Error> {
    let body = wire::encode(Format::Json, counts)?;
    if revision == 0 {
        match meta.create(key(id), body).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(js_error(e)),
        }
    } else {
        match meta.update(key(id), body, revision).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
            Err(e) => Err(js_error(e)),
        }
    }
}

/// What a worker has finished but not yet written, by batch.
#[derive(Clone)]
pub struct Tally {
    /// Deltas by batch: at most what finished since the last successful
    /// write (results cannot be stored either while NATS is away).
    pending: Arc<Mutex<HashMap<String, Vec<Delta>>>>,
    wake: Arc<Notify>,
    failures: Arc<AtomicU64>,
}

/// Longest wait before a failed write is tried again.
const MAX_RETRY: Duration = Duration::from_secs(1);

impl Tally {
    pub fn new() -> Self {
        Tally {
            pending: Arc::new(Mutex::new(HashMap::new())),
            wake: Arc::new(Notify::new()),
            failures: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Counts a result this worker created; `revision` is what its
    /// create-if-absent returned.
    pub fn record(&self, id: &str, revision: u64, counts: Counts) {
        if let Ok(mut p) = self.pending.lock() {
            p.entry(id.to_string())
                .or_default()
                .push((revision, counts));
        }
        self.wake.notify_one();
    }

    /// Counter writes that failed so far (each is tried again).
    pub fn write_failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    fn is_empty(&self) -> bool {
        self.pending.lock().map_or(true, |p| p.is_empty())
    }

    /// Writes what is pending; what cannot be written is kept for the next
    /// time. Whether everything was written.
    pub async fn flush(&self, meta: &kv::Store) -> bool {
        let batch: Vec<(String, Vec<Delta>)> = match self.pending.lock() {
            Ok(mut p) => p.drain().collect(),
            Err(_) => return false,
        };
        let mut all = true;
        for (id, deltas) in batch {
            if let Err(e) = add(meta, &id, &deltas).await {
                all = false;
                self.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(batch = %id, error = %e, "cannot write batch counters; kept and retried");
                if let Ok(mut p) = self.pending.lock() {
                    p.entry(id).or_default().extend(deltas);
                }
            }
        }
        all
    }

    /// Writes the counters `every` after something was recorded, and tries
    /// a failed write again (backing off to [`MAX_RETRY`]) without waiting
    /// for the next record, until `stop`; then a last time.
    pub async fn run(self, meta: kv::Store, every: Duration, stop: CancellationToken) {
        let mut wait = every;
        loop {
            if self.is_empty() {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = self.wake.notified() => {}
                }
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = if self.flush(&meta).await {
                every
            } else {
                (wait * 2).clamp(every, MAX_RETRY)
            };
        }
        self.flush(&meta).await;
    }
}

impl Default for Tally {
    fn default() -> Self {
        Self::new()
    }
}
