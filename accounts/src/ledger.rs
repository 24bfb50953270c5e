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
//!   budget. A holder flushes settled spend right after each settle,
//!   renews its lease while it has requests in flight, and gives unused
//!   capacity back after `lease_idle`; a dead holder's lease expires after
//!   `lease_ttl` and any CAS on the entry drops it. A request that does not
//!   fit waits (up to `budget_wait`) while capacity is held by reservations
//!   that may settle lower; it is refused at once when settled spend alone
//!   leaves no room.
//! - **Rate limits** (`Limit::Rate`): a token bucket per key (capacity =
//!   the per-minute limit, refilled continuously at limit/60 s). A lease
//!   withdraws tokens; unused ones go back after `lease_idle`. A dead
//!   holder's withdrawn tokens are simply gone (the bucket refills). A
//!   request that does not fit is refused at once with `Retry-After` =
//!   the time until the bucket holds enough.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, OnceCell};
use tokio_util::sync::CancellationToken;

use optiroute_common::{Error, ErrorKind};

use crate::store::now_ms;

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
}

/// Timing of leases.
#[derive(Debug, Clone, Copy)]
pub struct LedgerSettings {
    pub lease_ttl: Duration,
    pub lease_idle: Duration,
    pub budget_wait: Duration,
    pub replicas: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct BudgetEntry {
    used: u64,
    #[serde(default)]
    leases: BTreeMap<String, Lease>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct Lease {
    amount: u64,
    exp_ms: u64,
}

/// A rate bucket: `level` micro-tokens at `at_ms`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct RateEntry {
    level: u64,
    at_ms: u64,
}

const MICRO: u128 = 1_000_000;
const MINUTE_MS: u128 = 60_000;

impl RateEntry {
    /// Micro-tokens available at `now_ms` (a missing entry is a full bucket).
    fn available(&self, capacity: u64, now_ms: u64, fresh: bool) -> u128 {
        let cap = u128::from(capacity) * MICRO;
        if fresh {
            return cap;
        }
        let elapsed = u128::from(now_ms.saturating_sub(self.at_ms));
        (u128::from(self.level) + elapsed * cap / MINUTE_MS).min(cap)
    }
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
    closed: bool,
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
    shutdown: CancellationToken,
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

/// How long settled spend waits to be written back with the settles that
/// follow it: one KV write per entry and router at most this often.
pub const FLUSH_BATCH: Duration = Duration::from_millis(20);

impl Ledger {
    pub fn new(
        js: jetstream::Context,
        bucket: String,
        settings: LedgerSettings,
        shutdown: CancellationToken,
    ) -> Self {
        Ledger {
            inner: Arc::new(LedgerInner {
                kv: OnceCell::new(),
                js,
                bucket,
                holder: format!("h{}", nuid::next()),
                settings,
                slots: Mutex::new(HashMap::new()),
                shutdown,
            }),
        }
    }

    /// This process's holder id (its name in lease entries).
    pub fn holder(&self) -> &str {
        &self.inner.holder
    }

    /// Reserves `need` of the entry `key` under `limit`, waiting for
    /// capacity held by requests in flight until `give_up` at the latest.
    pub async fn reserve(
        &self,
        key: &str,
        limit: Limit,
        need: u64,
        window_end_ms: Option<u64>,
        give_up: Instant,
    ) -> Result<Result<Hold, Refusal>, Error> {
        let inner = &self.inner;
        let give_up = match limit {
            Limit::Budget { .. } => give_up.min(Instant::now() + inner.settings.budget_wait),
            // A rate limit answers at once.
            Limit::Rate { .. } => Instant::now(),
        };
        let mut slot = inner.slot(key, limit);
        loop {
            if slot.local().closed {
                // Its flusher ended: a fresh one.
                slot = inner.slot(key, limit);
                continue;
            }
            {
                let mut l = slot.local();
                if l.lease.saturating_sub(l.reserved + l.settled) >= need {
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
            match inner.take(&slot, need).await? {
                Take::Taken => continue,
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
        let budget = matches!(
            *self.slot.limit.lock().unwrap_or_else(|p| p.into_inner()),
            Limit::Budget { .. }
        );
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

enum Take {
    Taken,
    Short {
        exhausted: bool,
        retry_after_ms: u64,
    },
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
            if !s.local().closed {
                *s.limit.lock().unwrap_or_else(|p| p.into_inner()) = limit;
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
        let me = self.clone();
        let s = slot.clone();
        tokio::spawn(async move { me.flusher(s).await });
        slot
    }

    async fn read(&self, key: &str) -> Result<(Option<bytes::Bytes>, u64), Error> {
        let kv = self.kv().await?;
        let e = tokio::time::timeout(OP_TIMEOUT, kv.entry(key))
            .await
            .map_err(|_| unavailable("read", "timed out"))?
            .map_err(|e| unavailable("read", e))?;
        Ok(match e {
            Some(e) if e.operation == kv::Operation::Put => (Some(e.value), e.revision),
            Some(e) => (None, e.revision),
            None => (None, 0),
        })
    }

    /// Writes `value` if the entry is still at `revision` (0: absent).
    /// `Ok(false)`: someone else changed it first.
    async fn write(&self, key: &str, value: Vec<u8>, revision: u64) -> Result<bool, Error> {
        let kv = self.kv().await?;
        let r = if revision == 0 {
            tokio::time::timeout(OP_TIMEOUT, kv.create(key, value.into()))
                .await
                .map_err(|_| unavailable("write", "timed out"))?
                .map(|_| ())
                .map_err(|e| e.to_string())
        } else {
            tokio::time::timeout(OP_TIMEOUT, kv.update(key, value.into(), revision))
                .await
                .map_err(|_| unavailable("write", "timed out"))?
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        match r {
            Ok(()) => Ok(true),
            Err(e) if e.contains("wrong last sequence") || e.contains("already exists") => {
                Ok(false)
            }
            Err(e) => Err(unavailable("write", e)),
        }
    }

    /// One CAS round: flush settled spend and take enough for `need` more
    /// (0: flush only). Retries on a concurrent change.
    async fn take(&self, slot: &Slot, need: u64) -> Result<Take, Error> {
        let _cas = slot.cas.lock().await;
        let limit = *slot.limit.lock().unwrap_or_else(|p| p.into_inner());
        for _ in 0..64 {
            let (reserved, settled, lease) = {
                let l = slot.local();
                (l.reserved, l.settled, l.lease)
            };
            if need > 0 && lease.saturating_sub(reserved + settled) >= need {
                return Ok(Take::Taken);
            }
            let (value, revision) = self.read(&slot.key).await?;
            let now = now_ms();
            let cap = limit.capacity();
            match limit {
                Limit::Budget { .. } => {
                    let mut e: BudgetEntry = match &value {
                        Some(v) => serde_json::from_slice(v).map_err(|err| {
                            Error::internal(format!("ledger entry {}: {err}", slot.key))
                        })?,
                        None => BudgetEntry::default(),
                    };
                    // Leases of holders that stopped renewing come back.
                    e.leases.retain(|h, l| h == &self.holder || l.exp_ms > now);
                    let mine = e.leases.get(&self.holder).map_or(0, |l| l.amount);
                    let others: u64 = e
                        .leases
                        .iter()
                        .filter(|(h, _)| *h != &self.holder)
                        .map(|(_, l)| l.amount)
                        .sum();
                    // My lease after flushing: what I hold minus the settled
                    // spend that moves to `used` (a lease lost to expiry
                    // while alive counts as 0).
                    let base = mine.min(lease).saturating_sub(settled);
                    let used = e.used + settled;
                    let free = cap.saturating_sub(used + others + base);
                    let want = (reserved + need).saturating_sub(base);
                    let (extra, ok) = if need == 0 || want == 0 {
                        (0, true)
                    } else if want <= free {
                        // A chunk more while the budget is far from spent.
                        let chunk = if free - want > cap / 4 { cap / 32 } else { 0 };
                        (want + chunk.min(free - want), true)
                    } else {
                        (0, false)
                    };
                    let amount = base + extra;
                    e.used = used;
                    if amount > 0 || reserved > 0 {
                        e.leases.insert(
                            self.holder.clone(),
                            Lease {
                                amount,
                                exp_ms: now + self.settings.lease_ttl.as_millis() as u64,
                            },
                        );
                    } else {
                        e.leases.remove(&self.holder);
                    }
                    if !ok && settled == 0 && mine == lease {
                        // Nothing to write: the answer is no.
                        let exhausted = e.used + need > cap;
                        return Ok(Take::Short {
                            exhausted,
                            retry_after_ms: 0,
                        });
                    }
                    let body = serde_json::to_vec(&e)
                        .map_err(|err| Error::internal(format!("ledger entry: {err}")))?;
                    if !self.write(&slot.key, body, revision).await? {
                        continue;
                    }
                    {
                        let mut l = slot.local();
                        l.settled -= settled;
                        l.lease = amount;
                    }
                    slot.changed.notify_waiters();
                    if ok {
                        return Ok(Take::Taken);
                    }
                    let exhausted = e.used + need > cap;
                    return Ok(Take::Short {
                        exhausted,
                        retry_after_ms: 0,
                    });
                }
                Limit::Rate { .. } => {
                    let fresh = value.is_none();
                    let e: RateEntry = match &value {
                        Some(v) => serde_json::from_slice(v).map_err(|err| {
                            Error::internal(format!("ledger entry {}: {err}", slot.key))
                        })?,
                        None => RateEntry::default(),
                    };
                    let avail = e.available(cap, now, fresh);
                    let want = u128::from((reserved + need).saturating_sub(lease)) * MICRO;
                    if want > avail {
                        let missing = want - avail;
                        let per_ms = (u128::from(cap) * MICRO).div_ceil(MINUTE_MS).max(1);
                        let retry_after_ms =
                            u64::try_from(missing.div_ceil(per_ms)).unwrap_or(u64::MAX);
                        return Ok(Take::Short {
                            exhausted: true,
                            retry_after_ms,
                        });
                    }
                    let spare = (avail - want) / MICRO;
                    let chunk = if spare > u128::from(cap / 2) {
                        u128::from(cap / 16)
                    } else {
                        0
                    };
                    let taken = want + chunk * MICRO;
                    let next = RateEntry {
                        level: u64::try_from(avail - taken).unwrap_or(u64::MAX),
                        at_ms: now,
                    };
                    let body = serde_json::to_vec(&next)
                        .map_err(|err| Error::internal(format!("ledger entry: {err}")))?;
                    if !self.write(&slot.key, body, revision).await? {
                        continue;
                    }
                    slot.local().lease += u64::try_from(taken / MICRO).unwrap_or(0);
                    return Ok(Take::Taken);
                }
            }
        }
        Err(Error::new(
            ErrorKind::Overloaded,
            format!("budget entry {} is contended; retry", slot.key),
        ))
    }

    /// Gives back what this holder holds and does not use (budget: flushes
    /// settled spend too). Returns whether the slot holds nothing now.
    async fn give_back(&self, slot: &Slot) -> Result<bool, Error> {
        let _cas = slot.cas.lock().await;
        let limit = *slot.limit.lock().unwrap_or_else(|p| p.into_inner());
        for _ in 0..64 {
            // The lease leaves local use before the CAS: a request arriving
            // meanwhile takes its own (after this CAS) instead of reserving
            // against capacity on its way back.
            let (settled, lease) = {
                let mut l = slot.local();
                if l.reserved > 0 {
                    return Ok(false);
                }
                if l.lease == 0 && l.settled == 0 {
                    return Ok(true);
                }
                let lease = std::mem::take(&mut l.lease);
                (l.settled, lease)
            };
            let restore = |slot: &Slot| slot.local().lease += lease;
            let (value, revision) = match self.read(&slot.key).await {
                Ok(v) => v,
                Err(e) => {
                    restore(slot);
                    return Err(e);
                }
            };
            let now = now_ms();
            let body = match limit {
                Limit::Budget { .. } => {
                    let mut e: BudgetEntry = match &value {
                        Some(v) => serde_json::from_slice(v).map_err(|err| {
                            Error::internal(format!("ledger entry {}: {err}", slot.key))
                        })?,
                        None => BudgetEntry::default(),
                    };
                    e.leases.retain(|h, l| h != &self.holder && l.exp_ms > now);
                    e.used += settled;
                    serde_json::to_vec(&e)
                }
                Limit::Rate { capacity } => {
                    let fresh = value.is_none();
                    let e: RateEntry = match &value {
                        Some(v) => serde_json::from_slice(v).map_err(|err| {
                            Error::internal(format!("ledger entry {}: {err}", slot.key))
                        })?,
                        None => RateEntry::default(),
                    };
                    let avail = e.available(capacity, now, fresh) + u128::from(lease) * MICRO;
                    let cap = u128::from(capacity) * MICRO;
                    serde_json::to_vec(&RateEntry {
                        level: u64::try_from(avail.min(cap)).unwrap_or(u64::MAX),
                        at_ms: now,
                    })
                }
            }
            .map_err(|err| Error::internal(format!("ledger entry: {err}")));
            let written = match body {
                Ok(body) => self.write(&slot.key, body, revision).await,
                Err(e) => Err(e),
            };
            match written {
                Ok(true) => {}
                Ok(false) => {
                    restore(slot);
                    continue;
                }
                Err(e) => {
                    restore(slot);
                    return Err(e);
                }
            }
            let mut l = slot.local();
            l.settled -= settled;
            // Settles that arrived meanwhile stay for the next round.
            return Ok(l.lease == 0 && l.settled == 0 && l.reserved == 0);
        }
        Ok(false)
    }

    /// Per entry, in the background: flushes settled spend as soon as it
    /// settles, renews the lease while requests are in flight, gives unused
    /// capacity back when idle, and drops the slot once it holds nothing.
    async fn flusher(self: Arc<Self>, slot: Arc<Slot>) {
        let s = self.settings;
        let renew = s.lease_ttl / 3;
        let mut last_renew = Instant::now();
        loop {
            let woke = tokio::select! {
                _ = self.shutdown.cancelled() => {
                    let _ = self.give_back(&slot).await;
                    return;
                }
                _ = slot.dirty.notified() => {
                    // Settles that come meanwhile go in the same write.
                    tokio::time::sleep(FLUSH_BATCH).await;
                    true
                }
                _ = tokio::time::sleep(s.lease_idle.min(renew)) => false,
            };
            let budget = matches!(
                *slot.limit.lock().unwrap_or_else(|p| p.into_inner()),
                Limit::Budget { .. }
            );
            let (settled, in_flight, idle) = {
                let l = slot.local();
                (
                    l.settled,
                    l.in_flight,
                    l.last_use.is_none_or(|t| t.elapsed() >= s.lease_idle),
                )
            };
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
            } else if budget && (settled > 0 || (in_flight > 0 && last_renew.elapsed() >= renew)) {
                last_renew = Instant::now();
                self.take(&slot, 0).await.map(|_| ())
            } else {
                Ok(())
            };
            if let Err(e) = result {
                tracing::warn!(entry = %slot.key, error = %e, "ledger flush failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                slot.dirty.notify_one();
            }
            let _ = woke;
        }
    }
}
