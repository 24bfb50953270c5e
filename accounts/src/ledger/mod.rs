//! Budgets and rate limits shared by every replica, exact and mostly off
//! the request path.
//!
//! Each limit is one KV entry in the ledger bucket (`<prefix>-ledger`),
//! changed only with compare-and-set on its revision. A replica does not
//! ask KV for every request: it takes a **lease** (a chunk of capacity) and
//! reserves requests against it in memory, then settles each to what it
//! actually cost.
//!
//! - **Budgets** (`Limit::Budget`): the entry holds `used` (settled spend)
//!   and each holder's lease with an expiry. Invariant, kept by every CAS:
//!   `used + Σ leases ≤ capacity`, and each holder's reservations plus
//!   unflushed spend stay within its lease, so spend never passes the
//!   budget. A holder writes settled spend back within [`FLUSH_BATCH`],
//!   renews its lease every third of `lease_ttl` while it holds one, stops
//!   using a lease it could not renew before two thirds of the TTL passed,
//!   and gives unused capacity back after `lease_idle`; a dead holder's
//!   lease expires after `lease_ttl` and any CAS on the entry drops it. A
//!   request that does not fit waits (up to `budget_wait`) while capacity
//!   is held by reservations that may settle lower; it is refused at once
//!   when settled spend alone leaves no room.
//! - **Rate limits** (`Limit::Rate`): a token bucket per key (capacity =
//!   the per-minute limit, refilled continuously at limit/60 s). A lease
//!   withdraws tokens; unused ones go back after `lease_idle`. A dead
//!   holder's withdrawn tokens are simply gone (the bucket refills). A
//!   request that does not fit is refused at once with `Retry-After` =
//!   the time until the bucket holds enough.
//!
//! Every write carries the holder's next sequence number in its lease, so
//! a write whose outcome is unknown (a timeout) is read back: applied or
//! not, it is never applied twice.

mod entry;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use tokio::sync::{Notify, OnceCell};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use optiroute_common::{Error, ErrorKind};

use crate::store::now_ms;
use entry::Take;

/// What a ledger entry limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `capacity` for the whole window; the entry's key names the window,
    /// so a new period starts a new entry at its exact boundary.
    Budget { capacity: u64 },
    /// A bucket of `capacity` refilled at `capacity` per minute.
    Rate { capacity: u64 },
}

impl Limit {
    fn capacity(self) -> u64 {
        match self {
            Limit::Budget { capacity } | Limit::Rate { capacity } => capacity,
        }
    }

    fn is_budget(self) -> bool {
        matches!(self, Limit::Budget { .. })
    }
}

/// Timing of leases.
#[derive(Debug, Clone, Copy)]
pub struct LedgerSettings {
    pub lease_ttl: Duration,
    pub lease_idle: Duration,
    pub budget_wait: Duration,
    pub replicas: usize,
}

/// What this holder knows and holds of one entry.
#[derive(Debug, Default)]
struct Local {
    /// Capacity this holder holds: for a budget, its lease in the entry
    /// (reservations and settled-but-unflushed spend included); for a
    /// rate, tokens withdrawn and not yet consumed.
    lease: u64,
    reserved: u64,
    /// Budget only: settled spend not yet added to `used`.
    settled: u64,
    in_flight: u32,
    last_use: Option<Instant>,
    /// Budget only: the lease may be used until then (two thirds of its
    /// TTL after the write that set it began).
    valid_until: Option<Instant>,
    /// The sequence number of this holder's last write to the entry
    /// (taken when a write is made, so no two attempts share one).
    seq: u64,
    /// Writes whose outcome is not known yet, all made against the same
    /// revision (so at most one can land): settled at the next read.
    unsure: Vec<entry::Unsure>,
    closed: bool,
}

impl Local {
    /// Capacity free for one more reservation now.
    fn headroom(&self, budget: bool) -> u64 {
        if budget && self.valid_until.is_none_or(|t| Instant::now() >= t) {
            return 0;
        }
        self.lease.saturating_sub(self.reserved + self.settled)
    }
}

struct Slot {
    key: String,
    limit: Mutex<Limit>,
    local: Mutex<Local>,
    /// One CAS at a time per entry in this holder.
    cas: tokio::sync::Mutex<()>,
    /// Settles and returns: waiters look again.
    changed: Notify,
    /// Wakes the flusher.
    dirty: Notify,
}

impl Slot {
    fn local(&self) -> std::sync::MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn limit(&self) -> Limit {
        *self.limit.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Why a reservation was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Seconds until the limit may have room again (a window's end, or
    /// when the bucket refills); `None` when nothing but a change of the
    /// limit can help (a `total` budget).
    pub retry_after_secs: Option<u64>,
    /// Whether settled spend (or the bucket) alone leaves no room; else
    /// the capacity was held by requests in flight for longer than the
    /// caller would wait.
    pub exhausted: bool,
}

/// A request's hold on one entry, settled with [`Ledger::settle`] (a hold
/// dropped unsettled gives its reservation back).
pub struct Hold {
    slot: Arc<Slot>,
    need: u64,
    done: bool,
}

struct LedgerInner {
    kv: OnceCell<kv::Store>,
    js: jetstream::Context,
    bucket: String,
    holder: String,
    settings: LedgerSettings,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    /// Stops the flushers (after they gave everything back): [`Ledger::close`].
    stop: CancellationToken,
    flushers: TaskTracker,
}

/// Budgets and rate limits of one process.
#[derive(Clone)]
pub struct Ledger {
    inner: Arc<LedgerInner>,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::NatsUnavailable,
        format!("budget ledger: {what}: {e}"),
    )
}

const OP_TIMEOUT: Duration = Duration::from_secs(3);

/// Pause before a request tries the ledger again after JetStream failed.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// How long settled spend waits to be written back with the settles that
/// follow it: one KV write per entry and router at most this often.
pub const FLUSH_BATCH: Duration = Duration::from_millis(20);

impl Ledger {
    pub fn new(js: jetstream::Context, bucket: String, settings: LedgerSettings) -> Self {
        Ledger {
            inner: Arc::new(LedgerInner {
                kv: OnceCell::new(),
                js,
                bucket,
                holder: format!("h{}", nuid::next()),
                settings,
                slots: Mutex::new(HashMap::new()),
                stop: CancellationToken::new(),
                flushers: TaskTracker::new(),
            }),
        }
    }

    /// This process's holder id (its name in lease entries).
    pub fn holder(&self) -> &str {
        &self.inner.holder
    }

    /// Writes back every settled spend and gives every lease back, within
    /// `limit`: call it once the requests in flight are done (a drained
    /// service), so nothing they settled is lost.
    pub async fn close(&self, limit: Duration) {
        self.inner.stop.cancel();
        self.inner.flushers.close();
        if tokio::time::timeout(limit, self.inner.flushers.wait())
            .await
            .is_err()
        {
            tracing::warn!("ledger close timed out; unflushed leases expire on their own");
        }
    }

    /// Ends the flushers without giving anything back, as a killed process
    /// would (tests of lease expiry).
    pub fn abandon(&self) {
        let slots = self.inner.slots.lock().unwrap_or_else(|p| p.into_inner());
        for s in slots.values() {
            s.local().closed = true;
            s.dirty.notify_one();
        }
    }

    /// Reserves `need` of the entry `key` under `limit`. A budget waits for
    /// capacity held by requests in flight up to `auth.budget_wait`; a rate
    /// limit answers at once. Nothing waits past `deadline` (then 504).
    pub async fn reserve(
        &self,
        key: &str,
        limit: Limit,
        need: u64,
        window_end_ms: Option<u64>,
        deadline: Instant,
    ) -> Result<Result<Hold, Refusal>, Error> {
        let inner = &self.inner;
        let give_up = match limit {
            Limit::Budget { .. } => deadline.min(Instant::now() + inner.settings.budget_wait),
            Limit::Rate { .. } => Instant::now(),
        };
        let mut slot = inner.slot(key, limit);
        loop {
            {
                let mut l = slot.local();
                if l.closed {
                    drop(l);
                    // Its flusher ended: a fresh one.
                    slot = inner.slot(key, limit);
                    continue;
                }
                if l.headroom(limit.is_budget()) >= need {
                    l.reserved += need;
                    l.in_flight += 1;
                    l.last_use = Some(Instant::now());
                    return Ok(Ok(Hold {
                        slot: slot.clone(),
                        need,
                        done: false,
                    }));
                }
            }
            let changed = slot.changed.notified();
            // The write runs to its end in its own task: a caller that gives
            // up at its deadline must not cut it between the KV answer and
            // the local update.
            let write = {
                let (inner, slot) = (inner.clone(), slot.clone());
                tokio::spawn(async move { inner.take(&slot, need).await })
            };
            let taken = match tokio::time::timeout_at(deadline.into(), write).await {
                // JetStream away for a moment (a leader election): wait for
                // it within the request's deadline rather than fail now.
                Ok(Ok(Err(e)))
                    if e.kind == ErrorKind::NatsUnavailable
                        && Instant::now() + RETRY_PAUSE < deadline =>
                {
                    tracing::debug!(entry = %slot.key, error = %e, "ledger unavailable; retrying");
                    tokio::time::sleep(RETRY_PAUSE).await;
                    continue;
                }
                Ok(Ok(r)) => r?,
                Ok(Err(e)) => return Err(Error::internal(format!("ledger write task: {e}"))),
                Err(_) => {
                    return Err(Error::new(
                        ErrorKind::Timeout,
                        "deadline passed waiting for the budget ledger",
                    ))
                }
            };
            match taken {
                Take::Taken | Take::Closed => continue,
                Take::Short {
                    exhausted,
                    retry_after_ms,
                } => {
                    let now = Instant::now();
                    if exhausted || now >= give_up {
                        let retry_after_secs = match (limit, window_end_ms) {
                            (Limit::Rate { .. }, _) => Some(retry_after_ms.div_ceil(1000).max(1)),
                            (Limit::Budget { .. }, Some(end)) if exhausted => {
                                Some(end.saturating_sub(now_ms()).div_ceil(1000).max(1))
                            }
                            (Limit::Budget { .. }, None) if exhausted => None,
                            _ => Some(1),
                        };
                        return Ok(Err(Refusal {
                            retry_after_secs,
                            exhausted,
                        }));
                    }
                    let wait = (give_up - now).min(Duration::from_millis(25));
                    let _ = tokio::time::timeout(wait, changed).await;
                }
            }
        }
    }

    /// Settles a hold to what the request actually used (0 when it was
    /// not charged: a failure, a cache hit).
    pub fn settle(&self, mut hold: Hold, actual: u64) {
        hold.finish(actual);
    }
}

impl Hold {
    fn finish(&mut self, actual: u64) {
        if self.done {
            return;
        }
        self.done = true;
        let budget = self.slot.limit().is_budget();
        {
            let mut l = self.slot.local();
            l.reserved = l.reserved.saturating_sub(self.need);
            l.in_flight = l.in_flight.saturating_sub(1);
            l.last_use = Some(Instant::now());
            if budget {
                l.settled += actual;
            } else {
                l.lease = l.lease.saturating_sub(actual);
            }
        }
        self.slot.changed.notify_waiters();
        if budget {
            // Settled spend to write back; a rate limit has nothing to write.
            self.slot.dirty.notify_one();
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        // Dropped unsettled (the request failed before it was charged).
        self.finish(0);
    }
}

impl LedgerInner {
    async fn kv(&self) -> Result<&kv::Store, Error> {
        self.kv
            .get_or_try_init(|| async {
                let r = tokio::time::timeout(OP_TIMEOUT, self.js.get_key_value(&self.bucket)).await;
                if let Ok(Ok(kv)) = r {
                    return Ok(kv);
                }
                let config = kv::Config {
                    bucket: self.bucket.clone(),
                    description: "OptiRoute budget and rate-limit counters".into(),
                    history: 1,
                    num_replicas: self.settings.replicas,
                    ..Default::default()
                };
                tokio::time::timeout(OP_TIMEOUT, self.js.create_key_value(config))
                    .await
                    .map_err(|_| unavailable("open", "timed out"))?
                    .map_err(|e| unavailable("open", e))
            })
            .await
    }

    fn slot(self: &Arc<Self>, key: &str, limit: Limit) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = slots.get(key) {
            let mut l = s.local();
            if !l.closed {
                let mut current = s.limit.lock().unwrap_or_else(|p| p.into_inner());
                if limit.capacity() < current.capacity() {
                    // A lowered limit: no more reservations against what
                    // was taken under the old one; the next take trims it.
                    l.lease = l.lease.min(l.reserved + l.settled);
                }
                *current = limit;
                drop(current);
                drop(l);
                return s.clone();
            }
        }
        let slot = Arc::new(Slot {
            key: key.to_string(),
            limit: Mutex::new(limit),
            local: Mutex::new(Local::default()),
            cas: tokio::sync::Mutex::new(()),
            changed: Notify::new(),
            dirty: Notify::new(),
        });
        slots.insert(key.to_string(), slot.clone());
        if !self.stop.is_cancelled() {
            let me = self.clone();
            let s = slot.clone();
            self.flushers.spawn(async move { me.flusher(s).await });
        }
        slot
    }

    /// Per entry, in the background: writes settled spend back within
    /// [`FLUSH_BATCH`], renews a budget lease every third of its TTL while
    /// it holds one, gives unused capacity back when idle, and drops the
    /// slot once it holds nothing. On [`Ledger::close`] it gives back all
    /// it can, then ends.
    async fn flusher(self: Arc<Self>, slot: Arc<Slot>) {
        let s = self.settings;
        let renew = s.lease_ttl / 3;
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => {
                    // The service drained: write everything back. Holds
                    // still open (a drain that timed out) keep their lease;
                    // what settled is written back meanwhile.
                    for _ in 0..40 {
                        if matches!(self.give_back(&slot).await, Ok(true)) {
                            break;
                        }
                        if slot.local().settled > 0 && slot.limit().is_budget() {
                            let _ = self.take(&slot, 0).await;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    return;
                }
                _ = slot.dirty.notified() => {
                    // Settles that come meanwhile go in the same write.
                    tokio::time::sleep(FLUSH_BATCH).await;
                }
                _ = tokio::time::sleep(s.lease_idle.min(renew)) => {}
            }
            let limit = slot.limit();
            let (settled, in_flight, idle, lease, renew_due, closed) = {
                let l = slot.local();
                (
                    l.settled,
                    l.in_flight,
                    l.last_use.is_none_or(|t| t.elapsed() >= s.lease_idle),
                    l.lease,
                    l.valid_until
                        .is_none_or(|t| t.saturating_duration_since(Instant::now()) < renew),
                    l.closed,
                )
            };
            if closed {
                // Abandoned (a test's "kill"): nothing more is written.
                return;
            }
            let result = if in_flight == 0 && idle {
                match self.give_back(&slot).await {
                    Ok(true) => {
                        // Holds nothing: drop it, unless a request came meanwhile.
                        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
                        let mut l = slot.local();
                        if l.reserved == 0 && l.lease == 0 && l.settled == 0 {
                            l.closed = true;
                            if slots.get(&slot.key).is_some_and(|x| Arc::ptr_eq(x, &slot)) {
                                slots.remove(&slot.key);
                            }
                            return;
                        }
                        Ok(())
                    }
                    Ok(false) => Ok(()),
                    Err(e) => Err(e),
                }
            } else if limit.is_budget() && (settled > 0 || (lease > 0 && renew_due)) {
                self.take(&slot, 0).await.map(|_| ())
            } else {
                Ok(())
            };
            if let Err(e) = result {
                tracing::warn!(entry = %slot.key, error = %e, "ledger write-back failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                slot.dirty.notify_one();
            }
        }
    }
}
