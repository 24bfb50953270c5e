//! Liveness of the replicas that serve requests. A serving process
//! publishes a heartbeat every [`HEARTBEAT`] on its role's alive subject
//! (`<prefix>.alive.<role>`) with its id, how many requests it holds
//! against how many it serves at once, and their ids ([`InFlight`],
//! [`spawn_heartbeat`]); a requester follows them ([`Watcher`]) and, when
//! a replica's heartbeat stops for [`DEAD_AFTER`], fails with 503 the
//! requests that replica claimed, and those sent before it stopped that no
//! replica claims while every live one has room (so none can be waiting
//! in a live replica's queue), instead of waiting out their deadlines. A
//! request is never retried here: the dead replica may have had it
//! answered, and paid for, upstream.
//!
//! A replica keeps beating while it drains at shutdown (its heartbeat ends
//! after its service stopped), so a clean stop is not taken for a death.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::Client;
use futures::StreamExt;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// How often a replica says it is alive.
pub const HEARTBEAT: Duration = Duration::from_millis(250);
/// Silence after which a replica is taken for dead (six missed
/// heartbeats; above a reconnect to another NATS node).
pub const DEAD_AFTER: Duration = Duration::from_millis(1_500);
/// A request no live replica claims this long after it was sent is not
/// being served by one that has room.
const UNCLAIMED: Duration = Duration::from_millis(600);
const TICK: Duration = Duration::from_millis(100);
/// Ids listed in one heartbeat at most, and the longest listed; a replica
/// holding more (or longer) reports itself full, which turns the rule for
/// unclaimed requests off while it lasts.
const MAX_LISTED: usize = 8_192;
const MAX_LISTED_ID: usize = 64;
/// Replicas followed at most (forged ids cannot grow the table).
const MAX_REPLICAS: usize = 1_024;

struct Pending {
    sent: Instant,
    /// The replica whose latest heartbeat listed it, and when.
    claimed: Option<(Arc<str>, Instant)>,
    fail: Option<oneshot::Sender<()>>,
}

struct Replica {
    last: Instant,
    /// It held as many requests as it serves at once (or more than it
    /// lists): requests may wait in its queue, unlisted.
    full: bool,
}

#[derive(Default)]
struct State {
    pending: HashMap<String, Pending>,
    replicas: HashMap<Arc<str>, Replica>,
}

/// Follows one role's heartbeats for a requester.
#[derive(Default)]
pub struct Watcher {
    state: Mutex<State>,
}

/// A pending request: removed from tracking when dropped.
pub struct Tracked<'a> {
    watcher: &'a Watcher,
    id: Option<String>,
    /// Resolves when the replica serving the request is found dead.
    pub died: Option<oneshot::Receiver<()>>,
}

impl Tracked<'_> {
    /// Resolves when the replica serving the request is found dead; never
    /// otherwise (a request that is not tracked, or that finished).
    pub fn death(&mut self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let rx = self.died.take();
        async move {
            let dead = match rx {
                Some(rx) => rx.await.is_ok(),
                None => false,
            };
            if !dead {
                std::future::pending::<()>().await;
            }
        }
    }
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.watcher.lock().pending.remove(&id);
        }
    }
}

impl Watcher {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tracks request `id` until the returned value is dropped (not when a
    /// request with the same id is already pending: a caller's reused id).
    pub fn track(&self, id: &str) -> Tracked<'_> {
        let mut st = self.lock();
        if st.pending.contains_key(id) {
            return Tracked {
                watcher: self,
                id: None,
                died: None,
            };
        }
        let (tx, rx) = oneshot::channel();
        st.pending.insert(
            id.to_string(),
            Pending {
                sent: Instant::now(),
                claimed: None,
                fail: Some(tx),
            },
        );
        Tracked {
            watcher: self,
            id: Some(id.to_string()),
            died: Some(rx),
        }
    }

    /// `<replica id> <held> <capacity>\n<request id>\n...`
    fn heartbeat(&self, body: &[u8]) {
        let Ok(text) = std::str::from_utf8(body) else {
            return;
        };
        let mut lines = text.split('\n');
        let Some(head) = lines.next() else {
            return;
        };
        let mut head = head.split(' ');
        let Some(id) = head.next().filter(|r| !r.is_empty() && r.len() <= 64) else {
            return;
        };
        let held: usize = head
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(usize::MAX);
        let capacity: usize = head.next().and_then(|n| n.parse().ok()).unwrap_or(0);
        let now = Instant::now();
        let mut st = self.lock();
        let id: Arc<str> = match st.replicas.get_key_value(id) {
            Some((k, _)) => k.clone(),
            None if st.replicas.len() >= MAX_REPLICAS => return,
            None => Arc::from(id),
        };
        st.replicas.insert(
            id.clone(),
            Replica {
                last: now,
                full: held >= capacity || held > MAX_LISTED,
            },
        );
        if st.pending.is_empty() {
            return;
        }
        for request in lines {
            if let Some(p) = st.pending.get_mut(request) {
                p.claimed = Some((id.clone(), now));
            }
        }
    }

    /// Fails the requests of replicas silent for [`DEAD_AFTER`].
    fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut st = self.lock();
        let dead: Vec<(Arc<str>, Instant)> = st
            .replicas
            .iter()
            .filter(|(_, r)| now.duration_since(r.last) >= DEAD_AFTER)
            .map(|(id, r)| (id.clone(), r.last))
            .collect();
        if dead.is_empty() {
            return 0;
        }
        for (id, _) in &dead {
            st.replicas.remove(id);
        }
        // A live replica with no room may hold requests in its queue that
        // its heartbeat cannot list: then only claimed requests fail.
        let any_full = st.replicas.values().any(|r| r.full);
        let mut failed = 0;
        for (id, last) in &dead {
            for p in st.pending.values_mut() {
                let held_by_it = p.claimed.as_ref().is_some_and(|(r, _)| r == id);
                // Sent while it lived, and no replica listed it since.
                let unclaimed = !any_full
                    && p.sent <= *last + HEARTBEAT
                    && now.duration_since(p.sent) >= UNCLAIMED
                    && p.claimed
                        .as_ref()
                        .is_none_or(|(_, at)| now.duration_since(*at) >= UNCLAIMED);
                if held_by_it || unclaimed {
                    if let Some(tx) = p.fail.take() {
                        let _ = tx.send(());
                        failed += 1;
                    }
                }
            }
        }
        failed
    }

    /// Follows the heartbeats and sweeps until `shutdown`. While this
    /// requester is disconnected (and for [`DEAD_AFTER`] after) nothing is
    /// declared dead: the silence is its own.
    pub fn spawn(client: Client, subject: String, shutdown: CancellationToken) -> Arc<Self> {
        let watcher = Arc::new(Watcher::default());
        let w = watcher.clone();
        tokio::spawn(async move {
            let mut sub = loop {
                match client.subscribe(subject.clone()).await {
                    Ok(s) => break s,
                    Err(e) => {
                        tracing::warn!(%subject, error = %e, "cannot follow heartbeats; retrying");
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
            };
            let mut tick = tokio::time::interval(TICK);
            let mut connected_since = Some(Instant::now());
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    m = sub.next() => match m {
                        Some(m) => w.heartbeat(&m.payload),
                        None => return,
                    },
                    _ = tick.tick() => {
                        if !crate::nats::is_connected(&client) {
                            connected_since = None;
                            continue;
                        }
                        let since = *connected_since.get_or_insert_with(Instant::now);
                        if since.elapsed() < DEAD_AFTER {
                            // Heartbeats missed while away: start afresh.
                            let now = Instant::now();
                            for r in w.lock().replicas.values_mut() {
                                r.last = r.last.max(now - DEAD_AFTER / 2);
                            }
                            continue;
                        }
                        let failed = w.sweep();
                        if failed > 0 {
                            tracing::warn!(%subject, failed, "a replica stopped: its requests fail now");
                        }
                    }
                }
            }
        });
        watcher
    }
}

/// The requests this replica holds.
pub struct InFlight {
    /// request id → how many requests hold it (a caller may reuse an id).
    ids: Mutex<HashMap<String, u32>>,
    /// How many this replica serves at once.
    capacity: usize,
}

/// Counts one request while it lives.
pub struct Held<'a> {
    inflight: &'a InFlight,
    id: String,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut ids = self.inflight.ids.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = ids.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                ids.remove(&self.id);
            }
        }
    }
}

impl InFlight {
    pub fn new(capacity: usize) -> Self {
        InFlight {
            ids: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    pub fn hold(&self, id: &str) -> Held<'_> {
        *self
            .ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_string())
            .or_default() += 1;
        Held {
            inflight: self,
            id: id.to_string(),
        }
    }

    /// `<replica id> <held> <capacity>\n<request id>\n...`: at most
    /// [`MAX_LISTED`] ids of at most [`MAX_LISTED_ID`] bytes; one it leaves
    /// out makes it report itself full.
    fn payload(&self, replica_id: &str) -> String {
        let ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        let mut listed = 0usize;
        let mut body = String::with_capacity(ids.len().min(MAX_LISTED) * 24);
        for id in ids.keys() {
            if listed == MAX_LISTED || id.len() > MAX_LISTED_ID {
                continue;
            }
            body.push('\n');
            body.push_str(id);
            listed += 1;
        }
        // Requests, not ids: a caller may reuse an id.
        let requests: usize = ids.values().map(|n| *n as usize).sum();
        let held = if listed < ids.len() {
            usize::MAX
        } else {
            requests
        };
        format!("{replica_id} {held} {}{body}", self.capacity)
    }
}

/// Publishes the heartbeat on `subject` until `stop` (cancel it after the
/// service drained, not when the shutdown begins).
pub fn spawn_heartbeat(
    client: Client,
    subject: String,
    inflight: Arc<InFlight>,
    stop: CancellationToken,
) {
    let replica_id = format!("r{}", nuid::next());
    tokio::spawn(async move {
        let mut warned: Option<Instant> = None;
        loop {
            let body = inflight.payload(&replica_id);
            if let Err(e) = client.publish(subject.clone(), body.into()).await {
                if warned.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    tracing::warn!(%subject, error = %e, "heartbeat not published");
                    warned = Some(Instant::now());
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(HEARTBEAT) => {}
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forged_death_fails_no_request_a_live_replica_may_hold() {
        let w = Watcher::default();
        let mut t = w.track("req-1");
        let died = t.died.take();
        // A live replica with no room (its queue may hold req-1 unlisted),
        // and a forged one that beats once and then "dies".
        w.heartbeat(b"live 8 8\nother");
        w.heartbeat(b"forged 0 8");
        {
            let mut st = w.lock();
            let long_ago = Instant::now() - Duration::from_secs(5);
            st.replicas.get_mut("forged").unwrap().last = long_ago;
            st.pending.get_mut("req-1").unwrap().sent = long_ago;
        }
        assert_eq!(w.sweep(), 0, "failed while a live replica was full");
        assert!(died.is_some());
    }

    #[test]
    fn a_dead_replicas_claimed_and_unclaimed_requests_fail() {
        let w = Watcher::default();
        let _a = w.track("claimed");
        let _b = w.track("unclaimed");
        w.heartbeat(b"dead 1 8\nclaimed");
        w.heartbeat(b"live 0 8");
        {
            let mut st = w.lock();
            let then = Instant::now() - Duration::from_secs(3);
            st.replicas.get_mut("dead").unwrap().last = then;
            for p in st.pending.values_mut() {
                p.sent = then;
                if let Some((_, at)) = p.claimed.as_mut() {
                    *at = then;
                }
            }
        }
        assert_eq!(w.sweep(), 2);
    }

    #[test]
    fn heartbeats_are_bounded() {
        let f = InFlight::new(4);
        let long = "x".repeat(100);
        let _h1 = f.hold("a");
        let _h2 = f.hold(&long);
        let p = f.payload("r1");
        assert!(p.starts_with(&format!("r1 {} 4", usize::MAX)), "{p}");
        assert!(!p.contains(&long));
    }
}
