//! The router's heartbeat: every [`HEARTBEAT`] it publishes its id and the
//! ids of the requests it holds on `<prefix>.router.alive`, so an ingress
//! can tell a router that died (and which of its requests died with it)
//! within a second, instead of waiting out their deadlines.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::Client;
use tokio_util::sync::CancellationToken;

/// How often a router says it is alive.
pub const HEARTBEAT: Duration = Duration::from_millis(250);

/// The requests this router holds.
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

    /// `<router id>\n<request id>\n...`
    fn payload(&self, router_id: &str) -> String {
        let ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::with_capacity(router_id.len() + ids.len() * 24);
        out.push_str(router_id);
        for id in ids.keys() {
            out.push('\n');
            out.push_str(id);
        }
        out
    }
}

/// Publishes the heartbeat until `shutdown`.
pub fn spawn(
    client: Client,
    subject: String,
    inflight: Arc<InFlight>,
    shutdown: CancellationToken,
) {
    let router_id = format!("r{}", nuid::next());
    tokio::spawn(async move {
        loop {
            let body = inflight.payload(&router_id);
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
