//! The ledger's KV entries and the compare-and-set writes on them.

use std::collections::BTreeMap;
use std::time::Instant;

use async_nats::jetstream::kv;
use serde::{Deserialize, Serialize};

use optiroute_common::{Error, ErrorKind};

use super::{unavailable, LedgerInner, Limit, Slot, OP_TIMEOUT};
use crate::store::now_ms;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct BudgetEntry {
    pub used: u64,
    #[serde(default)]
    pub leases: BTreeMap<String, Lease>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub(super) struct Lease {
    pub amount: u64,
    pub exp_ms: u64,
    /// The holder's write that set it (see the module's note on unknown outcomes).
    #[serde(default)]
    pub seq: u64,
}

/// A rate bucket: `level` micro-tokens at `at_ms`, and the last writer's
/// holder and sequence number.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct RateEntry {
    pub level: u64,
    pub at_ms: u64,
    #[serde(default)]
    pub by: String,
    #[serde(default)]
    pub seq: u64,
}

pub(super) const MICRO: u128 = 1_000_000;
pub(super) const MINUTE_MS: u128 = 60_000;

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

pub(super) enum Take {
    Taken,
    /// The slot was closed meanwhile: ask again on a fresh one.
    Closed,
    Short {
        exhausted: bool,
        retry_after_ms: u64,
    },
}

/// Whether a stored value holds a given write (see [`LedgerInner::write`]).
type Applied = dyn Fn(&Option<bytes::Bytes>) -> bool + Send;

/// What became of a compare-and-set.
enum Written {
    Applied,
    /// Someone else changed the entry first: not applied.
    Conflict,
    /// No answer, and the entry read back does not hold it (yet): it may
    /// still land. The write is remembered ([`Unsure`]) and settled by the
    /// next read of the entry.
    Unknown(String),
}

/// A write whose outcome is unknown.
#[derive(Debug, Clone, Copy)]
pub(super) struct Unsure {
    seq: u64,
    /// The revision it was written against: once the entry has moved past
    /// it without this write, the write can never land.
    revision: u64,
    /// Settled spend the write moved to `used`.
    settled_moved: u64,
    effect: Effect,
    since: Instant,
}

#[derive(Debug, Clone, Copy)]
enum Effect {
    /// A budget lease set to this amount.
    Lease(u64),
    /// Rate tokens withdrawn.
    Tokens(u64),
    /// The lease given back (taken out of local use before the write).
    GaveBack(u64),
}

fn decode<T: for<'de> Deserialize<'de> + Default>(
    key: &str,
    v: &Option<bytes::Bytes>,
) -> Result<T, Error> {
    match v {
        Some(v) => serde_json::from_slice(v)
            .map_err(|err| Error::internal(format!("ledger entry {key}: {err}"))),
        None => Ok(T::default()),
    }
}

impl LedgerInner {
    async fn read(&self, key: &str) -> Result<(Option<bytes::Bytes>, u64), Error> {
        let kv = self.kv().await?;
        // A read may land on a replica still catching up after a node came
        // back ("no stream found"): tried again a few times (~0.75 s) before
        // it is an error.
        let mut delay = std::time::Duration::from_millis(50);
        let mut attempt = 0;
        let e = loop {
            attempt += 1;
            let got = tokio::time::timeout(OP_TIMEOUT, kv.entry(key))
                .await
                .map_err(|_| unavailable("read", "timed out"))
                .and_then(|r| r.map_err(|e| unavailable("read", e)));
            match got {
                Ok(e) => break e,
                Err(e) if attempt >= 5 || e.message.contains("timed out") => return Err(e),
                Err(_) => {
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
        };
        Ok(match e {
            Some(e) if e.operation == kv::Operation::Put => (Some(e.value), e.revision),
            Some(e) => (None, e.revision),
            None => (None, 0),
        })
    }

    /// Writes `value` if the entry is still at `revision` (0: absent).
    /// When the outcome is unknown (a timeout, a lost answer), the entry
    /// is read back and `applied` tells whether this write is in it.
    async fn write(
        &self,
        key: &str,
        value: Vec<u8>,
        revision: u64,
        applied: impl Fn(&Option<bytes::Bytes>) -> bool,
    ) -> Result<Written, Error> {
        let kv = self.kv().await?;
        let r = if revision == 0 {
            tokio::time::timeout(OP_TIMEOUT, kv.create(key, value.into()))
                .await
                .map_err(|_| "timed out".to_string())
                .and_then(|r| r.map(|_| ()).map_err(|e| e.to_string()))
        } else {
            tokio::time::timeout(OP_TIMEOUT, kv.update(key, value.into(), revision))
                .await
                .map_err(|_| "timed out".to_string())
                .and_then(|r| r.map(|_| ()).map_err(|e| e.to_string()))
        };
        match r {
            Ok(()) => Ok(Written::Applied),
            Err(e) if e.contains("wrong last sequence") || e.contains("already exists") => {
                Ok(Written::Conflict)
            }
            Err(e) => {
                // Unknown: read what the entry holds now.
                match self.read(key).await {
                    Ok((now, _)) if applied(&now) => Ok(Written::Applied),
                    _ => Ok(Written::Unknown(e)),
                }
            }
        }
    }

    /// Settles earlier writes of unknown outcome against the entry as read
    /// now (`value` at `revision`): applies the one that landed; forgets
    /// them once the entry has moved on without them. While the entry is
    /// still at their revision they stay pending, and the next write is
    /// made against that same revision: only one of them can land.
    fn reconcile(&self, slot: &Slot, limit: Limit, value: &Option<bytes::Bytes>, revision: u64) {
        let mut l = slot.local();
        if l.unsure.is_empty() {
            return;
        }
        let landed = l.unsure.iter().copied().find(|u| match limit {
            Limit::Budget { .. } => decode::<BudgetEntry>("", value)
                .is_ok_and(|e| e.leases.get(&self.holder).is_some_and(|x| x.seq == u.seq)),
            Limit::Rate { .. } => {
                decode::<RateEntry>("", value).is_ok_and(|e| e.by == self.holder && e.seq == u.seq)
            }
        });
        if let Some(u) = landed {
            l.settled -= u.settled_moved.min(l.settled);
            match u.effect {
                Effect::Lease(amount) => {
                    l.lease = amount;
                    l.valid_until = Some(u.since + self.settings.lease_ttl * 2 / 3);
                }
                Effect::Tokens(t) => l.lease += t,
                Effect::GaveBack(_) => {}
            }
        } else if l.unsure.iter().all(|u| u.revision != revision) {
            // The entry moved on without them: none landed. A budget's
            // lease taken out for a give-back comes back; a rate bucket is
            // rewritten whole by every writer, so whether a give-back
            // landed cannot be told: its tokens are not counted again.
            if limit.is_budget() {
                let back: u64 = l
                    .unsure
                    .iter()
                    .map(|u| match u.effect {
                        Effect::GaveBack(lease) => lease,
                        _ => 0,
                    })
                    .sum();
                l.lease += back;
            }
        } else {
            // Still undecided: pending, and the next write races them.
            return;
        }
        l.unsure.clear();
    }

    /// One CAS round: write back settled spend and take enough for `need`
    /// more (0: write back and renew only). Retries on a concurrent change.
    pub(super) async fn take(&self, slot: &Slot, need: u64) -> Result<Take, Error> {
        let _cas = slot.cas.lock().await;
        let limit = slot.limit();
        for _ in 0..64 {
            {
                let l = slot.local();
                if l.closed {
                    return Ok(Take::Closed);
                }
                if need > 0 && l.headroom(limit.is_budget()) >= need {
                    return Ok(Take::Taken);
                }
            }
            let (value, revision) = self.read(&slot.key).await?;
            self.reconcile(slot, limit, &value, revision);
            let (reserved, settled, lease, next_seq) = {
                let mut l = slot.local();
                l.seq += 1;
                (l.reserved, l.settled, l.lease, l.seq)
            };
            let now = now_ms();
            let cap = limit.capacity();
            match limit {
                Limit::Budget { .. } => {
                    let mut e: BudgetEntry = decode(&slot.key, &value)?;
                    // Leases of holders that stopped renewing come back.
                    e.leases.retain(|h, l| h == &self.holder || l.exp_ms > now);
                    let mine = e.leases.get(&self.holder).map_or(0, |l| l.amount);
                    let others: u64 = e
                        .leases
                        .iter()
                        .filter(|(h, _)| *h != &self.holder)
                        .map(|(_, l)| l.amount)
                        .sum();
                    // My lease after writing back: what I hold minus the
                    // settled spend that moves to `used` (a lease lost to
                    // expiry while alive counts as 0), no more than the
                    // capacity leaves (a lowered budget) beyond what is reserved.
                    let used = e.used + settled;
                    let room = cap.saturating_sub(used + others);
                    let base = mine
                        .min(lease)
                        .saturating_sub(settled)
                        .min(room.max(reserved));
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
                    if !ok && settled == 0 && mine == lease && base == mine {
                        // Nothing to write: the answer is no.
                        let exhausted = e.used + need > cap;
                        return Ok(Take::Short {
                            exhausted,
                            retry_after_ms: 0,
                        });
                    }
                    e.used = used;
                    let exp_ms = now + self.settings.lease_ttl.as_millis() as u64;
                    e.leases.insert(
                        self.holder.clone(),
                        Lease {
                            amount,
                            exp_ms,
                            seq: next_seq,
                        },
                    );
                    let body = serde_json::to_vec(&e)
                        .map_err(|err| Error::internal(format!("ledger entry: {err}")))?;
                    let started = Instant::now();
                    let holder = self.holder.clone();
                    let applied = move |v: &Option<bytes::Bytes>| {
                        decode::<BudgetEntry>("", v)
                            .is_ok_and(|e| e.leases.get(&holder).is_some_and(|l| l.seq == next_seq))
                    };
                    match self.write(&slot.key, body, revision, applied).await? {
                        Written::Conflict => continue,
                        Written::Applied => {}
                        Written::Unknown(e) => {
                            // The lease stays usable as it is: landed or
                            // not, KV holds at least what local state uses
                            // (the same headroom either way), and its
                            // validity is not extended.
                            let mut l = slot.local();
                            l.unsure.push(Unsure {
                                seq: next_seq,
                                revision,
                                settled_moved: settled,
                                effect: Effect::Lease(amount),
                                since: started,
                            });
                            return Err(unavailable("write", e));
                        }
                    }
                    {
                        let mut l = slot.local();
                        l.settled -= settled;
                        l.lease = amount;
                        l.valid_until = Some(started + self.settings.lease_ttl * 2 / 3);
                        // Written on their revision: those can never land now.
                        l.unsure.clear();
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
                    let e: RateEntry = decode(&slot.key, &value)?;
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
                        by: self.holder.clone(),
                        seq: next_seq,
                    };
                    let body = serde_json::to_vec(&next)
                        .map_err(|err| Error::internal(format!("ledger entry: {err}")))?;
                    let holder = self.holder.clone();
                    let applied = move |v: &Option<bytes::Bytes>| {
                        decode::<RateEntry>("", v)
                            .is_ok_and(|e| e.by == holder && e.seq == next_seq)
                    };
                    let tokens = u64::try_from(taken / MICRO).unwrap_or(0);
                    match self.write(&slot.key, body, revision, applied).await? {
                        Written::Conflict => continue,
                        Written::Applied => {}
                        Written::Unknown(e) => {
                            slot.local().unsure.push(Unsure {
                                seq: next_seq,
                                revision,
                                settled_moved: 0,
                                effect: Effect::Tokens(tokens),
                                since: Instant::now(),
                            });
                            return Err(unavailable("write", e));
                        }
                    }
                    let mut l = slot.local();
                    l.lease += tokens;
                    l.unsure.clear();
                    return Ok(Take::Taken);
                }
            }
        }
        Err(Error::new(
            ErrorKind::Overloaded,
            format!("budget entry {} is contended; retry", slot.key),
        ))
    }

    /// Gives back what this holder holds and does not use (budget: writes
    /// settled spend back too). Returns whether the slot holds nothing now.
    pub(super) async fn give_back(&self, slot: &Slot) -> Result<bool, Error> {
        let _cas = slot.cas.lock().await;
        let limit = slot.limit();
        for _ in 0..64 {
            // The lease leaves local use before the CAS: a request arriving
            // meanwhile takes its own (after this CAS) instead of reserving
            // against capacity on its way back.
            {
                let l = slot.local();
                if l.reserved > 0 {
                    return Ok(false);
                }
                if l.lease == 0 && l.settled == 0 && l.unsure.is_empty() {
                    return Ok(true);
                }
            }
            let (value, revision) = self.read(&slot.key).await?;
            self.reconcile(slot, limit, &value, revision);
            let (settled, lease, next_seq) = {
                let mut l = slot.local();
                if l.reserved > 0 {
                    return Ok(false);
                }
                if l.lease == 0 && l.settled == 0 {
                    return Ok(true);
                }
                l.seq += 1;
                let lease = std::mem::take(&mut l.lease);
                (l.settled, lease, l.seq)
            };
            let restore = |slot: &Slot| slot.local().lease += lease;
            let attempt = async {
                let now = now_ms();
                let holder = self.holder.clone();
                let (body, applied): (Vec<u8>, Box<Applied>) = match limit {
                    Limit::Budget { .. } => {
                        let mut e: BudgetEntry = decode(&slot.key, &value)?;
                        e.leases.retain(|h, l| h == &self.holder || l.exp_ms > now);
                        e.used += settled;
                        // A zero lease stays (until it expires) to carry
                        // the sequence number of this write.
                        e.leases.insert(
                            self.holder.clone(),
                            Lease {
                                amount: 0,
                                exp_ms: now + self.settings.lease_ttl.as_millis() as u64,
                                seq: next_seq,
                            },
                        );
                        let body = serde_json::to_vec(&e)
                            .map_err(|err| Error::internal(format!("ledger entry: {err}")))?;
                        let f = move |v: &Option<bytes::Bytes>| {
                            decode::<BudgetEntry>("", v).is_ok_and(|e| {
                                e.leases.get(&holder).is_some_and(|l| l.seq == next_seq)
                            })
                        };
                        (body, Box::new(f))
                    }
                    Limit::Rate { capacity } => {
                        let fresh = value.is_none();
                        let e: RateEntry = decode(&slot.key, &value)?;
                        let cap = u128::from(capacity) * MICRO;
                        let avail = e.available(capacity, now, fresh) + u128::from(lease) * MICRO;
                        let body = serde_json::to_vec(&RateEntry {
                            level: u64::try_from(avail.min(cap)).unwrap_or(u64::MAX),
                            at_ms: now,
                            by: self.holder.clone(),
                            seq: next_seq,
                        })
                        .map_err(|err| Error::internal(format!("ledger entry: {err}")))?;
                        let f = move |v: &Option<bytes::Bytes>| {
                            decode::<RateEntry>("", v)
                                .is_ok_and(|e| e.by == holder && e.seq == next_seq)
                        };
                        (body, Box::new(f))
                    }
                };
                self.write(&slot.key, body, revision, applied).await
            };
            match attempt.await {
                Ok(Written::Applied) => {}
                Ok(Written::Conflict) => {
                    restore(slot);
                    continue;
                }
                Ok(Written::Unknown(e)) => {
                    // The lease stays out of use until the outcome is known.
                    let mut l = slot.local();
                    l.valid_until = None;
                    l.unsure.push(Unsure {
                        seq: next_seq,
                        revision,
                        settled_moved: settled,
                        effect: Effect::GaveBack(lease),
                        since: Instant::now(),
                    });
                    return Err(unavailable("write", e));
                }
                Err(e) => {
                    restore(slot);
                    return Err(e);
                }
            }
            let mut l = slot.local();
            l.settled -= settled;
            l.valid_until = None;
            l.unsure.clear();
            // Settles that arrived meanwhile stay for the next round.
            return Ok(l.lease == 0 && l.settled == 0 && l.reserved == 0);
        }
        Ok(false)
    }
}
