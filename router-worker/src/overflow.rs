//! Load-aware routing: a prompt routed to the local pool goes to the cloud
//! when the local pool could not start it within
//! `router.routing.local_max_wait_ms`. The router reads the pool's load
//! from every local replica's `$SRV.STATS` (requests being served, how
//! many each serves at once, mean service time) every 250 ms, and counts
//! its own requests waiting on the pool.
//!
//! Expected wait of one more request, with `c` slots in the pool, `d`
//! requests in it or waiting for it (this router's, counted as it routes
//! them, plus the other routers' that the replicas reported serving) and a
//! mean service time `s`:
//! `max(0, d + 1 − c) ÷ c × s`. Another router's requests waiting in the
//! NATS queue are invisible here, so with several routers the estimate is
//! low by their share of the queue.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::Client;
use futures::StreamExt;
use optiroute_common::protocol::{Discovery, CAPACITY_FIELD, IN_FLIGHT_FIELD};
use tokio_util::sync::CancellationToken;

/// How often the pool's stats are read, and how long replies are awaited.
const POLL: Duration = Duration::from_millis(250);
const GATHER: Duration = Duration::from_millis(100);
/// Stats older than this are not trusted (the pool may have changed).
const STALE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, Default)]
struct Snapshot {
    capacity: usize,
    in_flight: usize,
    /// This router's own requests in the pool when the stats were read:
    /// the rest of `in_flight` is other routers'.
    own: usize,
    /// Mean seconds per request, when any was served.
    service_secs: Option<f64>,
    at: Option<Instant>,
}

/// The local pool's load as this router sees it.
pub struct LocalLoad {
    max_wait: Duration,
    outstanding: AtomicUsize,
    snapshot: Mutex<Snapshot>,
    /// This router's own mean local service time (a fallback before the
    /// pool reports one).
    own_secs: Mutex<Option<f64>>,
}

/// Counts one request in the local pool while it lives.
pub struct InPool<'a> {
    load: &'a LocalLoad,
    started: Instant,
    /// Whether the local pool answered (its time then feeds the estimate).
    pub served: bool,
}

impl Drop for InPool<'_> {
    fn drop(&mut self) {
        self.load.outstanding.fetch_sub(1, Ordering::AcqRel);
        if !self.served || !self.load.enabled() {
            return;
        }
        let took = self.started.elapsed().as_secs_f64();
        let mut own = self.load.own_secs.lock().unwrap_or_else(|p| p.into_inner());
        *own = Some(own.map_or(took, |m| 0.8 * m + 0.2 * took));
    }
}

impl LocalLoad {
    /// Starts reading the local pool's stats (only when overflow is on).
    pub fn start(
        client: &Client,
        local_service: &str,
        max_wait_ms: u64,
        shutdown: &CancellationToken,
    ) -> Arc<Self> {
        let load = Arc::new(LocalLoad {
            max_wait: Duration::from_millis(max_wait_ms),
            outstanding: AtomicUsize::new(0),
            snapshot: Mutex::new(Snapshot::default()),
            own_secs: Mutex::new(None),
        });
        if max_wait_ms > 0 {
            let l = load.clone();
            let subject = Discovery::Stats.subject(local_service);
            let (client, shutdown) = (client.clone(), shutdown.clone());
            tokio::spawn(async move {
                loop {
                    let own = l.outstanding.load(Ordering::Acquire);
                    if let Some(mut s) = read_stats(&client, &subject).await {
                        s.own = own.min(s.in_flight);
                        *l.snapshot.lock().unwrap_or_else(|p| p.into_inner()) = s;
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(POLL) => {}
                    }
                }
            });
        }
        load
    }

    pub fn enabled(&self) -> bool {
        !self.max_wait.is_zero()
    }

    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }

    /// Counts one more request for the local pool, unless the pool could
    /// not start it within the objective (`check`): then `Err` with the
    /// expected wait (`None` when the pool is full and its service time is
    /// not known yet). Counting at the decision, not at the call, lets a
    /// burst of decisions see each other.
    pub fn claim(&self, check: bool) -> Result<InPool<'_>, Option<Duration>> {
        let before = self.outstanding.fetch_add(1, Ordering::AcqRel);
        let slot = InPool {
            load: self,
            started: Instant::now(),
            served: false,
        };
        if !check || !self.enabled() {
            return Ok(slot);
        }
        let s = *self.snapshot.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = s.at.is_some_and(|t| t.elapsed() < STALE);
        if !fresh || s.capacity == 0 {
            return Ok(slot);
        }
        // This router's requests as it counts them now, and the other
        // routers' as the replicas last reported them.
        let demand = before + s.in_flight.saturating_sub(s.own);
        let ahead = (demand + 1).saturating_sub(s.capacity);
        if ahead == 0 {
            return Ok(slot);
        }
        let service = s
            .service_secs
            .or(*self.own_secs.lock().unwrap_or_else(|p| p.into_inner()));
        let Some(service) = service else {
            // Full, and no idea how long it takes: the objective cannot be promised.
            drop(slot);
            return Err(None);
        };
        let wait = Duration::from_secs_f64(ahead as f64 / s.capacity as f64 * service);
        if wait > self.max_wait {
            drop(slot);
            return Err(Some(wait));
        }
        Ok(slot)
    }
}

/// Sums every local replica's answer to one `$SRV.STATS` request.
async fn read_stats(client: &Client, subject: &str) -> Option<Snapshot> {
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await.ok()?;
    client
        .publish_with_reply(subject.to_string(), inbox, bytes::Bytes::new())
        .await
        .ok()?;
    let mut snap = Snapshot::default();
    let (mut served, mut busy) = (0u64, 0.0f64);
    let until = tokio::time::Instant::now() + GATHER;
    while let Ok(Some(msg)) = tokio::time::timeout_at(until, sub.next()).await {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&msg.payload) else {
            continue;
        };
        for e in v["endpoints"].as_array().into_iter().flatten() {
            let data = &e["data"];
            snap.capacity += data[CAPACITY_FIELD].as_u64().unwrap_or(0) as usize;
            snap.in_flight += data[IN_FLIGHT_FIELD].as_u64().unwrap_or(0) as usize;
            let n = e["num_requests"].as_u64().unwrap_or(0);
            let avg_ns = e["average_processing_time"].as_u64().unwrap_or(0);
            served += n;
            busy += n as f64 * avg_ns as f64 / 1e9;
        }
    }
    let _ = sub.unsubscribe().await;
    snap.service_secs = (served > 0).then(|| busy / served as f64);
    snap.at = Some(Instant::now());
    Some(snap)
}
