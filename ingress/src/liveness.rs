//! Fails fast the requests of a router that died. Routers publish a
//! heartbeat with the ids of the requests they hold
//! (`router-worker/src/liveness.rs`); the ingress tracks its own pending
//! requests and, when a router's heartbeat stops for [`DEAD_AFTER`], fails
//! with 503 those that router held, and those no live router claims that
//! were sent before it stopped. Their callers learn within about a second,
//! instead of waiting out the deadline, and throughput comes back as soon
//! as the other routers take the load. (A request is never retried here:
//! the dead router may have had it answered, and paid for, upstream.)

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::Client;
use futures::StreamExt;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// Silence after which a router is taken for dead (four missed heartbeats).
pub const DEAD_AFTER: Duration = Duration::from_millis(1_000);
/// A request no live router claims this long after it was sent is not
/// being served (heartbeats come every 250 ms).
const UNCLAIMED: Duration = Duration::from_millis(600);
const TICK: Duration = Duration::from_millis(100);

struct Pending {
    sent: Instant,
    /// The router whose latest heartbeat listed it, and when.
    claimed: Option<(Arc<str>, Instant)>,
    fail: Option<oneshot::Sender<()>>,
}

#[derive(Default)]
struct State {
    pending: HashMap<String, Pending>,
    /// router id → its last heartbeat.
    routers: HashMap<Arc<str>, Instant>,
}

#[derive(Default)]
pub struct Routers {
    state: Mutex<State>,
}

/// A pending request: removed from tracking when dropped.
pub struct Tracked<'a> {
    routers: &'a Routers,
    id: Option<String>,
    /// Resolves when the router serving the request is found dead.
    pub died: Option<oneshot::Receiver<()>>,
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.routers.lock().pending.remove(&id);
        }
    }
}

impl Routers {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tracks request `id` until the returned value is dropped (not when a
    /// request with the same id is already pending: a caller's reused id).
    pub fn track(&self, id: &str) -> Tracked<'_> {
        let mut st = self.lock();
        if st.pending.contains_key(id) {
            return Tracked {
                routers: self,
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
            routers: self,
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

    /// Fails the requests of routers silent for [`DEAD_AFTER`].
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
                // Sent while it lived, and no live router listed it since.
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
        let routers = Arc::new(Routers::default());
        let r = routers.clone();
        tokio::spawn(async move {
            let mut sub = loop {
                match client.subscribe(subject.clone()).await {
                    Ok(s) => break s,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot follow router heartbeats; retrying");
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
                        if !optiroute_common::nats::is_connected(&client) {
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
                            tracing::warn!(failed, "a router stopped: its requests fail now");
                        }
                    }
                }
            }
        });
        routers
    }
}
