//! Per-batch counters, so a status is two reads whatever the batch's size.
//!
//! Kept in the meta bucket under `<id>.n` (a batch id has no `.`), changed
//! by compare-and-set. A result is counted by whoever created it (the
//! create-if-absent arbitrates), so each line counts once. Workers add up
//! what they finish and write it every few milliseconds ([`Tally`]), one
//! write per batch instead of one per job. A worker that dies between
//! storing a result and writing its count leaves the counters short: the
//! status then recounts the results once (see `BatchClient::status`).

use std::collections::HashMap;
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
}

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

/// Adds `delta` to a batch's counters.
pub async fn add(meta: &kv::Store, id: &str, delta: Counts) -> Result<(), Error> {
    change(meta, id, |c| {
        c.add(&delta);
        c.verified = false;
    })
    .await
    .map(|_| ())
}

/// What a worker has finished but not yet written, by batch.
#[derive(Clone)]
pub struct Tally {
    pending: Arc<Mutex<HashMap<String, Counts>>>,
    wake: Arc<Notify>,
}

impl Tally {
    pub fn new() -> Self {
        Tally {
            pending: Arc::new(Mutex::new(HashMap::new())),
            wake: Arc::new(Notify::new()),
        }
    }

    pub fn record(&self, id: &str, delta: Counts) {
        if let Ok(mut p) = self.pending.lock() {
            p.entry(id.to_string()).or_default().add(&delta);
        }
        self.wake.notify_one();
    }

    /// Writes what is pending; what cannot be written is kept for the next time.
    pub async fn flush(&self, meta: &kv::Store) {
        let batch: Vec<(String, Counts)> = match self.pending.lock() {
            Ok(mut p) => p.drain().collect(),
            Err(_) => return,
        };
        for (id, delta) in batch {
            if let Err(e) = add(meta, &id, delta).await {
                tracing::warn!(batch = %id, error = %e, "cannot write batch counters; kept for later");
                if let Ok(mut p) = self.pending.lock() {
                    p.entry(id).or_default().add(&delta);
                }
            }
        }
    }

    /// Writes the counters every `every` while there is something to
    /// write, until `stop`; then a last time.
    pub async fn run(self, meta: kv::Store, every: Duration, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.wake.notified() => {}
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
            self.flush(&meta).await;
        }
        self.flush(&meta).await;
    }
}

impl Default for Tally {
    fn default() -> Self {
        Self::new()
    }
}
