//! The serving side of request-reply: one NATS service endpoint in a queue
//! group, registered with the NATS service API (so `$SRV.PING/INFO/STATS`
//! and `nats micro` see it), decoding MessagePack or JSON, bounding
//! concurrency, replying with `Nats-Service-Error` headers plus a
//! `{code, message}` body on failure, and draining on shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use async_nats::service::ServiceExt;
use async_nats::{Client, HeaderMap};
use futures::StreamExt;
use serde::{de::DeserializeOwned, Serialize};
use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use crate::config::ServiceSettings;
use crate::error::{Error, ErrorBody, ErrorKind};
use crate::metrics::ServiceMetrics;
use crate::nats::{self, RequestMeta, NATS_SERVICE_ERROR, NATS_SERVICE_ERROR_CODE};
use crate::wire::{self, Format};

pub use crate::protocol::{CAPACITY_FIELD, IN_FLIGHT_FIELD};

/// Handles one decoded request.
pub trait Handler: Send + Sync + 'static {
    type Request: DeserializeOwned + Send + 'static;
    type Reply: Serialize + Send + 'static;

    fn handle(
        &self,
        meta: RequestMeta,
        request: Self::Request,
    ) -> impl Future<Output = Result<Self::Reply, Error>> + Send;
}

/// What a service adds to each endpoint's `$SRV.STATS` reply (its `data`
/// field), read whenever stats are asked for: e.g. the cloud pool's
/// breaker state, so the UI reads it instead of guessing it.
#[derive(Clone)]
pub struct StatsData(pub Arc<dyn Fn() -> serde_json::Value + Send + Sync>);

impl std::fmt::Debug for StatsData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StatsData")
    }
}

/// Where and how an endpoint is served.
#[derive(Debug, Clone)]
pub struct EndpointSpec {
    /// Service name for discovery (`nats micro ls`), e.g. `optiroute-router`.
    pub service: String,
    pub description: String,
    /// Endpoint name, e.g. `generate`.
    pub endpoint: String,
    pub subject: String,
    /// Queue group: every replica of a pool shares it.
    pub queue_group: String,
    /// Requests at once, the deadline of messages that carry none, and how
    /// long shutdown waits for the requests in flight.
    pub settings: ServiceSettings,
    /// Reply subjects (and stream inboxes) must lie under one of these
    /// (`NatsConfig::allowed_reply_prefixes`); anything else is refused.
    pub reply_prefixes: Vec<String>,
    /// Extra `$SRV.STATS` data, when the service has any.
    pub stats_data: Option<StatsData>,
}

/// Serves `spec.subject` until `shutdown` is cancelled, then stops intake and
/// waits (bounded) for the requests in flight.
pub async fn serve<H: Handler>(
    client: Client,
    spec: EndpointSpec,
    handler: Arc<H>,
    metrics: ServiceMetrics,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let builder = client
        .service_builder()
        .description(spec.description.clone())
        .queue_group(spec.queue_group.clone());
    // Every endpoint's stats carry its load (requests being served and how
    // many it serves at once), so routers and autoscalers can read it;
    // a service's own data (e.g. the cloud breaker) sits beside them.
    let permits = Arc::new(Semaphore::new(spec.settings.max_in_flight));
    let capacity = spec.settings.max_in_flight;
    let extra = spec.stats_data.clone();
    let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let gauge = busy.clone();
    let builder = builder.stats_handler(move |_endpoint, _stats| {
        let mut data = extra
            .as_ref()
            .map_or_else(|| serde_json::json!({}), |d| (d.0)());
        if let Some(o) = data.as_object_mut() {
            let in_flight = gauge.load(std::sync::atomic::Ordering::Relaxed);
            o.insert(IN_FLIGHT_FIELD.into(), in_flight.into());
            o.insert(CAPACITY_FIELD.into(), capacity.into());
        }
        data
    });
    let service = builder
        .start(spec.service.clone(), crate::VERSION)
        .await
        .map_err(|e| Error::internal(format!("cannot start service {}: {e}", spec.service)))?;
    let mut endpoint = service
        .endpoint_builder()
        .name(spec.endpoint.clone())
        .add(spec.subject.clone())
        .await
        .map_err(|e| Error::internal(format!("cannot add endpoint {}: {e}", spec.subject)))?;
    tracing::info!(subject = %spec.subject, queue_group = %spec.queue_group, "serving");

    let tracker = TaskTracker::new();
    let load = Arc::new(Load::default());
    tokio::spawn(report_load(
        load.clone(),
        busy.clone(),
        capacity,
        metrics.clone(),
        pool_label(&spec.service),
        shutdown.clone(),
    ));
    let metrics = Arc::new(EndpointMetrics::new(&metrics, &spec.service));
    let spec = Arc::new(spec);
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let request = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = endpoint.next() => match r {
                Some(r) => r,
                None => break,
            },
        };
        let handler = handler.clone();
        let metrics = metrics.clone();
        let spec = spec.clone();
        let load = load.clone();
        let busy = busy.clone();
        busy.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracker.spawn(async move {
            let started = Instant::now();
            handle_one(&*handler, &spec, &metrics, request).await;
            load.served(started.elapsed());
            busy.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            drop(permit);
        });
    }
    // Stop intake first, then let the work in flight finish.
    if let Err(e) = endpoint.stop().await {
        tracing::warn!(error = %e, "endpoint stop");
    }
    if let Err(e) = service.stop().await {
        tracing::warn!(error = %e, "service stop");
    }
    tracker.close();
    if tokio::time::timeout(spec.settings.drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            in_flight = tracker.len(),
            "drain timeout: abandoning requests in flight"
        );
    }
    tracing::info!(subject = %spec.subject, "stopped serving");
    Ok(())
}

/// The utilisation an autoscaler should aim a pool at.
pub const TARGET_UTILIZATION: f64 = 0.7;

/// How often the load gauges are refreshed (and over what window).
const LOAD_WINDOW: std::time::Duration = std::time::Duration::from_secs(5);

/// Service time of the requests served since the last report.
#[derive(Default)]
struct Load {
    busy_nanos: std::sync::atomic::AtomicU64,
}

impl Load {
    fn served(&self, took: std::time::Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        self.busy_nanos
            .fetch_add(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }
}

/// `optiroute-local` → `local`: the pool label of a service.
fn pool_label(service: &str) -> String {
    service.rsplit('-').next().unwrap_or(service).to_string()
}

/// Every [`LOAD_WINDOW`]: saturation (sampled every 100 ms and averaged)
/// and the replicas the pool needs by Little's law: arrivals × service
/// time ÷ capacity ÷ [`TARGET_UTILIZATION`].
async fn report_load(
    load: Arc<Load>,
    busy: Arc<std::sync::atomic::AtomicUsize>,
    capacity: usize,
    metrics: ServiceMetrics,
    pool: String,
    shutdown: CancellationToken,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let saturation = metrics.saturation.with_label_values(&[&pool]);
    let desired = metrics.desired_replicas.with_label_values(&[&pool]);
    let cap = capacity.max(1) as f64;
    loop {
        let mut busy_sum = 0.0;
        let samples = 50;
        for _ in 0..samples {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(LOAD_WINDOW / samples) => {}
            }
            busy_sum += busy.load(Relaxed) as f64;
        }
        saturation.set(busy_sum / f64::from(samples) / cap);
        let busy = load.busy_nanos.swap(0, Relaxed) as f64 / 1e9;
        // arrivals × mean service time = busy seconds per second.
        desired.set(busy / LOAD_WINDOW.as_secs_f64() / cap / TARGET_UTILIZATION);
    }
}

/// One endpoint's metric series, looked up once rather than per request.
struct EndpointMetrics {
    all: ServiceMetrics,
    ok: prometheus::IntCounter,
    duration: prometheus::Histogram,
    in_flight: prometheus::IntGauge,
}

impl EndpointMetrics {
    fn new(m: &ServiceMetrics, service: &str) -> Self {
        EndpointMetrics {
            all: m.clone(),
            ok: m.requests.with_label_values(&[service, "ok"]),
            duration: m.duration.with_label_values(&[service]),
            in_flight: m.in_flight.with_label_values(&[service]),
        }
    }

    fn finished(&self, service: &str, outcome: &str) {
        if outcome == "ok" {
            self.ok.inc();
        } else {
            self.all
                .requests
                .with_label_values(&[service, outcome])
                .inc();
        }
    }
}

async fn handle_one<H: Handler>(
    handler: &H,
    spec: &EndpointSpec,
    metrics: &EndpointMetrics,
    request: async_nats::service::Request,
) {
    let Some(reply) = request.message.reply.as_ref() else {
        // A plain publish, not a request: nobody would read the answer, so
        // spend nothing on it.
        tracing::warn!(subject = %request.message.subject, "message without a reply subject ignored; send a request");
        metrics.finished(&spec.service, "no_reply");
        return;
    };
    if !nats::is_allowed_reply(reply.as_str(), &spec.reply_prefixes) {
        // The reply would be published with this worker's rights (and
        // `allow_responses`) wherever the requester said: into a KV bucket
        // (`$KV.…`), the JetStream API (`$JS.…`), a job stream. Never
        // answer there, not even with an error.
        let shown: String = reply.as_str().chars().take(200).collect();
        tracing::warn!(subject = %request.message.subject, reply = %shown, "request dropped: its reply subject is not under nats.reply_prefixes");
        metrics.finished(&spec.service, "forbidden_reply");
        return;
    }
    let started = Instant::now();
    metrics.in_flight.inc();
    let headers = request.message.headers.as_ref();
    let format = Format::from_headers(headers);
    let meta = RequestMeta::from_headers(headers, spec.settings.default_deadline);
    let request_id = meta
        .as_ref()
        .map(|m| m.request_id.clone())
        .unwrap_or_default();
    let span = tracing::info_span!("request", request_id = %request_id, service = %spec.service);
    let result = async {
        let meta = meta?;
        if let Some(inbox) = &meta.stream_inbox {
            if !nats::is_allowed_reply(inbox, &spec.reply_prefixes) {
                return Err(Error::bad_request(format!(
                    "header {} must name an inbox under one of {:?}",
                    wire::STREAM_INBOX_HEADER,
                    spec.reply_prefixes
                )));
            }
        }
        if meta.remaining().is_zero() {
            return Err(Error::new(
                ErrorKind::Timeout,
                "deadline passed before the work started",
            ));
        }
        let decoded: H::Request = wire::decode(format, &request.message.payload)?;
        // Boxed: a handler's future is large (every await of its work is a
        // state), and an unboxed one is copied whole each time the task
        // that holds it moves (spawn, the task cell): measured at 11 % of
        // the router's time on cache hits before this.
        Box::pin(handler.handle(meta, decoded)).await
    }
    .instrument(span.clone())
    .await;

    let (outcome, body, reply_headers) = match result.and_then(|r| wire::encode(format, &r)) {
        Ok(body) => {
            let mut h = HeaderMap::new();
            if format == Format::Json {
                h.insert(wire::CONTENT_TYPE_HEADER, wire::JSON_CONTENT_TYPE);
            }
            ("ok", body, h)
        }
        Err(e) => {
            let _g = span.enter();
            if e.kind == ErrorKind::Internal {
                tracing::error!(error = %e, "request failed");
            } else {
                tracing::info!(kind = %e.kind, message = %e.message, "request refused");
            }
            let (h, body) = error_reply(format, &e);
            (e.kind.as_str(), body, h)
        }
    };
    if let Err(e) = request.respond_with_headers(Ok(body), reply_headers).await {
        let _g = span.enter();
        tracing::warn!(error = %e, "could not send reply");
    }
    metrics.finished(&spec.service, outcome);
    metrics.duration.observe(started.elapsed().as_secs_f64());
    metrics.in_flight.dec();
}

/// Headers and body of an error reply. Internal details stay in the logs.
pub fn error_reply(format: Format, e: &Error) -> (HeaderMap, bytes::Bytes) {
    let shown = if e.kind == ErrorKind::Internal {
        Error::internal("internal error")
    } else {
        e.clone()
    };
    let mut h = HeaderMap::new();
    // Header values must be one line.
    let one_line: String = shown
        .message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    h.insert(NATS_SERVICE_ERROR, one_line.as_str());
    h.insert(
        NATS_SERVICE_ERROR_CODE,
        shown.kind.status().to_string().as_str(),
    );
    if format == Format::Json {
        h.insert(wire::CONTENT_TYPE_HEADER, wire::JSON_CONTENT_TYPE);
    }
    let body = wire::encode(format, &ErrorBody::from(&shown)).unwrap_or_default();
    (h, body)
}
