//! Submitting, watching, collecting and cancelling batches: used by the
//! ingress (`/v1/batches`), the `optiroute batch` command and the workers.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, kv, stream};
use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use optiroute_common::config::{BatchConfig, Config};
use optiroute_common::error::ErrorBody;
use optiroute_common::nats::epoch_ms;
use optiroute_common::protocol::{headers, Subjects};
use optiroute_common::wire::{self, Format};
use optiroute_common::{Error, ErrorKind};
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::counters::{self, Counts};
use crate::model::{BatchMeta, BatchResult, BatchStatus, ResultStatus};
use crate::upload::{self, Record, Spool, UploadError};

pub struct BatchClient {
    js: jetstream::Context,
    pub cfg: BatchConfig,
    subjects: Subjects,
    pub max_prompt_bytes: usize,
    /// Uploads being read now (see [`Self::upload_permit`]).
    uploads: Arc<Semaphore>,
    jobs: stream::Stream,
    meta: kv::Store,
    results: kv::Store,
}

fn js_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::NatsUnavailable, format!("{what}: {e}"))
}

/// What a submission publishes: the lines after `resume_after`, and the
/// lines in `requeue` again.
struct Plan<'a> {
    resume_after: u64,
    owner: Option<&'a BatchOwner>,
    requeue: &'a HashMap<u64, u64>,
}

/// Who submits a batch: the key's id (kept in the batch's description)
/// and its secret (from which the batch's token is derived).
#[derive(Clone)]
pub struct BatchOwner {
    pub key_id: String,
    pub secret: String,
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

/// Lines between two checkpoints of a submission's progress.
const CHECKPOINT_LINES: u64 = 1_000;
/// Publishes awaiting their acknowledgement at once.
const PUBLISH_WINDOW: usize = 256;
/// Result reads in flight at once while streaming results.
const RESULT_READS: usize = 64;
/// Counters unchanged this long while nothing is queued mean a worker died
/// before writing its count: the status recounts.
const RECOUNT_AFTER: Duration = Duration::from_secs(5);

/// A submission refused or cut off.
#[derive(Debug)]
pub struct SubmitError {
    pub error: Error,
    /// A line, the line count or the upload is over its limit (HTTP 413).
    pub too_large: bool,
}

impl From<Error> for SubmitError {
    fn from(error: Error) -> Self {
        SubmitError {
            error,
            too_large: false,
        }
    }
}

impl From<UploadError> for SubmitError {
    fn from(e: UploadError) -> Self {
        let too_large = matches!(e, UploadError::TooLarge(_));
        SubmitError {
            error: e.into_error(),
            too_large,
        }
    }
}

impl BatchClient {
    /// Opens (creating when absent) the jobs stream and both buckets, with
    /// their limits and `batch.retention_hours`.
    pub async fn open(client: Client, cfg: &Config) -> Result<Self, Error> {
        let b = &cfg.batch;
        let js = jetstream::new(client);
        let subjects = Subjects::new(&cfg.nats.prefix);
        let retention = Duration::from_secs(b.retention_hours.saturating_mul(3600));
        let jobs = js
            .get_or_create_stream(stream::Config {
                name: b.stream.clone(),
                subjects: vec![subjects.batch_jobs()],
                retention: stream::RetentionPolicy::WorkQueue,
                duplicate_window: Duration::from_secs(3600).min(retention),
                max_age: retention,
                max_messages: b.max_queued_jobs,
                max_bytes: b.max_queue_bytes,
                discard: stream::DiscardPolicy::New,
                num_replicas: cfg.nats.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| js_error("batch stream", e))?;
        optiroute_common::nats::check_replicas(
            "batch stream",
            &b.stream,
            jobs.cached_info().config.num_replicas,
            cfg.nats.replicas,
        );
        let meta = open_bucket(
            &js,
            &b.meta_bucket,
            "OptiRoute batches",
            retention,
            b.max_meta_bytes,
            cfg.nats.replicas,
        )
        .await?;
        let results = open_bucket(
            &js,
            &b.results_bucket,
            "OptiRoute batch results",
            retention,
            b.max_results_bytes,
            cfg.nats.replicas,
        )
        .await?;
        Ok(BatchClient {
            js,
            cfg: b.clone(),
            subjects,
            max_prompt_bytes: cfg.router.max_prompt_bytes,
            uploads: Arc::new(Semaphore::new(b.max_concurrent_uploads)),
            jobs,
            meta,
            results,
        })
    }

    pub fn job_subject(&self, id: &str) -> String {
        self.subjects.batch_job(id)
    }

    /// Where workers pull from: every batch's jobs.
    pub fn jobs_filter(&self) -> String {
        self.subjects.batch_jobs()
    }

    pub fn jobs_stream(&self) -> &stream::Stream {
        &self.jobs
    }

    pub fn meta_store(&self) -> &kv::Store {
        &self.meta
    }

    /// A place among the uploads read at once (`batch.max_concurrent_uploads`),
    /// or an `overloaded` error at once when all are taken.
    pub fn upload_permit(&self) -> Result<OwnedSemaphorePermit, Error> {
        self.uploads.clone().try_acquire_owned().map_err(|_| {
            Error::new(
                ErrorKind::Overloaded,
                format!(
                    "too many batch uploads at once (limit {}); try again shortly",
                    self.cfg.max_concurrent_uploads
                ),
            )
        })
    }

    /// Submits a JSONL input held in memory (tests, small inputs); see
    /// [`Self::submit_stream`].
    pub async fn submit(&self, input: &[u8], id: Option<&str>) -> Result<BatchStatus, Error> {
        let chunk = Bytes::copy_from_slice(input);
        let body = futures::stream::iter([Ok::<_, std::convert::Infallible>(chunk)]);
        self.submit_stream(body, id).await.map_err(|e| e.error)
    }

    /// Submits a JSONL input read as a stream. Each non-blank line is one
    /// job; an invalid line becomes an error result at once. The input is
    /// read whole first (to a spool file, see [`crate::upload`]), so one
    /// over a limit publishes nothing. Submitting the same content (or the
    /// same `id`) again publishes nothing twice and completes a submission
    /// that was cut off: it resumes after the last line checkpointed, and
    /// the lines between are dropped as duplicates by the stream (message
    /// id `<id>:<line>`) or, later, by the worker (the result exists).
    pub async fn submit_stream<S, E>(
        &self,
        body: S,
        id: Option<&str>,
    ) -> Result<BatchStatus, SubmitError>
    where
        S: futures::Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        self.submit_stream_as(body, id, None).await
    }

    /// [`Self::submit_stream`] on behalf of an API key: the batch belongs
    /// to it, and every job carries the key (header `Optiroute-Api-Key`),
    /// so the routers check and charge it line by line.
    pub async fn submit_stream_as<S, E>(
        &self,
        body: S,
        id: Option<&str>,
        owner: Option<&BatchOwner>,
    ) -> Result<BatchStatus, SubmitError>
    where
        S: futures::Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        if let Some(i) = id {
            validate_id(i)?;
        }
        let mut spool = upload::spool(body, &self.cfg, self.max_prompt_bytes).await?;
        let id = id.map_or_else(|| spool.content_id.clone(), str::to_string);
        let meta = BatchMeta {
            id: id.clone(),
            total: spool.total,
            invalid: spool.invalid,
            created_ms: epoch_ms(SystemTime::now()),
            cancelled: false,
            submitted: 0,
            owner: owner.map(|o| o.key_id.clone()),
            token_hash: owner
                .map(|o| headers::batch_token_hash(&headers::batch_token(&o.secret, &id))),
        };
        let mut requeue = HashMap::new();
        let resume_after = match self
            .meta
            .create(&id, wire::encode(Format::Json, &meta)?)
            .await
        {
            Ok(_) => 0,
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                let known = self.meta(&id).await?;
                if known.owner != meta.owner {
                    // Another key's batch: as if it did not exist.
                    return Err(Error::new(ErrorKind::NotFound, format!("no batch `{id}`")).into());
                }
                if known.total != spool.total {
                    return Err(Error::bad_request(format!(
                        "batch `{id}` already exists with {} lines; this input has {}",
                        known.total, spool.total
                    ))
                    .into());
                }
                let done = known.submitted();
                requeue = self.requeue_over_budget(&id, done).await?;
                done
            }
            Err(e) => return Err(js_error("batch meta", e).into()),
        };
        if resume_after < spool.total || !requeue.is_empty() {
            let plan = Plan {
                resume_after,
                owner,
                requeue: &requeue,
            };
            if let Err(e) = self.publish(&id, &mut spool, &plan).await {
                let done = self.meta(&id).await.map_or(0, |m| m.submitted());
                tracing::warn!(batch = %id, submitted = done, total = spool.total, error = %e, "batch submission cut off");
                return Err(Error::new(
                    e.kind,
                    format!(
                        "the submission of batch `{id}` stopped after {done} of {} lines ({}); \
                         submit the same input again to complete it",
                        spool.total, e.message
                    ),
                )
                .into());
            }
        }
        Ok(self.status(&id).await?)
    }

    /// Publishes the spooled jobs after line `resume_after`, stores the
    /// invalid lines' results, and checkpoints `submitted` every
    /// [`CHECKPOINT_LINES`] lines once everything before is acknowledged.
    async fn publish(&self, id: &str, spool: &mut Spool, plan: &Plan<'_>) -> Result<(), Error> {
        let (resume_after, owner) = (plan.resume_after, plan.owner);
        let subject = self.job_subject(id);
        let mut acks = Vec::with_capacity(PUBLISH_WINDOW);
        let mut invalid: Vec<counters::Delta> = Vec::new();
        while let Some(record) = spool.next().await? {
            let line = match record {
                Record::Job { line, .. } | Record::Invalid { line, .. } => line,
            };
            let again = plan.requeue.get(&line);
            if line <= resume_after && again.is_none() {
                continue;
            }
            match record {
                Record::Job { line, body } => {
                    let mut h = HeaderMap::new();
                    // A line run again gets its own message id: the failed
                    // result's revision, the same for every resubmission
                    // racing to rerun it (the stream keeps one).
                    let msg_id = match again {
                        Some(rev) => format!("{id}:{line}:r{rev}"),
                        None => format!("{id}:{line}"),
                    };
                    h.insert(headers::NATS_MSG_ID, msg_id.as_str());
                    if let Some(o) = owner {
                        // The batch's token, never the key itself.
                        let token = headers::batch_token(&o.secret, id);
                        h.insert(
                            headers::API_KEY,
                            headers::batch_credential(id, &token).as_str(),
                        );
                    }
                    let ack = self
                        .js
                        .publish_with_headers(subject.clone(), h, body)
                        .await
                        .map_err(|e| js_error("batch publish", e))?;
                    acks.push(ack);
                    if acks.len() >= PUBLISH_WINDOW {
                        for a in acks.drain(..) {
                            a.await.map_err(|e| js_error("batch publish", e))?;
                        }
                    }
                }
                Record::Invalid { line, error } => {
                    let r = BatchResult {
                        line,
                        custom_id: None,
                        status: ResultStatus::Error,
                        response: None,
                        error: Some(ErrorBody::from(&error)),
                        attempts: 0,
                    };
                    if let Some(revision) = self.create_result(id, &r).await? {
                        invalid.push((revision, Counts::of(&r)));
                    }
                }
            }
            if line % CHECKPOINT_LINES == 0 || line == spool.total {
                for a in acks.drain(..) {
                    a.await.map_err(|e| js_error("batch publish", e))?;
                }
                if !invalid.is_empty() {
                    counters::add(&self.meta, id, &invalid).await?;
                    invalid.clear();
                }
                self.update_meta(id, |m| m.submitted = m.submitted.max(line).min(m.total))
                    .await?;
            }
        }
        Ok(())
    }

    /// Changes a batch's description with compare-and-set (bounded retries
    /// with backoff); the new description.
    async fn update_meta(&self, id: &str, f: impl Fn(&mut BatchMeta)) -> Result<BatchMeta, Error> {
        let mut delay = Duration::from_millis(10);
        let mut last = String::new();
        for _ in 0..20 {
            let entry = self
                .meta
                .entry(id)
                .await
                .map_err(|e| js_error("batch meta", e))?;
            let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
                return Err(Error::new(ErrorKind::NotFound, format!("no batch `{id}`")));
            };
            let mut meta: BatchMeta = wire::decode(Format::Json, &entry.value)?;
            f(&mut meta);
            match self
                .meta
                .update(id, wire::encode(Format::Json, &meta)?, entry.revision)
                .await
            {
                Ok(_) => return Ok(meta),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
        }
        Err(js_error("batch meta", last))
    }

    /// One line's result, whether or not the batch has a description
    /// (jobs published straight to the stream by other systems).
    pub async fn result(&self, id: &str, line: u64) -> Result<Option<BatchResult>, Error> {
        validate_id(id)?;
        self.result_at(&format!("{id}.{line}")).await
    }

    async fn result_at(&self, key: &str) -> Result<Option<BatchResult>, Error> {
        read_result(&self.results, key).await
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

    /// Stores a result if the line has none yet: `Ok(Some(revision))` when
    /// this call stored it (the revision its count carries, see
    /// [`counters`]), `Ok(None)` when one was already there (kept as it is).
    /// An error message over [`crate::model::MAX_ERROR_MESSAGE_BYTES`] is
    /// stored capped, so no message makes a result too big to store.
    pub async fn create_result(&self, id: &str, r: &BatchResult) -> Result<Option<u64>, Error> {
        let body = if r.error_too_long() {
            wire::encode(Format::MsgPack, &r.clone().with_capped_error())?
        } else {
            wire::encode(Format::MsgPack, r)?
        };
        match self.results.create(Self::result_key(id, r), body).await {
            Ok(revision) => Ok(Some(revision)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
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
        let id = self
            .subjects
            .batch_id_of(subject)
            .ok_or_else(|| Error::bad_request("not a batch job subject"))?;
        validate_id(id)?;
        Ok(id)
    }

    /// Jobs of a batch still in the queue (one subject: one count).
    async fn queued(&self, id: &str) -> Result<u64, Error> {
        let mut subjects = self
            .jobs
            .info_with_subjects(self.job_subject(id))
            .await
            .map_err(|e| js_error("stream info", e))?;
        let mut n = 0u64;
        while let Some(s) = subjects.next().await {
            n += s.map_err(|e| js_error("stream info", e))?.1 as u64;
        }
        Ok(n)
    }

    /// Progress of a batch from its description, its counters and its
    /// queue: three reads, whatever the batch's size.
    pub async fn status(&self, id: &str) -> Result<BatchStatus, Error> {
        let meta = self.meta(id).await?;
        let (mut counts, _) = counters::read(&self.meta, id).await?;
        let pending = self.queued(id).await?;
        let stale = epoch_ms(SystemTime::now())
            .saturating_sub(counts.updated_ms.max(meta.created_ms))
            > RECOUNT_AFTER.as_millis() as u64;
        if !meta.cancelled
            && meta.submitted() >= meta.total
            && pending == 0
            && counts.finished() < meta.total
            && !counts.verified
            && stale
        {
            counts = self.recount(id, &meta).await?;
        }
        Ok(summarize(&meta, &counts, pending))
    }

    /// Counts the stored results again and writes the counters (marked
    /// verified): for a worker that died between a result and its count.
    /// Written only if no count landed meanwhile (then those counters are
    /// returned, untouched); see the invariant in [`counters`].
    pub async fn recount(&self, id: &str, meta: &BatchMeta) -> Result<Counts, Error> {
        tracing::info!(batch = %id, "batch counters short while nothing is queued; recounting");
        let (_, before) = counters::read(&self.meta, id).await?;
        let through = self
            .results
            .stream
            .get_info()
            .await
            .map_err(|e| js_error("batch results info", e))?
            .state
            .last_sequence;
        let mut fresh = Counts {
            verified: true,
            counted_through: through,
            ..Counts::default()
        };
        let id_owned = id.to_string();
        let store = self.results.clone();
        let mut entries = std::pin::pin!(futures::stream::iter(1..=meta.total)
            .map(move |line| {
                let key = format!("{id_owned}.{line}");
                let store = store.clone();
                async move { read_entry(&store, &key).await }
            })
            .buffered(RESULT_READS));
        while let Some(e) = entries.next().await {
            if let Some((revision, r)) = e? {
                if revision <= through {
                    fresh.add(&Counts::of(&r));
                }
            }
        }
        fresh.updated_ms = epoch_ms(SystemTime::now());
        if counters::replace(&self.meta, id, &fresh, before).await? {
            Ok(fresh)
        } else {
            tracing::info!(batch = %id, "batch counters changed while recounting; kept");
            Ok(counters::read(&self.meta, id).await?.0)
        }
    }

    /// The stored result of each line 1..=total, in order (`None`: none yet),
    /// read a bounded number at a time.
    fn stored_results(
        &self,
        id: &str,
        total: u64,
    ) -> impl futures::Stream<Item = Result<Option<BatchResult>, Error>> + Send + 'static {
        let id = id.to_string();
        let store = self.results.clone();
        futures::stream::iter(1..=total)
            .map(move |line| {
                let key = format!("{id}.{line}");
                let store = store.clone();
                async move { read_result(&store, &key).await }
            })
            .buffered(RESULT_READS)
    }

    /// One result per input line, in input order, as a stream; lines not
    /// finished yet are listed as `pending` (`cancelled` in a cancelled batch).
    pub async fn results_stream(
        &self,
        id: &str,
    ) -> Result<impl futures::Stream<Item = Result<BatchResult, Error>> + Send + 'static, Error>
    {
        let meta = self.meta(id).await?;
        let (cancelled, total) = (meta.cancelled, meta.total);
        let mut line = 0u64;
        Ok(self.stored_results(id, total).map(move |r| {
            line += 1;
            Ok(r?.unwrap_or_else(|| unfinished(line, cancelled)))
        }))
    }

    /// [`Self::results_stream`], collected.
    pub async fn results(&self, id: &str) -> Result<Vec<BatchResult>, Error> {
        self.results_stream(id).await?.try_collect().await
    }

    /// Marks the batch cancelled (retried with backoff, within
    /// `batch.cancel_timeout_ms`). Jobs running finish; the workers end its
    /// queued jobs as `cancelled` results without running them, and lines
    /// never run count as `cancelled` at once. Nothing is purged: a purge's
    /// subject filter travels in its body, so the right to purge one
    /// batch's jobs would be the right to purge every batch's, and the
    /// internet-facing ingress does not get it.
    pub async fn cancel(&self, id: &str) -> Result<BatchStatus, Error> {
        validate_id(id)?;
        let limit = Duration::from_millis(self.cfg.cancel_timeout_ms);
        let steps = async {
            self.update_meta(id, |m| m.cancelled = true).await?;
            self.status(id).await
        };
        tokio::time::timeout(limit, steps).await.map_err(|_| {
            Error::new(
                ErrorKind::Timeout,
                format!(
                    "cancelling batch `{id}` did not finish within {} ms; try again",
                    limit.as_millis()
                ),
            )
        })?
    }
}

/// A stored result and its revision.
async fn read_entry(store: &kv::Store, key: &str) -> Result<Option<(u64, BatchResult)>, Error> {
    match store.entry(key).await {
        Ok(Some(e)) if e.operation == kv::Operation::Put => {
            Ok(Some((e.revision, wire::decode(Format::MsgPack, &e.value)?)))
        }
        Ok(_) => Ok(None),
        Err(e) => Err(js_error("batch result", e)),
    }
}

async fn read_result(store: &kv::Store, key: &str) -> Result<Option<BatchResult>, Error> {
    match store.get(key).await {
        Ok(Some(b)) => Ok(Some(wire::decode(Format::MsgPack, &b)?)),
        Ok(None) => Ok(None),
        Err(e) => Err(js_error("batch result", e)),
    }
}

fn unfinished(line: u64, cancelled: bool) -> BatchResult {
    let (status, error) = if cancelled {
        let error = ErrorBody {
            code: ErrorKind::Cancelled,
            message: "the batch was cancelled".into(),
            param: None,
            retry_after_secs: None,
            charged: None,
        };
        (ResultStatus::Cancelled, Some(error))
    } else {
        (ResultStatus::Pending, None)
    };
    BatchResult {
        line,
        custom_id: None,
        status,
        response: None,
        error,
        attempts: 0,
    }
}

async fn open_bucket(
    js: &jetstream::Context,
    name: &str,
    description: &str,
    max_age: Duration,
    max_bytes: i64,
    replicas: usize,
) -> Result<kv::Store, Error> {
    if let Ok(store) = js.get_key_value(name).await {
        if let Ok(status) = store.status().await {
            optiroute_common::nats::check_replicas(
                "batch bucket",
                &status.info.config.name,
                status.info.config.num_replicas,
                replicas,
            );
        }
        return Ok(store);
    }
    js.create_key_value(kv::Config {
        bucket: name.to_string(),
        description: description.to_string(),
        history: 1,
        max_age,
        max_bytes,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| js_error(&format!("bucket {name}"), e))
}

/// Status from a batch's description, its counters and its queued jobs.
/// Lines of a cancelled batch that never ran count as cancelled.
pub fn summarize(meta: &BatchMeta, counts: &Counts, pending: u64) -> BatchStatus {
    let done = counts.done;
    // After a recount with nothing queued, a line without a result never
    // gets one (its job was ended unstored, which was logged): failed.
    let lost = if counts.verified && pending == 0 && meta.submitted() >= meta.total {
        meta.total.saturating_sub(counts.finished())
    } else {
        0
    };
    let failed = counts.failed + lost;
    let cancelled = if meta.cancelled {
        meta.total.saturating_sub(done + failed)
    } else {
        counts.cancelled
    };
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
    } else if meta.submitted() < meta.total {
        "incomplete"
    } else if finished >= meta.total && pending == 0 {
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
        cost_usd: counts.cost_usd,
        created_ms: meta.created_ms,
        eta_seconds,
    }
}

mod requeue;
#[cfg(test)]
mod tests;
