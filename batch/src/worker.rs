//! The batch worker: pulls jobs from the shared durable consumer, runs each
//! through the router path, stores its result, and only then acknowledges.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy, Consumer};
use async_nats::jetstream::{AckKind, Message};
use async_nats::Client;
use futures::StreamExt;
use optiroute_common::config::Config;
use optiroute_common::error::ErrorBody;
use optiroute_common::metrics::{counter_vec, gauge, new_registry};
use optiroute_common::nats::{self, RequestMeta};
use optiroute_common::subjects::Subjects;
use optiroute_common::wire::{Format, GenerateResponse};
use optiroute_common::{admin, Error, ErrorKind};
use prometheus::{IntCounterVec, IntGauge, Registry};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::client::BatchClient;
use crate::counters::{Counts, Tally};
use crate::model::{BatchResult, Job, ResultStatus, MAX_CUSTOM_ID_BYTES};

#[derive(Clone)]
pub struct BatchMetrics {
    pub registry: Registry,
    /// `optiroute_batch_jobs_total{outcome}`: ok, error, cancelled, retried.
    pub jobs: IntCounterVec,
    pub in_flight: IntGauge,
}

impl BatchMetrics {
    fn new() -> Self {
        let r = new_registry("batch");
        BatchMetrics {
            jobs: counter_vec(
                &r,
                "optiroute_batch_jobs_total",
                "Batch jobs handled, by outcome (ok, error, cancelled, retried; duplicate: its result existed, not run again; rejected: malformed subject, ended; out_of_range: line outside a submitted batch's lines, ended uncounted; store_failed: result not storable, ended).",
                &["outcome"],
            ),
            in_flight: gauge(
                &r,
                "optiroute_batch_in_flight_jobs",
                "Batch jobs being run now by this worker.",
            ),
            registry: r,
        }
    }
}

struct Ctx {
    client: Client,
    batches: BatchClient,
    generate_subject: String,
    request_timeout: Duration,
    route_bias: f32,
    max_deliver: i64,
    store_attempts: u32,
    backoff: Vec<Duration>,
    metrics: BatchMetrics,
    /// Cancelled by [`Running::abort`]: jobs stop where they are, unacknowledged.
    kill: CancellationToken,
    /// Counts finished here, written to the batch counters in the background.
    tally: Tally,
    /// What a batch's description says, by id, as read at most
    /// [`META_FRESH`] ago: one read per batch instead of one per job.
    metas: Mutex<HashMap<String, (Instant, Option<Described>)>>,
}

/// The parts of a batch's description a worker needs. A batch without a
/// description (jobs published directly by other systems) has none.
#[derive(Clone, Copy)]
struct Described {
    total: u64,
    cancelled: bool,
    /// SHA-256 of the batch's token, when it was submitted with a key.
    token_hash: Option<[u8; 32]>,
}

const META_FRESH: Duration = Duration::from_millis(500);

impl Ctx {
    async fn described(&self, id: &str) -> Result<Option<Described>, Error> {
        if let Ok(c) = self.metas.lock() {
            if let Some((at, v)) = c.get(id) {
                if at.elapsed() < META_FRESH {
                    return Ok(*v);
                }
            }
        }
        let v = match self.batches.meta(id).await {
            Ok(m) => Some(Described {
                total: m.total,
                cancelled: m.cancelled,
                token_hash: m.token_hash.as_deref().and_then(|h| {
                    let mut out = [0u8; 32];
                    hex::decode_to_slice(h, &mut out).ok().map(|()| out)
                }),
            }),
            Err(e) if e.kind == ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        if let Ok(mut c) = self.metas.lock() {
            if c.len() > 10_000 {
                c.clear();
            }
            c.insert(id.to_string(), (Instant::now(), v));
        }
        Ok(v)
    }
}

pub struct Running {
    pub admin_addr: SocketAddr,
    pub metrics: BatchMetrics,
    task: JoinHandle<Result<(), Error>>,
    kill: CancellationToken,
}

impl Running {
    pub async fn wait(self) -> Result<(), Error> {
        self.task
            .await
            .map_err(|e| Error::internal(format!("batch task: {e}")))?
    }

    /// Whether the worker has stopped (on its own, or after a shutdown).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops the worker at once, as a crash would: jobs in flight are not
    /// acknowledged and go to another worker after `ack_wait`.
    pub fn abort(self) {
        self.kill.cancel();
        self.task.abort();
    }
}

/// The batch worker as a process body for [`optiroute_common::cli::main`] (boxed here,
/// so the binary does not compile the async call tree again).
pub fn process(
    client: Client,
    cfg: Config,
    shutdown: CancellationToken,
) -> futures::future::BoxFuture<'static, Result<(), Error>> {
    Box::pin(async move { run(client, &cfg, shutdown).await?.wait().await })
}

/// Starts a batch worker; it keeps trying until JetStream is available.
pub async fn run(
    client: Client,
    cfg: &Config,
    shutdown: CancellationToken,
) -> Result<Running, Error> {
    let metrics = BatchMetrics::new();
    let ready = admin::nats_ready(client.clone(), || Ok(()));
    let admin_addr = admin::spawn(
        &cfg.batch.admin_listen,
        metrics.registry.clone(),
        ready,
        shutdown.clone(),
    )
    .await?;
    let cfg = cfg.clone();
    let m = metrics.clone();
    let kill = CancellationToken::new();
    let job_kill = kill.clone();
    let task = tokio::spawn(async move {
        let batches = loop {
            match BatchClient::open(client.clone(), &cfg).await {
                Ok(b) => break b,
                Err(e) => {
                    tracing::warn!(error = %e, "batch queue unavailable; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        let b = &cfg.batch;
        let tally = Tally::new();
        let ctx = Arc::new(Ctx {
            client,
            generate_subject: Subjects::new(&cfg.nats.prefix).generate,
            request_timeout: Duration::from_millis(b.request_timeout_ms),
            route_bias: b.route_bias,
            max_deliver: b.max_deliver.max(1),
            store_attempts: b.store_attempts.max(1),
            backoff: b
                .backoff_ms
                .iter()
                .map(|ms| Duration::from_millis(*ms))
                .collect(),
            metrics: m,
            tally: tally.clone(),
            metas: Mutex::new(HashMap::new()),
            batches,
            kill: job_kill,
        });
        let stop_tally = CancellationToken::new();
        let written = tally.run(
            ctx.batches.meta_store().clone(),
            Duration::from_millis(10),
            stop_tally.clone(),
        );
        let crashed = ctx.kill.clone();
        // An abort loses what was not written yet, as a crash would (the
        // status recounts; see `counters`).
        let writer = tokio::spawn(async move {
            tokio::select! {
                _ = written => {}
                _ = crashed.cancelled() => {}
            }
        });
        let result = consume(
            ctx,
            b.consumer.clone(),
            b.max_in_flight.max(1),
            Duration::from_millis(b.ack_wait_ms),
            shutdown,
        )
        .await;
        // The counts of every job acknowledged are written before the worker stops.
        stop_tally.cancel();
        if let Err(e) = writer.await {
            tracing::warn!(error = %e, "batch counter writer failed");
        }
        result
    });
    Ok(Running {
        admin_addr,
        metrics,
        task,
        kill,
    })
}

async fn consume(
    ctx: Arc<Ctx>,
    name: String,
    max_in_flight: usize,
    ack_wait: Duration,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let consumer: Consumer<pull::Config> = ctx
        .batches
        .jobs_stream()
        .get_or_create_consumer(
            &name,
            pull::Config {
                durable_name: Some(name.clone()),
                ack_policy: AckPolicy::Explicit,
                ack_wait,
                // Unlimited here: the worker counts deliveries itself and ends a
                // job with a stored error result, so the server never gives up
                // on a job silently.
                max_deliver: -1,
                filter_subject: ctx.batches.jobs_filter(),
                max_ack_pending: 100_000,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| Error::new(ErrorKind::NatsUnavailable, format!("batch consumer: {e}")))?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(max_in_flight)
        .messages()
        .await
        .map_err(|e| Error::new(ErrorKind::NatsUnavailable, format!("batch consumer: {e}")))?;
    tracing::info!(consumer = %name, max_in_flight, "batch worker consuming");
    let permits = Arc::new(Semaphore::new(max_in_flight));
    let heartbeat = (ack_wait / 3).max(Duration::from_millis(10));
    let tracker = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let msg = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = messages.next() => m,
        };
        match msg {
            Some(Ok(msg)) => {
                let ctx = ctx.clone();
                tracker.spawn(async move {
                    ctx.metrics.in_flight.inc();
                    tokio::select! {
                        _ = handle(&ctx, &msg) => {}
                        _ = keep_alive(&msg, heartbeat) => {}
                        _ = ctx.kill.cancelled() => {}
                    }
                    ctx.metrics.in_flight.dec();
                    drop(permit);
                });
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "batch pull failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            None => break,
        }
    }
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(30), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("batch drain timeout: unfinished jobs will be redelivered");
    }
    Ok(())
}

/// Restarts the job's ack timer every `every` (a third of `ack_wait`) for as
/// long as it is being handled: the request and the result's store loop
/// (with its backoff) may together outlast `ack_wait`, and a job whose
/// timer ran out would be delivered to another worker and paid twice.
/// Never returns; dropped when the job's handling ends.
async fn keep_alive(msg: &Message, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = msg.ack_with(AckKind::Progress).await {
            tracing::debug!(error = %e, "batch progress ack failed");
        }
    }
}

/// Runs one job. Every path ends in a stored result plus an ack, a nak
/// (a retryable failure: the job comes back later), or a termination (a job
/// that can never succeed, reported by a metric and a log); a job is never
/// acknowledged without a result, and never run when its result exists.
async fn handle(ctx: &Ctx, msg: &Message) {
    let (delivered, seq) = msg
        .info()
        .map(|i| (i.delivered, i.stream_sequence))
        .unwrap_or((1, 0));
    // Restart the ack timer: the job may have waited in the prefetch buffer.
    let _ = msg.ack_with(AckKind::Progress).await;
    // A subject that names no valid batch id: no result can be stored under
    // it, so the job is ended here, before any work.
    let batch_id = match ctx.batches.batch_id_of(msg.subject.as_str()) {
        Ok(id) => id.to_string(),
        Err(e) => {
            let subject: String = msg.subject.as_str().chars().take(200).collect();
            tracing::warn!(%subject, error = %e, "batch job on a malformed subject; terminated");
            terminate(ctx, msg, "rejected").await;
            return;
        }
    };
    let format = Format::from_headers(msg.headers.as_ref());
    let job = Job::decode(format, &msg.payload);
    let described = match ctx.described(&batch_id).await {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read a batch's description; the job will be retried");
            let _ = msg
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
            return;
        }
    };
    // A submitted batch's lines are 1..=total: a job outside them was
    // published straight onto its subject by someone else. It is neither
    // run nor counted, so it cannot change that batch's counts or cost.
    let credential = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(optiroute_common::protocol::headers::API_KEY))
        .map(|v| v.as_str().to_string());
    if let Some(d) = described {
        // A batch submitted with a key runs only jobs that carry its token:
        // another publisher cannot add work (or results) to it.
        if let Some(want) = d.token_hash {
            if !carries_token(credential.as_deref(), &batch_id, &want) {
                tracing::warn!(batch = %batch_id, "batch job without its batch's token; terminated");
                terminate(ctx, msg, "forbidden").await;
                return;
            }
        }
        let line = job.as_ref().map_or(0, |j| j.line);
        if line == 0 || line > d.total {
            tracing::warn!(batch = %batch_id, line, total = d.total, "batch job outside its batch's lines; terminated");
            terminate(ctx, msg, "out_of_range").await;
            return;
        }
    }
    let base = BatchResult {
        line: job.as_ref().map_or(0, |j| j.line),
        custom_id: None,
        status: ResultStatus::Error,
        response: None,
        error: None,
        attempts: delivered as u64,
    };
    let checked = job.and_then(|j| {
        j.validate_ids()?;
        j.request.validate(ctx.batches.max_prompt_bytes)?;
        Ok(j)
    });
    let job = match checked {
        Ok(j) => j,
        Err(e) => {
            // A direct publisher's mistake: one error result, never run. Kept
            // under its line when that is usable, else under
            // `<id>.invalid-<stream sequence>`.
            tracing::warn!(batch = %batch_id, error = %e, "invalid batch job");
            let custom_id = (base.line == 0).then(|| format!("invalid-{seq}"));
            finish(
                ctx,
                msg,
                &batch_id,
                BatchResult {
                    custom_id,
                    error: Some(ErrorBody::from(&e)),
                    ..base
                },
            )
            .await;
            return;
        }
    };
    let base = BatchResult {
        custom_id: job.custom_id.clone(),
        status: ResultStatus::Ok,
        ..base
    };
    // A job whose result exists already ran (its ack was lost, or the job
    // was published twice): acknowledge it, do not pay for it again.
    match ctx
        .batches
        .has_result(&BatchClient::result_key(&batch_id, &base))
        .await
    {
        Ok(true) => {
            ctx.metrics.jobs.with_label_values(&["duplicate"]).inc();
            if let Err(e) = msg.double_ack().await {
                tracing::warn!(error = %e, "batch ack failed");
            }
            return;
        }
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(error = %e, "cannot look up a batch result; the job will be retried");
            let _ = msg
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
            return;
        }
    }
    if described.is_some_and(|d| d.cancelled) {
        let error = ErrorBody {
            code: ErrorKind::Cancelled,
            message: "the batch was cancelled".into(),
            param: None,
            retry_after_secs: None,
            charged: None,
        };
        finish(
            ctx,
            msg,
            &batch_id,
            BatchResult {
                status: ResultStatus::Cancelled,
                error: Some(error),
                ..base
            },
        )
        .await;
        return;
    }
    let mut req = job.request;
    req.route_bias = Some((req.route_bias.unwrap_or(0.0) + ctx.route_bias).clamp(-1.0, 1.0));
    let mut meta = RequestMeta::new(format!("{batch_id}-{}", job.line), ctx.request_timeout);
    // The batch's credential: the router checks it and charges the owner.
    meta.api_key = credential;
    let answer: Result<GenerateResponse, Error> =
        nats::request(&ctx.client, &ctx.generate_subject, &meta, None, &req).await;
    match answer {
        Ok(r) => {
            finish(
                ctx,
                msg,
                &batch_id,
                BatchResult {
                    response: Some(r),
                    ..base
                },
            )
            .await
        }
        Err(e) if retryable(e.kind) && delivered < ctx.max_deliver => {
            let delay = ctx
                .backoff
                .get((delivered - 1).max(0) as usize)
                .or(ctx.backoff.last())
                .copied()
                .unwrap_or(Duration::from_secs(1));
            tracing::info!(batch = %batch_id, line = job.line, kind = %e.kind, ?delay, "batch job failed; will retry");
            ctx.metrics.jobs.with_label_values(&["retried"]).inc();
            if let Err(e) = msg.ack_with(AckKind::Nak(Some(delay))).await {
                tracing::warn!(error = %e, "nak failed; the job comes back after ack_wait");
            }
        }
        Err(e) => {
            finish(
                ctx,
                msg,
                &batch_id,
                BatchResult {
                    status: ResultStatus::Error,
                    error: Some(ErrorBody::from(&e)),
                    ..base
                },
            )
            .await
        }
    }
}

/// Whether `credential` is batch `id`'s credential with the token whose
/// SHA-256 is `want`.
fn carries_token(credential: Option<&str>, id: &str, want: &[u8; 32]) -> bool {
    use sha2::{Digest, Sha256};
    let Some((cid, token)) =
        credential.and_then(optiroute_common::protocol::headers::parse_batch_credential)
    else {
        return false;
    };
    cid == id && Sha256::digest(token.as_bytes()).as_slice() == want.as_slice()
}

fn retryable(kind: ErrorKind) -> bool {
    // A spent budget or a refused key is the line's result, not a fault
    // to retry: the line ends with it.
    !matches!(
        kind,
        ErrorKind::BadRequest
            | ErrorKind::UpstreamClientError
            | ErrorKind::NotFound
            | ErrorKind::BudgetExceeded
            | ErrorKind::InvalidApiKey
            | ErrorKind::PermissionDenied
    )
}

/// Ends a job for good (`outcome` counted): the server neither redelivers
/// nor keeps it.
async fn terminate(ctx: &Ctx, msg: &Message, outcome: &str) {
    ctx.metrics.jobs.with_label_values(&[outcome]).inc();
    if let Err(e) = msg.ack_with(AckKind::Term).await {
        tracing::warn!(error = %e, "batch term failed; the job comes back after ack_wait");
    }
}

/// Stores the result if the line has none, then acknowledges. A store that
/// keeps failing is tried `store_attempts` times, with backoff from 200 ms
/// doubling to 4 s (8 tries span about 15 s: a JetStream leader election
/// fits; progress acks keep the job meanwhile), in place (the job is not run
/// again); then the job ends with a short failed result if that can be
/// stored, else a log, and `store_failed` is counted.
async fn finish(ctx: &Ctx, msg: &Message, batch_id: &str, result: BatchResult) {
    // Capped once here (create_result would on each try).
    let result = result.with_capped_error();
    let outcome = match result.status {
        ResultStatus::Ok => "ok",
        ResultStatus::Cancelled => "cancelled",
        _ => "error",
    };
    let mut delay = Duration::from_millis(200);
    let mut last = None;
    for attempt in 1..=ctx.store_attempts {
        match ctx.batches.create_result(batch_id, &result).await {
            Ok(created) => {
                if let Some(revision) = created {
                    ctx.tally.record(batch_id, revision, Counts::of(&result));
                }
                let outcome = if created.is_some() {
                    outcome
                } else {
                    "duplicate"
                };
                ctx.metrics.jobs.with_label_values(&[outcome]).inc();
                if let Err(e) = msg.double_ack().await {
                    tracing::warn!(error = %e, "batch ack failed; a redelivery finds the result and is not run again");
                }
                return;
            }
            Err(e) => {
                tracing::warn!(batch = %batch_id, line = result.line, attempt, error = %e, "cannot store a batch result");
                last = Some(e);
            }
        }
        if attempt < ctx.store_attempts {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(4));
        }
    }
    let reason = last.map_or_else(String::new, |e| e.message);
    let failed = BatchResult {
        status: ResultStatus::Error,
        response: None,
        error: Some(ErrorBody {
            code: ErrorKind::Internal,
            message: format!(
                "the result could not be stored after {} attempts",
                ctx.store_attempts
            ),
            param: None,
            retry_after_secs: None,
            charged: None,
        }),
        custom_id: result.custom_id.filter(|c| c.len() <= MAX_CUSTOM_ID_BYTES),
        ..result
    };
    match ctx.batches.create_result(batch_id, &failed).await {
        Ok(Some(revision)) => ctx.tally.record(batch_id, revision, Counts::of(&failed)),
        Ok(None) => {}
        Err(e) => {
            tracing::error!(batch = %batch_id, line = failed.line, error = %e, %reason, "batch job ended without a stored result")
        }
    }
    terminate(ctx, msg, "store_failed").await;
}
