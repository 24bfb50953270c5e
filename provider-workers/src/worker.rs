//! The provider worker: a NATS service endpoint that validates a
//! [`ProviderRequest`], runs its engine, prices the answer and counts it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::Client;
use optiroute_common::admin;
use optiroute_common::config::{CloudConfig, Config, LocalEngineKind, ServiceSettings};
use optiroute_common::cost::{cloud_cost, estimate_tokens, local_cost};
use optiroute_common::error::Charge;
use optiroute_common::nats::RequestMeta;
use optiroute_common::protocol::BREAKER_STATS_FIELD;
use optiroute_common::service::{self, EndpointSpec, Handler, StatsData};
use optiroute_common::subjects::Subjects;
use optiroute_common::wire::{Completion, Pool, ProviderReply, ProviderRequest, Usage};
use optiroute_common::{Error, ErrorKind};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::breaker::CircuitBreaker;
use crate::embedded::EmbeddedEngine;
use crate::engine::{ChunkSink, Engine, Generation};
use crate::metrics::ProviderMetrics;
use crate::openai::OpenAiClient;
use crate::simulated::SimulatedEngine;

/// The local pool's engine, chosen in config.
pub enum LocalEngine {
    Simulated(SimulatedEngine),
    OpenAi(OpenAiClient),
    Embedded(EmbeddedEngine),
}

impl Engine for LocalEngine {
    async fn generate(
        &self,
        meta: &RequestMeta,
        req: &ProviderRequest,
        sink: Option<&mut ChunkSink>,
    ) -> Result<Generation, Error> {
        match self {
            LocalEngine::Simulated(e) => e.generate(meta, req, sink).await,
            LocalEngine::OpenAi(c) => c
                .complete(req, &c.model, meta.remaining(), sink)
                .await
                .map_err(|f| f.error),
            LocalEngine::Embedded(e) => e.generate(meta, req, sink).await,
        }
    }

    fn ready(&self) -> Result<(), String> {
        match self {
            LocalEngine::Embedded(e) => e.ready(),
            _ => Ok(()),
        }
    }

    fn stats(&self) -> Option<serde_json::Value> {
        match self {
            LocalEngine::Embedded(e) => Some(e.stats()),
            _ => None,
        }
    }
}

/// The cloud pool's engine: an OpenAI-compatible client behind a circuit breaker.
pub struct CloudEngine {
    client: OpenAiClient,
    /// Shared with the service's `$SRV.STATS` data, which publishes its state.
    breaker: Arc<CircuitBreaker>,
    cfg: CloudConfig,
    upstream_errors: prometheus::IntCounterVec,
}

impl CloudEngine {
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    /// Models a caller may name: the configured one and those with prices.
    /// Anything else is refused, which also keeps metric labels bounded.
    fn model_for(&self, req: &ProviderRequest) -> Result<String, Error> {
        match &req.model_id {
            None => Ok(self.cfg.upstream.model.clone()),
            Some(m) if self.cfg.allows_model(m) => Ok(m.clone()),
            Some(m) => Err(Error::bad_param(
                "model_id",
                format!(
                    "model_id `{m}` is not configured for the cloud pool (configured: {})",
                    self.cfg.models().collect::<Vec<_>>().join(", ")
                ),
            )),
        }
    }
}

impl CloudEngine {
    /// One upstream call behind the breaker, streamed when `sink` is given.
    async fn call(
        &self,
        meta: &RequestMeta,
        req: &ProviderRequest,
        sink: Option<&mut ChunkSink>,
    ) -> Result<Generation, Error> {
        if !self.client.has_key() {
            return Err(Error::new(
                ErrorKind::NotConfigured,
                "the cloud pool has no API key (set HF_API_TOKEN or OPTIROUTE_CLOUD_API_KEY)",
            ));
        }
        let model = self.model_for(req)?;
        let permit = self.breaker.permit().map_err(|wait| {
            Error::new(
                ErrorKind::CircuitOpen,
                format!(
                    "cloud circuit breaker is open; next probe in {:.1}s",
                    wait.as_secs_f64()
                ),
            )
        })?;
        let result = self
            .client
            .complete(req, &model, meta.remaining(), sink)
            .await;
        match result {
            Ok(g) => {
                permit.success();
                Ok(g)
            }
            Err(f) => {
                self.upstream_errors
                    .with_label_values(&["cloud", f.error.kind.as_str()])
                    .inc();
                if f.upstream_fault {
                    permit.failure(f.retry_after);
                } else {
                    permit.neutral();
                }
                Err(f.error)
            }
        }
    }
}

impl Engine for CloudEngine {
    async fn generate(
        &self,
        meta: &RequestMeta,
        req: &ProviderRequest,
        sink: Option<&mut ChunkSink>,
    ) -> Result<Generation, Error> {
        self.call(meta, req, sink).await
    }

    fn ready(&self) -> Result<(), String> {
        if self.client.has_key() {
            Ok(())
        } else {
            Err("not_configured: no cloud API key (HF_API_TOKEN or OPTIROUTE_CLOUD_API_KEY)".into())
        }
    }
}

/// How a pool prices what it served.
enum Pricing {
    Local { price_per_second: f64 },
    Cloud(CloudConfig),
}

struct ProviderHandler<E> {
    client: Client,
    pool: Pool,
    engine: Arc<E>,
    pricing: Pricing,
    metrics: ProviderMetrics,
    max_prompt_bytes: usize,
    model: String,
    /// This replica's heartbeat (`<prefix>.alive.<pool>`): the routers fail
    /// at once the attempts it held when it stops.
    inflight: Arc<optiroute_common::liveness::InFlight>,
}

impl<E: Engine> Handler for ProviderHandler<E> {
    type Request = ProviderRequest;
    type Reply = ProviderReply;

    async fn handle(
        &self,
        meta: RequestMeta,
        req: ProviderRequest,
    ) -> Result<ProviderReply, Error> {
        let _held = self.inflight.hold(&meta.request_id);
        req.validate(self.max_prompt_bytes)?;
        let started = Instant::now();
        let g = match &meta.stream_inbox {
            None => self.engine.generate(&meta, &req, None).await?,
            Some(inbox) => self.generate_streaming(&meta, &req, inbox.clone()).await?,
        };
        let seconds = started.elapsed().as_secs_f64();
        let cost = match &self.pricing {
            Pricing::Local { price_per_second } => {
                local_cost(*price_per_second, g.compute_seconds.unwrap_or(seconds))
            }
            Pricing::Cloud(cfg) => cloud_cost(cfg, &g.model, &g.usage),
        };
        let pool = self.pool.as_str();
        let m = &self.metrics;
        let team = m.team_label(meta.team.as_deref());
        m.cost
            .with_label_values(&[pool, &g.model, &team])
            .inc_by(cost);
        m.tokens
            .with_label_values(&[pool, "input"])
            .inc_by(u64::from(g.usage.prompt_tokens));
        m.tokens
            .with_label_values(&[pool, "output"])
            .inc_by(u64::from(g.usage.completion_tokens));
        m.provider_latency
            .with_label_values(&[pool])
            .observe(seconds);
        Ok(ProviderReply {
            completion: Completion {
                text: g.text,
                usage: g.usage,
                model: g.model,
                finish_reason: g.finish_reason,
            },
            cost_usd: cost,
            latency: seconds,
        })
    }
}

impl<E: Engine> ProviderHandler<E> {
    /// Streams tokens to the requester's inbox, and stops generating (so
    /// stops spending) when the requester publishes on `<inbox>.cancel`.
    async fn generate_streaming(
        &self,
        meta: &RequestMeta,
        req: &ProviderRequest,
        inbox: String,
    ) -> Result<Generation, Error> {
        let cancel_subject = Subjects::cancel(&inbox);
        let mut cancel = self.client.subscribe(cancel_subject).await.map_err(|e| {
            Error::new(
                ErrorKind::NatsUnavailable,
                format!("cannot watch for cancellation: {e}"),
            )
        })?;
        let mut sink = ChunkSink::new(self.client.clone(), inbox);
        let started = Instant::now();
        let result = tokio::select! {
            r = self.engine.generate(meta, req, Some(&mut sink)) => r,
            _ = futures::StreamExt::next(&mut cancel) => {
                tracing::info!("requester cancelled the stream; generation stopped");
                Err(Error::new(ErrorKind::Cancelled, "the requester cancelled the stream"))
            }
        };
        let _ = cancel.unsubscribe().await;
        match result {
            // Tokens went out, so they were paid for: the error carries
            // what was spent up to there, and the router charges it.
            Err(e)
                if sink.started()
                    && (e.kind.allows_fallback() || e.kind == ErrorKind::Cancelled) =>
            {
                let (kind, message) = if e.kind == ErrorKind::Cancelled {
                    (e.kind, e.message)
                } else {
                    (
                        ErrorKind::StreamInterrupted,
                        format!("the stream broke after its first token: {}", e.message),
                    )
                };
                let charge = self.partial_charge(req, &sink, started.elapsed().as_secs_f64());
                let team = self.metrics.team_label(meta.team.as_deref());
                self.metrics
                    .cost
                    .with_label_values(&[self.pool.as_str(), &charge.model, &team])
                    .inc_by(charge.cost_usd);
                let mut err = Error::new(kind, message);
                err.charged = Some(Box::new(charge));
                Err(err)
            }
            other => other,
        }
    }

    /// What a stream that ended early cost: for the cloud, the prompt and
    /// the text streamed, in estimated tokens (about four bytes each, at
    /// least one per chunk); locally, the time it ran.
    fn partial_charge(&self, req: &ProviderRequest, sink: &ChunkSink, seconds: f64) -> Charge {
        let prompt = estimate_tokens(&req.text());
        let completion = sink.tokens_estimate();
        let usage = Usage::new(prompt, completion, true);
        let model = req.model_id.clone().unwrap_or_else(|| self.model.clone());
        let cost_usd = match &self.pricing {
            Pricing::Local { price_per_second } => local_cost(*price_per_second, seconds),
            Pricing::Cloud(cfg) => cloud_cost(cfg, &model, &usage),
        };
        Charge {
            pool: self.pool,
            model,
            usage,
            cost_usd,
        }
    }
}

/// A started worker: its admin address, its metrics, and the serving task.
pub struct Running {
    pub admin_addr: SocketAddr,
    pub metrics: ProviderMetrics,
    task: JoinHandle<Result<(), Error>>,
}

impl Running {
    /// Waits until the worker has stopped (after `shutdown` is cancelled).
    pub async fn wait(self) -> Result<(), Error> {
        self.task
            .await
            .map_err(|e| Error::internal(format!("worker task: {e}")))?
    }
}

fn spec(
    pool: Pool,
    subjects: &Subjects,
    settings: ServiceSettings,
    reply_prefixes: Vec<String>,
) -> EndpointSpec {
    EndpointSpec {
        service: subjects.provider_service(pool).to_string(),
        description: format!("OptiRoute {} provider pool", pool.as_str()),
        endpoint: "generate".into(),
        subject: subjects.provider(pool).to_string(),
        queue_group: subjects.provider_queue_group(pool),
        settings,
        reply_prefixes,
        stats_data: None,
    }
}

/// Everything that differs between the two pools.
struct PoolSetup<E> {
    pool: Pool,
    engine: E,
    pricing: Pricing,
    spec: EndpointSpec,
    /// The model named in a charge for a stream that broke off.
    model: String,
    /// Where this replica's heartbeat goes (`Subjects::pool_alive`).
    alive: String,
}

async fn start<E: Engine>(
    client: Client,
    setup: PoolSetup<E>,
    metrics: ProviderMetrics,
    shutdown: CancellationToken,
) -> Result<Running, Error> {
    let engine = Arc::new(setup.engine);
    let ready_engine = engine.clone();
    let ready = admin::nats_ready(client.clone(), move || ready_engine.ready());
    let admin_addr = admin::spawn(
        &setup.spec.settings.admin_listen,
        metrics.registry.clone(),
        ready,
        shutdown.clone(),
    )
    .await?;
    let inflight = Arc::new(optiroute_common::liveness::InFlight::default());
    optiroute_common::liveness::spawn_heartbeat(
        client.clone(),
        setup.alive.clone(),
        inflight.clone(),
        shutdown.clone(),
    );
    let handler = Arc::new(ProviderHandler {
        client: client.clone(),
        pool: setup.pool,
        engine,
        pricing: setup.pricing,
        metrics: metrics.clone(),
        max_prompt_bytes: setup.spec.settings.max_prompt_bytes,
        model: setup.model,
        inflight: inflight.clone(),
    });
    // The engine's load (the embedded engine's sequences, queue, tokens/s)
    // as the endpoint's `$SRV.STATS` data, unless the pool publishes its own.
    let mut spec = setup.spec;
    if spec.stats_data.is_none() {
        spec.stats_data = engine_stats(&handler.engine);
    }
    let task = tokio::spawn(service::serve(
        client,
        spec,
        handler,
        metrics.service.clone(),
        shutdown,
    ));
    Ok(Running {
        admin_addr,
        metrics,
        task,
    })
}

/// The engine's load as the endpoint's `$SRV.STATS` data, if it has one.
fn engine_stats<E: Engine>(engine: &Arc<E>) -> Option<StatsData> {
    engine.stats()?;
    let engine = Arc::clone(engine);
    Some(StatsData(Arc::new(move || {
        engine.stats().unwrap_or(serde_json::Value::Null)
    })))
}

/// The local pool worker as a process body for [`optiroute_common::cli::main`] (boxed here,
/// so the binary does not compile the async call tree again).
pub fn local_process(
    client: Client,
    cfg: Config,
    shutdown: CancellationToken,
) -> futures::future::BoxFuture<'static, Result<(), Error>> {
    Box::pin(async move { run_local(client, &cfg, shutdown).await?.wait().await })
}

/// Starts a local provider worker.
pub async fn run_local(
    client: Client,
    cfg: &Config,
    shutdown: CancellationToken,
) -> Result<Running, Error> {
    let metrics = ProviderMetrics::new("local");
    let c = &cfg.local;
    let kind = c.resolved_engine();
    if c.engine == LocalEngineKind::Auto {
        tracing::info!(
            engine = ?kind,
            model_path = %c.embedded.model_path,
            "local.engine = auto: {}",
            if kind == LocalEngineKind::Embedded {
                "the model file exists, using the embedded model"
            } else {
                "no model file (scripts/fetch-model.sh fetches it), using the simulated engine"
            }
        );
    }
    let engine = match kind {
        LocalEngineKind::Simulated | LocalEngineKind::Auto => {
            LocalEngine::Simulated(SimulatedEngine::new(c.simulated.clone()))
        }
        LocalEngineKind::Embedded => match crate::embedded::load(&c.embedded, &metrics).await {
            Ok(e) => LocalEngine::Embedded(e),
            // `auto` found a file it cannot use: say so, serve simulated.
            Err(e) if c.engine == LocalEngineKind::Auto => {
                tracing::warn!(error = %e.message, "local.engine = auto: the embedded model failed to load; using the simulated engine");
                LocalEngine::Simulated(SimulatedEngine::new(c.simulated.clone()))
            }
            Err(e) => {
                return Err(Error::bad_request(format!(
                    "config key `local.embedded.model_path`: {}",
                    e.message
                )))
            }
        },
        LocalEngineKind::Openai => {
            let mut client = OpenAiClient::new(&c.openai).map_err(|e| {
                Error::bad_request(format!("config key `local.openai`: {}", e.message))
            })?;
            client.upstream_duration =
                Some(metrics.upstream_duration.with_label_values(&["local"]));
            LocalEngine::OpenAi(client)
        }
    };
    let subjects = Subjects::new(&cfg.nats.prefix);
    let spec = spec(
        Pool::Local,
        &subjects,
        c.service(),
        cfg.nats.allowed_reply_prefixes(),
    );
    let setup = PoolSetup {
        pool: Pool::Local,
        engine,
        pricing: Pricing::Local {
            price_per_second: c.price_per_second,
        },
        spec,
        model: optiroute_common::protocol::models::local_models(cfg)
            .into_iter()
            .next()
            .unwrap_or_default(),
        alive: subjects.pool_alive(Pool::Local),
    };
    start(client, setup, metrics, shutdown).await
}

/// The cloud pool worker as a process body for [`optiroute_common::cli::main`] (boxed here,
/// so the binary does not compile the async call tree again).
pub fn cloud_process(
    client: Client,
    cfg: Config,
    shutdown: CancellationToken,
) -> futures::future::BoxFuture<'static, Result<(), Error>> {
    Box::pin(async move { run_cloud(client, &cfg, shutdown).await?.wait().await })
}

/// Starts a cloud provider worker.
pub async fn run_cloud(
    client: Client,
    cfg: &Config,
    shutdown: CancellationToken,
) -> Result<Running, Error> {
    let metrics = ProviderMetrics::new("cloud");
    let c = &cfg.cloud;
    let mut http = OpenAiClient::new(&c.upstream)
        .map_err(|e| Error::bad_request(format!("config key `cloud.upstream`: {}", e.message)))?;
    http.upstream_duration = Some(metrics.upstream_duration.with_label_values(&["cloud"]));
    if !http.has_key() {
        tracing::warn!("cloud pool has no API key: it will answer not_configured and the router will fall back to local");
    }
    let breaker = CircuitBreaker::new(
        c.breaker.failure_threshold,
        Duration::from_millis(c.breaker.open_ms),
        Duration::from_millis(c.breaker.max_open_ms),
        "cloud",
        metrics.breaker_state.clone(),
        metrics.breaker_transitions.clone(),
    );
    let breaker = Arc::new(breaker);
    let published = breaker.clone();
    let engine = CloudEngine {
        client: http,
        breaker,
        cfg: c.clone(),
        upstream_errors: metrics.upstream_errors.clone(),
    };
    let subjects = Subjects::new(&cfg.nats.prefix);
    let mut spec = spec(
        Pool::Cloud,
        &subjects,
        c.service(),
        cfg.nats.allowed_reply_prefixes(),
    );
    spec.stats_data = Some(StatsData(Arc::new(move || {
        let mut data = serde_json::Map::new();
        data.insert(
            BREAKER_STATS_FIELD.to_string(),
            published.state().as_str().into(),
        );
        serde_json::Value::Object(data)
    })));
    let setup = PoolSetup {
        pool: Pool::Cloud,
        engine,
        pricing: Pricing::Cloud(c.clone()),
        spec,
        model: c.upstream.model.clone(),
        alive: subjects.pool_alive(Pool::Cloud),
    };
    start(client, setup, metrics, shutdown).await
}
