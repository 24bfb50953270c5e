//! Every process's in-memory copy of the keys and teams, fed by a watch on
//! the accounts bucket: the request path reads memory, never KV, and a
//! revoked or changed key takes effect as soon as the change arrives
//! (milliseconds; the watch is pushed by the server).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use optiroute_common::{Error, ErrorKind};

use crate::model::{KeyRecord, TeamRecord};
use crate::store::{hash_secret, AccountStore};

#[derive(Default)]
struct Tables {
    by_hash: HashMap<String, Arc<KeyRecord>>,
    /// entry name (`key.<id>`) → hash, to drop a key whose entry is deleted.
    hash_of_entry: HashMap<String, String>,
    teams: HashMap<String, Arc<TeamRecord>>,
}

/// Keys by the hash of their secret, and teams by name.
#[derive(Default)]
pub struct Directory {
    tables: RwLock<Tables>,
    loaded: AtomicBool,
}

impl Directory {
    /// Starts the watch in the background (retrying while JetStream is
    /// away) and returns at once; [`Directory::authenticate`] answers 503
    /// until the keys are loaded.
    pub fn spawn(
        js: jetstream::Context,
        bucket: String,
        replicas: usize,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let dir = Arc::new(Directory::default());
        let d = dir.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let result = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = d.follow(&js, &bucket, replicas) => r,
                };
                if let Err(e) = result {
                    tracing::warn!(error = %e, "accounts watch lost; following again");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        });
        dir
    }

    /// Loads every key and team, then applies changes as they come.
    async fn follow(
        &self,
        js: &jetstream::Context,
        bucket: &str,
        replicas: usize,
    ) -> Result<(), Error> {
        let store = AccountStore::open(js, bucket, replicas).await?;
        let kv = store.kv().clone();
        let mut watch = kv
            .watch_with_history(">")
            .await
            .map_err(|e| Error::new(ErrorKind::NatsUnavailable, format!("accounts watch: {e}")))?;
        // A fresh copy: what was deleted while the watch was away is gone.
        let mut fresh = Tables::default();
        let pending =
            kv.status().await.map(|s| s.values()).map_err(|e| {
                Error::new(ErrorKind::NatsUnavailable, format!("accounts status: {e}"))
            })?;
        if pending == 0 {
            self.install(std::mem::take(&mut fresh));
        }
        let mut loading = pending > 0;
        while let Some(entry) = watch.next().await {
            let entry = entry.map_err(|e| {
                Error::new(ErrorKind::NatsUnavailable, format!("accounts watch: {e}"))
            })?;
            if loading {
                apply(&mut fresh, &entry);
                if entry.delta == 0 {
                    loading = false;
                    self.install(std::mem::take(&mut fresh));
                }
            } else {
                let mut t = self.tables.write().unwrap_or_else(|p| p.into_inner());
                apply(&mut t, &entry);
            }
        }
        Err(Error::new(
            ErrorKind::NatsUnavailable,
            "accounts watch ended",
        ))
    }

    fn install(&self, t: Tables) {
        *self.tables.write().unwrap_or_else(|p| p.into_inner()) = t;
        if !self.loaded.swap(true, Ordering::AcqRel) {
            tracing::info!("accounts loaded");
        }
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// The live key whose secret this is: 401 `invalid_api_key` when it is
    /// missing, unknown or revoked, 503 while the keys are not loaded yet.
    pub fn authenticate(&self, secret: Option<&str>) -> Result<Arc<KeyRecord>, Error> {
        let Some(secret) = secret.map(str::trim).filter(|s| !s.is_empty()) else {
            return Err(Error::new(
                ErrorKind::InvalidApiKey,
                "no API key: send `Authorization: Bearer <key>` (NATS: header Optiroute-Api-Key)",
            ));
        };
        if !self.is_loaded() {
            return Err(Error::new(
                ErrorKind::NatsUnavailable,
                "API keys are not loaded yet (JetStream unavailable); retry shortly",
            ));
        }
        if secret.len() > 256 {
            return Err(Error::new(ErrorKind::InvalidApiKey, "unknown API key"));
        }
        let hash = hash_secret(secret);
        let t = self.tables.read().unwrap_or_else(|p| p.into_inner());
        match t.by_hash.get(&hash) {
            Some(k) if k.revoked => Err(Error::new(
                ErrorKind::InvalidApiKey,
                format!("API key {} was revoked", k.id),
            )),
            Some(k) => Ok(k.clone()),
            None => Err(Error::new(ErrorKind::InvalidApiKey, "unknown API key")),
        }
    }

    pub fn team(&self, name: &str) -> Option<Arc<TeamRecord>> {
        let t = self.tables.read().unwrap_or_else(|p| p.into_inner());
        t.teams.get(name).cloned()
    }

    /// The key with this id (revoked or not).
    pub fn key_by_id(&self, id: &str) -> Option<Arc<KeyRecord>> {
        let t = self.tables.read().unwrap_or_else(|p| p.into_inner());
        let hash = t.hash_of_entry.get(&crate::store::key_entry(id))?;
        t.by_hash.get(hash).cloned()
    }
}

fn apply(t: &mut Tables, entry: &kv::Entry) {
    let name = entry.key.as_str();
    let put = entry.operation == kv::Operation::Put;
    if let Some(team) = name.strip_prefix("team.") {
        if put {
            match serde_json::from_slice::<TeamRecord>(&entry.value) {
                Ok(rec) => {
                    t.teams.insert(team.to_string(), Arc::new(rec));
                }
                Err(e) => {
                    tracing::warn!(entry = name, error = %e, "unreadable team record ignored")
                }
            }
        } else {
            t.teams.remove(team);
        }
    } else if name.starts_with("key.") {
        if let Some(old) = t.hash_of_entry.remove(name) {
            t.by_hash.remove(&old);
        }
        if put {
            match serde_json::from_slice::<KeyRecord>(&entry.value) {
                Ok(rec) => {
                    t.hash_of_entry.insert(name.to_string(), rec.hash.clone());
                    t.by_hash.insert(rec.hash.clone(), Arc::new(rec));
                }
                Err(e) => tracing::warn!(entry = name, error = %e, "unreadable key record ignored"),
            }
        }
    }
}
