//! Liveness of the replicas that serve requests. A serving process
//! publishes a heartbeat every [`HEARTBEAT`] on its role's alive subject
//! (`<prefix>.alive.<role>`) with its id and the ids of the requests it
//! holds ([`InFlight`], [`spawn_heartbeat`]); a requester follows them
//! ([`Watcher`]) and, when a replica's heartbeat stops for [`DEAD_AFTER`],
//! fails with 503 the requests that replica held, and those no live
//! replica claims that were sent before it stopped, instead of waiting
//! out their deadlines. A request is never retried here: the dead replica
//! may have had it answered, and paid for, upstream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::Client;
use futures::StreamExt;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// How often a replica says it is alive.
pub const HEARTBEAT: Duration = Duration::from_millis(250);

/// Silence after which a replica is taken for dead (four missed heartbeats).
pub const DEAD_AFTER: Duration = Duration::from_millis(1_000);
/// A request no live replica claims this long after it was sent is not
/// being served (heartbeats come every 250 ms).
const UNCLAIMED: Duration = Duration::from_millis(600);
const TICK: Duration = Duration::from_millis(100);

struct Pending {
    sent: Instant,
    /// The replica whose latest heartbeat listed it, and when.
    claimed: Option<(Arc<str>, Instant)>,
    fail: Option<oneshot::Sender<()>>,
}

#[derive(Default)]
struct State {
    pending: HashMap<String, Pending>,
    /// replica id → its last heartbeat.
    routers: HashMap<Arc<str>, Instant>,
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

    fn heartbeat(&self, body: &[u8]) {
        let Ok(text) = std::str::from_utf8(body) else {
            return;
        };
        let mut lines = text.split('\n');
        let Some(router) = lines.next().filter(|r| !r.is_empty() && r.len() <= 64) else {
            return;
        };
        let now = Instant::now();
        let mut st = self.lock();
        let router: Arc<str> = match st.routers.get_key_value(router) {
            Some((k, _)) => k.clone(),
            None => Arc::from(router),
        };
        st.routers.insert(router.clone(), now);
        if st.pending.is_empty() {
            return;
        }
        for id in lines {
            if let Some(p) = st.pending.get_mut(id) {
                p.claimed = Some((router.clone(), now));
            }
        }
    }

    /// Fails the requests of replicas silent for [`DEAD_AFTER`].
    fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut st = self.lock();
        let dead: Vec<(Arc<str>, Instant)> = st
            .routers
            .iter()
            .filter(|(_, last)| now.duration_since(**last) >= DEAD_AFTER)
            .map(|(r, last)| (r.clone(), *last))
            .collect();
        if dead.is_empty() {
            return 0;
        }
        let mut failed = 0;
        for (router, last) in &dead {
            st.routers.remove(router);
            for p in st.pending.values_mut() {
                let held_by_it = p.claimed.as_ref().is_some_and(|(r, _)| r == router);
                // Sent while it lived, and no live replica listed it since.
                let unclaimed = p.sent <= *last + UNCLAIMED
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
    /// ingress is disconnected (and for [`DEAD_AFTER`] after) nothing is
    /// declared dead: the silence is its own.
    pub fn spawn(client: Client, subject: String, shutdown: CancellationToken) -> Arc<Self> {
        let watcher = Arc::new(Watcher::default());
        let r = watcher.clone();
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
                        Some(m) => r.heartbeat(&m.payload),
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
                            for last in r.lock().routers.values_mut() {
                                *last = (*last).max(now - DEAD_AFTER / 2);
                            }
                            continue;
                        }
                        let failed = r.sweep();
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
#[derive(Default)]
pub struct InFlight {
    /// request id → how many requests hold it (a caller may reuse an id).
    ids: Mutex<HashMap<String, u32>>,
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

    /// `<replica id>\n<request id>\n...`
    fn payload(&self, replica_id: &str) -> String {
        let ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::with_capacity(replica_id.len() + ids.len() * 24);
        out.push_str(replica_id);
        for id in ids.keys() {
            out.push('\n');
            out.push_str(id);
        }
        out
    }
}

/// Publishes the heartbeat on `subject` until `shutdown`.
pub fn spawn_heartbeat(
    client: Client,
    subject: String,
    inflight: Arc<InFlight>,
    shutdown: CancellationToken,
) {
    let replica_id = format!("r{}", nuid::next());
    tokio::spawn(async move {
        loop {
            let body = inflight.payload(&replica_id);
            // A heartbeat lost while disconnected is not retried: the next
            // one tells the same.
            let _ = client.publish(subject.clone(), body.into()).await;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(HEARTBEAT) => {}
            }
        }
    });
}
