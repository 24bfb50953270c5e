//! Submitting, watching, collecting and cancelling batches: used by the
//! ingress (`/v1/batches`), the `optiroute batch` command and the workers.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, kv, stream};
use async_nats::{Client, HeaderMap};
use futures::StreamExt;
use optiroute_common::config::{BatchConfig, Config};
use optiroute_common::error::ErrorBody;
use optiroute_common::nats::epoch_ms;
use optiroute_common::wire::{self, Format};
use optiroute_common::{Error, ErrorKind};
use sha2::{Digest, Sha256};

use crate::model::{validate_custom_id, BatchMeta, BatchResult, BatchStatus, Job, ResultStatus};

pub struct BatchClient {
    js: jetstream::Context,
    pub cfg: BatchConfig,
    prefix: String,
    pub max_prompt_bytes: usize,
    jobs: stream::Stream,
    meta: kv::Store,
    results: kv::Store,
}

fn js_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::NatsUnavailable, format!("{what}: {e}"))
}

/// A batch id: 1 to 64 letters, digits, `-` or `_` (it becomes a subject token and a KV key).
pub fn validate_id(id: &str) -> Result<(), Error> {
    if id.is_empty()
        || id.len() > 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(Error::bad_request(format!(
            "batch id must be 1 to 64 letters, digits, - or _; got `{id}`"
        )));
    }
    Ok(())
}

/// The id of a batch with this content: submitting the same file twice
/// names the same batch, so the second submit adds nothing.
pub fn content_id(input: &[u8]) -> String {
    format!("b{}", &hex::encode(Sha256::digest(input))[..20])
}

impl BatchClient {
    /// Opens (creating when absent) the jobs stream and both buckets.
    pub async fn open(client: Client, cfg: &Config) -> Result<Self, Error> {
        let b = &cfg.batch;
        let js = jetstream::new(client);
        let prefix = cfg.nats.prefix.clone();
        let jobs = js
            .get_or_create_stream(stream::Config {
                name: b.stream.clone(),
                subjects: vec![format!("{prefix}.batch.*")],
                retention: stream::RetentionPolicy::WorkQueue,
                duplicate_window: Duration::from_secs(3600),
                num_replicas: b.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| js_error("batch stream", e))?;
        let meta = open_bucket(
            &js,
            &b.meta_bucket,
            "OptiRoute batches",
            Duration::ZERO,
            b.replicas,
        )
        .await?;
        let results = open_bucket(
            &js,
            &b.results_bucket,
            "OptiRoute batch results",
            Duration::from_secs(b.results_ttl_secs),
            b.replicas,
        )
        .await?;
        Ok(BatchClient {
            js,
            cfg: b.clone(),
            prefix,
            max_prompt_bytes: cfg.router.max_prompt_bytes,
            jobs,
            meta,
            results,
        })
    }

    pub fn job_subject(&self, id: &str) -> String {
        format!("{}.batch.{id}", self.prefix)
    }

    /// Where workers pull from: every batch's jobs.
    pub fn jobs_filter(&self) -> String {
        format!("{}.batch.*", self.prefix)
    }

    pub fn jobs_stream(&self) -> &stream::Stream {
        &self.jobs
    }

    /// Submits a JSONL input. Each non-blank line is one job; an invalid
    /// line becomes an error result at once. Resubmitting the same content
    /// (or the same `id`) publishes nothing twice.
    pub async fn submit(&self, input: &[u8], id: Option<&str>) -> Result<BatchStatus, Error> {
        let id = match id {
            Some(i) => {
                validate_id(i)?;
                i.to_string()
            }
            None => content_id(input),
        };
        let text = std::str::from_utf8(input)
            .map_err(|e| Error::bad_request(format!("the input is not UTF-8: {e}")))?;
        let mut jobs = Vec::new();
        let mut invalid = Vec::new();
        for (n, raw) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
            let line = n as u64 + 1;
            if line as usize > self.cfg.max_lines {
                return Err(Error::bad_request(format!(
                    "the input has more than {} lines",
                    self.cfg.max_lines
                )));
            }
            let parsed = Job::decode(Format::Json, raw.as_bytes())
                .and_then(|l| l.request.validate(self.max_prompt_bytes).map(|_| l));
            if let Ok(l) = &parsed {
                validate_custom_id(l.custom_id.as_deref())
                    .map_err(|e| Error::bad_request(format!("line {line}: {}", e.message)))?;
            }
            match parsed {
                Ok(l) => jobs.push(Job { line, ..l }),
                Err(e) => invalid.push((line, e)),
            }
        }
        let total = (jobs.len() + invalid.len()) as u64;
        if total == 0 {
            return Err(Error::bad_request("the input has no lines"));
        }
        let meta = BatchMeta {
            id: id.clone(),
            total,
            invalid: invalid.len() as u64,
            created_ms: epoch_ms(SystemTime::now()),
            cancelled: false,
            submitted: u64::MAX,
        };
        let body = wire::encode(Format::Json, &meta)?;
        let existing: HashSet<u64> = match self.meta.create(&id, body).await {
            Ok(_) => HashSet::new(),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                let known = self.meta(&id).await?;
                if known.total != total {
                    return Err(Error::bad_request(format!(
                        "batch `{id}` already exists with {} lines; this input has {total}",
                        known.total
                    )));
                }
                self.read_results(&id).await?.into_keys().collect()
            }
            Err(e) => return Err(js_error("batch meta", e)),
        };
        for (line, e) in invalid {
            if !existing.contains(&line) {
                let r = BatchResult {
                    line,
                    custom_id: None,
                    status: ResultStatus::Error,
                    response: None,
                    error: Some(ErrorBody::from(&e)),
                    attempts: 0,
                };
                self.create_result(&id, &r).await?;
            }
        }
        // Publish pipelined, then wait for every acknowledgement.
        let subject = self.job_subject(&id);
        let mut acks = Vec::with_capacity(256);
        for job in jobs.iter().filter(|j| !existing.contains(&j.line)) {
            let mut h = HeaderMap::new();
            h.insert("Nats-Msg-Id", format!("{id}:{}", job.line).as_str());
            let ack = self
                .js
                .publish_with_headers(subject.clone(), h, wire::encode(Format::MsgPack, job)?)
                .await
                .map_err(|e| js_error("batch publish", e))?;
            acks.push(ack);
            if acks.len() == 256 {
                for a in acks.drain(..) {
                    a.await.map_err(|e| js_error("batch publish ack", e))?;
                }
            }
        }
        for a in acks {
            a.await.map_err(|e| js_error("batch publish ack", e))?;
        }
        self.status(&id).await
    }

    /// One line's result, whether or not the batch has a description
    /// (jobs published straight to the stream by other systems).
    pub async fn result(&self, id: &str, line: u64) -> Result<Option<BatchResult>, Error> {
        validate_id(id)?;
        match self.results.get(format!("{id}.{line}")).await {
            Ok(Some(b)) => Ok(Some(wire::decode(Format::MsgPack, &b)?)),
            Ok(None) => Ok(None),
            Err(e) => Err(js_error("batch result", e)),
        }
    }

    pub async fn meta(&self, id: &str) -> Result<BatchMeta, Error> {
        validate_id(id)?;
        match self.meta.get(id).await {
            Ok(Some(b)) => wire::decode(Format::Json, &b)
                .map_err(|e| Error::internal(format!("batch meta: {}", e.message))),
            Ok(None) => Err(Error::new(ErrorKind::NotFound, format!("no batch `{id}`"))),
            Err(e) => Err(js_error("batch meta", e)),
        }
    }

    /// The key of a result: `<id>.<line>`; a job without a usable line
    /// (line 0) goes under `<id>.<custom_id>` (`invalid-<stream sequence>`).
    pub fn result_key(id: &str, r: &BatchResult) -> String {
        match (r.line, &r.custom_id) {
            (0, Some(tag)) => format!("{id}.{tag}"),
            (line, _) => format!("{id}.{line}"),
        }
    }

    /// Stores a result if the line has none yet: `Ok(true)` when this call
    /// stored it, `Ok(false)` when one was already there (kept as it is).
    pub async fn create_result(&self, id: &str, r: &BatchResult) -> Result<bool, Error> {
        let body = wire::encode(Format::MsgPack, r)?;
        match self.results.create(Self::result_key(id, r), body).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(js_error("batch result", e)),
        }
    }

    /// Whether a result is stored under `key` (see [`Self::result_key`]).
    pub async fn has_result(&self, key: &str) -> Result<bool, Error> {
        match self.results.entry(key).await {
            Ok(e) => Ok(e.is_some_and(|e| e.operation == kv::Operation::Put)),
            Err(e) => Err(js_error("batch result", e)),
        }
    }

    /// The batch id a job subject names (`<prefix>.batch.<id>`), checked.
    pub fn batch_id_of<'a>(&self, subject: &'a str) -> Result<&'a str, Error> {
        let id = subject
            .strip_prefix(self.prefix.as_str())
            .and_then(|s| s.strip_prefix(".batch."))
            .ok_or_else(|| Error::bad_request("not a batch job subject"))?;
        validate_id(id)?;
        Ok(id)
    }

    /// Messages per subject matching `filter` in `stream`, summed.
    async fn count(stream: &stream::Stream, filter: String) -> Result<u64, Error> {
        let mut subjects = stream
            .info_with_subjects(filter)
            .await
            .map_err(|e| js_error("stream info", e))?;
        let mut n = 0u64;
        while let Some(s) = subjects.next().await {
            n += s.map_err(|e| js_error("stream info", e))?.1 as u64;
        }
        Ok(n)
    }

    /// Every stored result of a batch, by line.
    async fn read_results(&self, id: &str) -> Result<BTreeMap<u64, BatchResult>, Error> {
        let kv_stream = self
            .js
            .get_stream(format!("KV_{}", self.cfg.results_bucket))
            .await
            .map_err(|e| js_error("results stream", e))?;
        let expected = Self::count(
            &kv_stream,
            format!("$KV.{}.{id}.*", self.cfg.results_bucket),
        )
        .await?;
        let mut out = BTreeMap::new();
        if expected == 0 {
            return Ok(out);
        }
        let mut watch = self
            .results
            .watch_with_history(format!("{id}.*"))
            .await
            .map_err(|e| js_error("results watch", e))?;
        let read = async {
            while let Some(entry) = watch.next().await {
                let entry = entry.map_err(|e| js_error("results watch", e))?;
                if entry.operation == kv::Operation::Put {
                    if let Ok(r) = wire::decode::<BatchResult>(Format::MsgPack, &entry.value) {
                        out.insert(r.line, r);
                    }
                }
                if entry.delta == 0 || out.len() as u64 >= expected {
                    break;
                }
            }
            Ok::<_, Error>(())
        };
        tokio::time::timeout(Duration::from_secs(30), read)
            .await
            .map_err(|_| Error::new(ErrorKind::Timeout, "reading batch results timed out"))??;
        Ok(out)
    }

    pub async fn status(&self, id: &str) -> Result<BatchStatus, Error> {
        let meta = self.meta(id).await?;
        let results = self.read_results(id).await?;
        let pending = Self::count(&self.jobs, self.job_subject(id)).await?;
        Ok(summarize(&meta, results.values(), pending))
    }

    /// One result per input line, in input order; lines not finished yet
    /// are listed as `pending`.
    pub async fn results(&self, id: &str) -> Result<Vec<BatchResult>, Error> {
        let meta = self.meta(id).await?;
        let mut results = self.read_results(id).await?;
        Ok((1..=meta.total)
            .map(|line| {
                results.remove(&line).unwrap_or(BatchResult {
                    line,
                    custom_id: None,
                    status: ResultStatus::Pending,
                    response: None,
                    error: None,
                    attempts: 0,
                })
            })
            .collect())
    }

    /// Marks the batch cancelled, drops its queued jobs and records them as
    /// `cancelled` results (jobs already running still finish).
    pub async fn cancel(&self, id: &str) -> Result<BatchStatus, Error> {
        loop {
            let entry = self
                .meta
                .entry(id)
                .await
                .map_err(|e| js_error("batch meta", e))?;
            let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
                return Err(Error::new(ErrorKind::NotFound, format!("no batch `{id}`")));
            };
            let mut meta: BatchMeta = wire::decode(Format::Json, &entry.value)?;
            meta.cancelled = true;
            if self
                .meta
                .update(id, wire::encode(Format::Json, &meta)?, entry.revision)
                .await
                .is_ok()
            {
                break;
            }
        }
        self.jobs
            .purge()
            .filter(self.job_subject(id))
            .await
            .map_err(|e| js_error("batch purge", e))?;
        let meta = self.meta(id).await?;
        let done = self.read_results(id).await?;
        for line in (1..=meta.total).filter(|l| !done.contains_key(l)) {
            let r = BatchResult {
                line,
                custom_id: None,
                status: ResultStatus::Cancelled,
                response: None,
                error: Some(ErrorBody {
                    code: ErrorKind::Cancelled,
                    message: "the batch was cancelled".into(),
                }),
                attempts: 0,
            };
            let body = wire::encode(Format::MsgPack, &r)?;
            // A job finishing right now may have written its result first: keep it.
            let _ = self.results.create(format!("{id}.{line}"), body).await;
        }
        self.status(id).await
    }
}

async fn open_bucket(
    js: &jetstream::Context,
    name: &str,
    description: &str,
    max_age: Duration,
    replicas: usize,
) -> Result<kv::Store, Error> {
    if let Ok(store) = js.get_key_value(name).await {
        return Ok(store);
    }
    js.create_key_value(kv::Config {
        bucket: name.to_string(),
        description: description.to_string(),
        history: 1,
        max_age,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| js_error(&format!("bucket {name}"), e))
}

/// Status from a batch's description, its results and its queued jobs.
pub fn summarize<'a>(
    meta: &BatchMeta,
    results: impl Iterator<Item = &'a BatchResult>,
    pending: u64,
) -> BatchStatus {
    let (mut done, mut failed, mut cancelled, mut cost) = (0u64, 0u64, 0u64, 0.0);
    for r in results {
        match r.status {
            ResultStatus::Ok => done += 1,
            ResultStatus::Error => failed += 1,
            ResultStatus::Cancelled => cancelled += 1,
            ResultStatus::Pending => {}
        }
        cost += r.cost();
    }
    let finished = done + failed + cancelled;
    let elapsed = SystemTime::now()
        .duration_since(optiroute_common::nats::from_epoch_ms(meta.created_ms))
        .unwrap_or_default()
        .as_secs_f64();
    let left = meta.total.saturating_sub(finished);
    let processed = done + failed;
    let eta_seconds = (processed > 0 && left > 0 && !meta.cancelled)
        .then(|| elapsed / processed as f64 * left as f64);
    let status = if meta.cancelled {
        "cancelled"
    } else if finished >= meta.total {
        "completed"
    } else {
        "running"
    };
    BatchStatus {
        id: meta.id.clone(),
        object: "batch".into(),
        status: status.into(),
        total: meta.total,
        submitted: meta.submitted(),
        done,
        failed,
        cancelled,
        pending,
        cost_usd: cost,
        created_ms: meta.created_ms,
        eta_seconds,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_content_derived_and_validated() {
        assert_eq!(content_id(b"a"), content_id(b"a"));
        assert_ne!(content_id(b"a"), content_id(b"b"));
        assert!(validate_id(&content_id(b"x")).is_ok());
        assert!(validate_id("bad id").is_err());
        assert!(validate_id("a.b").is_err());
        assert!(validate_id("").is_err());
    }

    #[test]
    fn summary_counts_and_estimates() {
        let meta = BatchMeta {
            id: "b".into(),
            total: 4,
            invalid: 0,
            created_ms: epoch_ms(SystemTime::now()) - 10_000,
            cancelled: false,
            submitted: u64::MAX,
        };
        let r = |line, status| BatchResult {
            line,
            custom_id: None,
            status,
            response: None,
            error: None,
            attempts: 1,
        };
        let rs = [r(1, ResultStatus::Ok), r(2, ResultStatus::Error)];
        let s = summarize(&meta, rs.iter(), 2);
        assert_eq!((s.done, s.failed, s.pending), (1, 1, 2));
        assert_eq!(s.status, "running");
        let eta = s.eta_seconds.unwrap();
        assert!((9.0..12.0).contains(&eta), "{eta}");
        let all = [
            r(1, ResultStatus::Ok),
            r(2, ResultStatus::Ok),
            r(3, ResultStatus::Ok),
            r(4, ResultStatus::Error),
        ];
        let s = summarize(&meta, all.iter(), 0);
        assert_eq!(s.status, "completed");
        assert!(s.finished());
        assert_eq!(s.eta_seconds, None);
    }
}
