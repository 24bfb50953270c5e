//! In-process coalescing of identical requests: the first request for a key
//! leads (it generates), later ones wait for its answer.
//!
//! Two limits keep a hot key from hurting the pool or the router:
//! - at most `max_waiters` wait per key; one more is refused (429) rather
//!   than generating on its own, which would add one more call to the pool
//!   at the moment it is busiest with this very prompt, and hold a router
//!   slot for it just the same; its retry is a cache hit once the leader
//!   is done;
//! - when the leader fails for a reason that says nothing about the request
//!   (a timeout, an outage, cancellation), leadership passes to ONE waiter,
//!   the oldest still waiting, while the others keep waiting on it. A
//!   struggling pool so sees at most one call per key at a time, never
//!   every waiter at once.
//!
//! A std `Mutex` guards the map: it is held for a lookup or an insert and
//! never across an `.await`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use optiroute_common::wire::GenerateResponse;
use optiroute_common::{Error, ErrorKind};
use tokio::sync::oneshot;

/// What a waiter gets: the leader's result, or the leadership itself.
pub enum Turn {
    Answer(Result<GenerateResponse, Error>),
    Lead(LeaderGuard),
}

pub enum Join {
    /// Generate, then [`LeaderGuard::finish`].
    Leader(LeaderGuard),
    /// Wait for the leader's result, or to be made leader.
    Follower(oneshot::Receiver<Turn>),
    /// As many requests as allowed already wait for this key.
    Full,
}

pub struct Coalescer {
    max_waiters: usize,
    /// Per key in flight: its waiters, oldest first.
    flights: Mutex<HashMap<String, VecDeque<oneshot::Sender<Turn>>>>,
}

impl Coalescer {
    pub fn new(max_waiters: usize) -> Arc<Self> {
        Arc::new(Coalescer {
            max_waiters,
            flights: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, VecDeque<oneshot::Sender<Turn>>>> {
        self.flights.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Joins the request in flight for `key`, or becomes its leader.
    pub fn join(self: &Arc<Self>, key: &str) -> Join {
        let mut map = self.lock();
        if let Some(waiters) = map.get_mut(key) {
            // Waiters whose deadline passed have gone; they hold no place.
            waiters.retain(|w| !w.is_closed());
            if waiters.len() >= self.max_waiters {
                return Join::Full;
            }
            let (tx, rx) = oneshot::channel();
            waiters.push_back(tx);
            return Join::Follower(rx);
        }
        map.insert(key.to_string(), VecDeque::new());
        Join::Leader(LeaderGuard {
            coalescer: self.clone(),
            key: Some(key.to_string()),
        })
    }

    /// Requests waiting on `key` (for tests and diagnostics).
    pub fn waiting(&self, key: &str) -> usize {
        self.lock().get(key).map_or(0, VecDeque::len)
    }

    /// Makes the oldest live waiter of `key` its leader; with none left,
    /// the key is no longer in flight.
    fn hand_over(self: &Arc<Self>, mut key: String) {
        loop {
            let next = {
                let mut map = self.lock();
                match map.get_mut(&key).and_then(VecDeque::pop_front) {
                    Some(tx) => tx,
                    None => {
                        map.remove(&key);
                        return;
                    }
                }
            };
            let guard = LeaderGuard {
                coalescer: self.clone(),
                key: Some(key),
            };
            match next.send(Turn::Lead(guard)) {
                Ok(()) => return,
                // That waiter has gone: try the next one.
                Err(Turn::Lead(mut g)) => match g.key.take() {
                    Some(k) => key = k,
                    None => return,
                },
                Err(Turn::Answer(_)) => return,
            }
        }
    }
}

/// Whether a result answers every identical request: an answer does, and
/// so does an error about the request itself; a timeout, an outage or a
/// cancellation says nothing about the next attempt.
fn shareable(result: &Result<GenerateResponse, Error>) -> bool {
    match result {
        Ok(_) => true,
        Err(e) => matches!(
            e.kind,
            ErrorKind::BadRequest | ErrorKind::UpstreamClientError
        ),
    }
}

/// Held by the one request that generates for a key. Finished with a
/// shareable result, it answers every waiter; finished with another
/// failure, or dropped (the leader was cancelled), it makes one waiter the
/// next leader.
pub struct LeaderGuard {
    coalescer: Arc<Coalescer>,
    /// `None` once finished.
    key: Option<String>,
}

impl LeaderGuard {
    pub fn finish(mut self, result: &Result<GenerateResponse, Error>) {
        let Some(key) = self.key.take() else {
            return;
        };
        if !shareable(result) {
            self.coalescer.hand_over(key);
            return;
        }
        let waiters = self.coalescer.lock().remove(&key).unwrap_or_default();
        for w in waiters {
            let _ = w.send(Turn::Answer(result.clone()));
        }
    }
}

impl Drop for LeaderGuard {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.coalescer.hand_over(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use optiroute_common::wire::{Completion, Pool, Usage};

    fn answer() -> GenerateResponse {
        GenerateResponse {
            completion: Completion {
                text: "a".into(),
                usage: Usage::default(),
                model: "m".into(),
                finish_reason: None,
            },
            cost: 0.0,
            latency: 0.0,
            routed_to: Pool::Local,
            provider: Pool::Local,
            cached: false,
            saved_usd: None,
            fallback_reason: None,
            route_reason: None,
            request_id: None,
            cache_match: None,
            similarity: None,
            semantic_miss: None,
        }
    }

    fn follower(c: &Arc<Coalescer>) -> oneshot::Receiver<Turn> {
        match c.join("k") {
            Join::Follower(rx) => rx,
            _ => panic!("expected a follower"),
        }
    }

    fn leader(c: &Arc<Coalescer>) -> LeaderGuard {
        match c.join("k") {
            Join::Leader(g) => g,
            _ => panic!("expected the leader"),
        }
    }

    #[tokio::test]
    async fn waiters_are_capped_and_share_an_answer() {
        let c = Coalescer::new(2);
        let lead = leader(&c);
        let a = follower(&c);
        let b = follower(&c);
        assert!(matches!(c.join("k"), Join::Full));
        lead.finish(&Ok(answer()));
        for rx in [a, b] {
            assert!(matches!(rx.await, Ok(Turn::Answer(Ok(_)))));
        }
        // The key is free again.
        assert!(matches!(c.join("k"), Join::Leader(_)));
    }

    #[tokio::test]
    async fn a_failed_leader_hands_over_to_one_waiter_the_others_keep_waiting() {
        let c = Coalescer::new(10);
        let lead = leader(&c);
        let mut waiters: VecDeque<_> = (0..5).map(|_| follower(&c)).collect();
        lead.finish(&Err(Error::new(ErrorKind::Timeout, "slow")));
        let Some(first) = waiters.pop_front() else {
            panic!("no waiter")
        };
        let Ok(Turn::Lead(next)) = first.await else {
            panic!("the oldest waiter leads")
        };
        assert_eq!(c.waiting("k"), 4, "the others still wait");
        for w in &mut waiters {
            assert!(w.try_recv().is_err(), "nothing sent to the others yet");
        }
        // A waiter that went away is skipped; a dropped leader hands over too.
        drop(waiters.pop_front());
        drop(next);
        let Some(third) = waiters.pop_front() else {
            panic!("no waiter")
        };
        let Ok(Turn::Lead(next)) = third.await else {
            panic!("the next live waiter leads")
        };
        // An error about the request itself is everyone's answer.
        next.finish(&Err(Error::bad_request("bad")));
        for w in waiters {
            assert!(matches!(w.await, Ok(Turn::Answer(Err(e))) if e.kind == ErrorKind::BadRequest));
        }
        assert_eq!(c.waiting("k"), 0);
        assert!(matches!(c.join("k"), Join::Leader(_)));
    }

    #[tokio::test]
    async fn a_failed_leader_without_waiters_frees_the_key() {
        let c = Coalescer::new(1);
        leader(&c).finish(&Err(Error::new(ErrorKind::Timeout, "slow")));
        assert!(matches!(c.join("k"), Join::Leader(_)));
    }
}
