//! Batch jobs authenticate with their batch's token, not a key: the
//! router reads the batch's description (its owner and the token's hash)
//! once a minute at most per batch, and charges the owner's key.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use optiroute_common::protocol::headers::batch_token_hash;
use optiroute_common::{Error, ErrorKind};
use tokio::sync::OnceCell;

/// How long a batch's description is trusted from memory (a cancel takes
/// effect within it).
const FRESH: Duration = Duration::from_secs(5);
/// Batches remembered at most (then forgotten all at once).
const MAX_REMEMBERED: usize = 4096;

pub struct BatchAuth {
    js: jetstream::Context,
    bucket: String,
    kv: OnceCell<kv::Store>,
    /// batch id → what its description says.
    known: Mutex<HashMap<String, Known>>,
}

#[derive(Clone)]
struct Known {
    at: Instant,
    token_hash: String,
    owner: String,
    total: u64,
    cancelled: bool,
}

fn refused() -> Error {
    Error::new(ErrorKind::InvalidApiKey, "invalid batch credential")
}

impl BatchAuth {
    pub fn new(js: jetstream::Context, bucket: String) -> Self {
        BatchAuth {
            js,
            bucket,
            kv: OnceCell::new(),
            known: Mutex::new(HashMap::new()),
        }
    }

    /// The id of the key that owns batch `id`, when `token` is its token
    /// and the request is one of its lines (`request_id` is
    /// `<batch id>-<line>`, as the batch workers send) while the batch is
    /// not cancelled: the token runs that batch's lines, nothing else.
    pub async fn owner(&self, id: &str, token: &str, request_id: &str) -> Result<String, Error> {
        if id.is_empty() || id.len() > 64 || token.len() > 128 {
            return Err(refused());
        }
        let line: u64 = request_id
            .strip_prefix(id)
            .and_then(|r| r.strip_prefix('-'))
            .and_then(|l| l.parse().ok())
            .ok_or_else(refused)?;
        let hash = batch_token_hash(token);
        let cached = {
            let known = self.known.lock().unwrap_or_else(|p| p.into_inner());
            known
                .get(id)
                .filter(|k| k.at.elapsed() < FRESH && k.token_hash == hash)
                .cloned()
        };
        let k = match cached {
            Some(k) => k,
            None => self.read(id, &hash).await?,
        };
        if k.cancelled || line == 0 || line > k.total {
            return Err(refused());
        }
        Ok(k.owner)
    }

    async fn read(&self, id: &str, hash: &str) -> Result<Known, Error> {
        let kv = self
            .kv
            .get_or_try_init(|| async {
                tokio::time::timeout(Duration::from_secs(3), self.js.get_key_value(&self.bucket))
                    .await
                    .map_err(|_| Error::new(ErrorKind::Timeout, "batch descriptions: timed out"))?
                    .map_err(|e| {
                        Error::new(
                            ErrorKind::NatsUnavailable,
                            format!("batch descriptions: {e}"),
                        )
                    })
            })
            .await?;
        let entry = tokio::time::timeout(Duration::from_secs(3), kv.get(id))
            .await
            .map_err(|_| Error::new(ErrorKind::Timeout, "batch description: timed out"))?
            .map_err(|e| {
                Error::new(
                    ErrorKind::NatsUnavailable,
                    format!("batch description: {e}"),
                )
            })?
            .ok_or_else(refused)?;
        let meta: serde_json::Value = serde_json::from_slice(&entry).map_err(|_| refused())?;
        let (Some(want), Some(owner)) = (meta["token_hash"].as_str(), meta["owner"].as_str())
        else {
            return Err(refused());
        };
        if want != hash {
            return Err(refused());
        }
        let k = Known {
            at: Instant::now(),
            token_hash: hash.to_string(),
            owner: owner.to_string(),
            total: meta["total"].as_u64().unwrap_or(0),
            cancelled: meta["cancelled"].as_bool().unwrap_or(false),
        };
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if known.len() >= MAX_REMEMBERED {
            known.clear();
        }
        known.insert(id.to_string(), k.clone());
        Ok(k)
    }
}
