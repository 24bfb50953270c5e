//! The `optiroute.generate` handler: validate, cache, route, call a
//! provider pool, fall back, write the cache, reply.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::Client;
use optiroute_common::admin;
use optiroute_common::config::Config;
use optiroute_common::nats::{self, RequestMeta};
use optiroute_common::service::{self, EndpointSpec, Handler};
use optiroute_common::subjects::Subjects;
use optiroute_common::wire::{
    GenerateRequest, GenerateResponse, Pool, ProviderReply, ProviderRequest,
};
use optiroute_common::{Error, ErrorKind};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::cache::{cache_key, Cache, CachedAnswer, Claim, Join, Lookup, Marker};
use crate::metrics::{CacheEvent, RouterMetrics};
use crate::routing::Router;

/// How much earlier than the router a provider gives up on an attempt.
const PROVIDER_GRACE: Duration = Duration::from_millis(250);

pub struct GenerateHandler {
    client: Client,
    subjects: Subjects,
    router: Router,
    cache: Arc<Cache>,
    metrics: RouterMetrics,
    max_prompt_bytes: usize,
    provider_timeout: Duration,
    log_payloads: bool,
}

impl Handler for GenerateHandler {
    type Request = GenerateRequest;
    type Reply = GenerateResponse;

    async fn handle(
        &self,
        meta: RequestMeta,
        req: GenerateRequest,
    ) -> Result<GenerateResponse, Error> {
        req.validate(self.max_prompt_bytes)?;
        let started = Instant::now();
        if self.log_payloads {
            tracing::debug!(prompt = %req.prompt, "prompt");
        }
        if !self.cache.enabled() || !(req.cache.reads() || req.cache.writes()) {
            self.metrics.cache_event(CacheEvent::Bypass);
            return self.generate(&meta, &req, started).await.map(|(r, _)| r);
        }
        let key = cache_key(&req);
        if !req.cache.reads() {
            self.metrics.cache_event(CacheEvent::Bypass);
            return self
                .generate_and_store(&meta, &req, started, &key, None)
                .await;
        }
        if let Lookup::Hit(hit) = self.cache.lookup(&key).await {
            self.metrics
                .cost_saved
                .with_label_values(&[hit.provider.as_str()])
                .inc_by(hit.cost);
            return Ok(from_cache(&hit, started, &meta));
        }
        match self.cache.join(&key) {
            Join::Leader(guard) => {
                // Only a request that will write its answer may hold others waiting.
                let claim = if req.cache.writes() {
                    self.cache.claim(&key, meta.deadline).await
                } else {
                    Claim::Proceed
                };
                let result = match claim {
                    Claim::Owner(marker) => {
                        self.generate_and_store(&meta, &req, started, &key, Some(marker))
                            .await
                    }
                    Claim::Answer(answer) => {
                        self.metrics.cache_event(CacheEvent::Coalesced);
                        self.metrics
                            .cost_saved
                            .with_label_values(&[answer.provider.as_str()])
                            .inc_by(answer.cost);
                        Ok(from_cache(&answer, started, &meta))
                    }
                    Claim::Proceed => {
                        self.generate_and_store(&meta, &req, started, &key, None)
                            .await
                    }
                };
                guard.finish(&result);
                result
            }
            Join::Follower(mut rx) => {
                let waited = tokio::time::timeout(meta.remaining(), rx.recv()).await;
                match waited {
                    Ok(Ok(Ok(mut shared))) => {
                        self.metrics.cache_event(CacheEvent::Coalesced);
                        self.metrics
                            .cost_saved
                            .with_label_values(&[shared.provider.as_str()])
                            .inc_by(shared.cost);
                        // The leader paid for it; this request cost nothing more.
                        shared.cost = 0.0;
                        shared.cached = true;
                        shared.latency = started.elapsed().as_secs_f64();
                        shared.request_id = Some(meta.request_id.clone());
                        Ok(shared)
                    }
                    // Only errors about the request itself are shared: a leader's
                    // timeout, cancellation or outage says nothing about this one.
                    Ok(Ok(Err(e)))
                        if matches!(
                            e.kind,
                            ErrorKind::BadRequest | ErrorKind::UpstreamClientError
                        ) =>
                    {
                        Err(e)
                    }
                    Ok(Ok(Err(_))) => {
                        self.generate_and_store(&meta, &req, started, &key, None)
                            .await
                    }
                    // The leader went away without an answer: do the work ourselves.
                    Ok(Err(_)) => {
                        self.generate_and_store(&meta, &req, started, &key, None)
                            .await
                    }
                    Err(_) => Err(Error::new(
                        ErrorKind::Timeout,
                        "deadline passed waiting for an identical request in flight",
                    )),
                }
            }
        }
    }
}

fn from_cache(hit: &CachedAnswer, started: Instant, meta: &RequestMeta) -> GenerateResponse {
    GenerateResponse {
        text: hit.text.clone(),
        usage: hit.usage,
        cost: 0.0,
        latency: started.elapsed().as_secs_f64(),
        model: hit.model.clone(),
        routed_to: hit.routed_to,
        provider: hit.provider,
        cached: true,
        fallback_reason: None,
        route_reason: hit.route_reason.clone(),
        request_id: Some(meta.request_id.clone()),
        finish_reason: hit.finish_reason.clone(),
    }
}

impl GenerateHandler {
    /// Generates, then (in the background, after the reply) writes a good
    /// answer to the cache over this router's placeholder, or removes the
    /// placeholder when there is nothing to cache, so waiting replicas move on.
    async fn generate_and_store(
        &self,
        meta: &RequestMeta,
        req: &GenerateRequest,
        started: Instant,
        key: &str,
        marker: Option<Box<Marker>>,
    ) -> Result<GenerateResponse, Error> {
        let (result, answer) = match self.generate(meta, req, started).await {
            Ok((response, answer)) => (Ok(response), answer.filter(|_| req.cache.writes())),
            Err(e) => (Err(e), None),
        };
        if answer.is_some() || marker.is_some() {
            let cache = self.cache.clone();
            let key = key.to_string();
            tokio::spawn(
                async move {
                    let stored = match answer {
                        Some(a) => cache.store(&key, a).await,
                        None => false,
                    };
                    // The answer replaced our placeholder; without one, remove it.
                    if let (false, Some(m)) = (stored, marker) {
                        m.release().await;
                    }
                }
                .in_current_span(),
            );
        }
        result
    }

    /// Routes, calls the chosen pool and falls back to the other one when
    /// the failure allows it. Also returns what to cache: only first-choice
    /// answers, so the better pool is tried again once it recovers.
    async fn generate(
        &self,
        meta: &RequestMeta,
        req: &GenerateRequest,
        started: Instant,
    ) -> Result<(GenerateResponse, Option<CachedAnswer>), Error> {
        let decision = self.router.decide(req);
        self.metrics
            .route_decisions
            .with_label_values(&[decision.target.as_str(), decision.reason_label])
            .inc();
        tracing::debug!(target_pool = decision.target.as_str(), reason = %decision.reason, "routed");
        let preq = ProviderRequest::from(req);
        let first = self.call(meta, decision.target, &preq).await;
        let (reply, provider, fallback_reason) = match first {
            Ok(reply) => (reply, decision.target, None),
            Err(e) if !e.kind.allows_fallback() => return Err(e),
            Err(first_err) => {
                let other = decision.target.other();
                self.metrics
                    .fallbacks
                    .with_label_values(&[
                        decision.target.as_str(),
                        other.as_str(),
                        first_err.kind.as_str(),
                    ])
                    .inc();
                tracing::info!(from = decision.target.as_str(), reason = %first_err.kind, detail = %first_err.message, "falling back");
                match self.call(meta, other, &preq).await {
                    Ok(reply) => (reply, other, Some(first_err.kind)),
                    Err(e) if !e.kind.allows_fallback() => return Err(e),
                    Err(second_err) => {
                        let kind = if meta.remaining().is_zero() {
                            ErrorKind::Timeout
                        } else if first_err.kind == second_err.kind
                            && matches!(
                                first_err.kind,
                                ErrorKind::NoResponders | ErrorKind::NatsUnavailable
                            )
                        {
                            first_err.kind
                        } else {
                            ErrorKind::AllProvidersFailed
                        };
                        return Err(Error::new(
                            kind,
                            format!(
                                "{} pool: {}; {} pool: {}",
                                decision.target.as_str(),
                                first_err.kind,
                                other.as_str(),
                                second_err.kind
                            ),
                        ));
                    }
                }
            }
        };
        let response = GenerateResponse {
            text: reply.text,
            usage: reply.usage,
            cost: reply.cost_usd,
            latency: started.elapsed().as_secs_f64(),
            model: reply.model,
            routed_to: decision.target,
            provider,
            cached: false,
            fallback_reason,
            route_reason: Some(decision.reason),
            request_id: Some(meta.request_id.clone()),
            finish_reason: reply.finish_reason,
        };
        let answer = fallback_reason.is_none().then(|| CachedAnswer {
            text: response.text.clone(),
            usage: response.usage,
            model: response.model.clone(),
            provider,
            routed_to: decision.target,
            cost: response.cost,
            route_reason: response.route_reason.clone(),
            finish_reason: response.finish_reason.clone(),
        });
        Ok((response, answer))
    }

    async fn call(
        &self,
        meta: &RequestMeta,
        pool: Pool,
        req: &ProviderRequest,
    ) -> Result<ProviderReply, Error> {
        let started = Instant::now();
        // The provider gets this attempt's deadline, not the whole request's,
        // so it stops working when the router stops waiting; and a little
        // earlier than that, so its own verdict (a timeout before the first
        // token, which may fall back, or a broken stream, which may not)
        // reaches the router before the router gives up on it.
        let now = std::time::SystemTime::now();
        let wait_until = meta.deadline.min(now + self.provider_timeout);
        let wait = wait_until.duration_since(now).unwrap_or_default();
        let grace = if wait > PROVIDER_GRACE * 4 {
            PROVIDER_GRACE
        } else {
            Duration::ZERO
        };
        let attempt = RequestMeta {
            request_id: meta.request_id.clone(),
            deadline: wait_until - grace,
            stream_inbox: meta.stream_inbox.clone(),
        };
        let result = nats::request(
            &self.client,
            self.subjects.provider(pool),
            &attempt,
            Some(wait),
            req,
        )
        .await;
        self.metrics
            .provider_request
            .with_label_values(&[pool.as_str()])
            .observe(started.elapsed().as_secs_f64());
        result
    }
}

/// A started router: its admin address, its metrics, and the serving task.
pub struct Running {
    pub admin_addr: SocketAddr,
    pub metrics: RouterMetrics,
    pub cache: Arc<Cache>,
    task: JoinHandle<Result<(), Error>>,
}

impl Running {
    pub async fn wait(self) -> Result<(), Error> {
        self.task
            .await
            .map_err(|e| Error::internal(format!("router task: {e}")))?
    }
}

/// The router worker as a process body for [`optiroute_common::cli::main`] (boxed here,
/// so the binary does not compile the async call tree again).
pub fn process(
    client: Client,
    cfg: Config,
    shutdown: CancellationToken,
) -> futures::future::BoxFuture<'static, Result<(), Error>> {
    Box::pin(async move { run(client, &cfg, shutdown).await?.wait().await })
}

/// Starts a router worker on `client` until `shutdown` is cancelled.
pub async fn run(
    client: Client,
    cfg: &Config,
    shutdown: CancellationToken,
) -> Result<Running, Error> {
    let metrics = RouterMetrics::new();
    let subjects = Subjects::new(&cfg.nats.prefix);
    let cache = Cache::new(cfg.cache.clone(), metrics.clone());
    cache.spawn_open(async_nats::jetstream::new(client.clone()), shutdown.clone());
    let ready = admin::nats_ready(client.clone(), || Ok(()));
    let admin_addr = admin::spawn(
        &cfg.router.admin_listen,
        metrics.registry.clone(),
        ready,
        shutdown.clone(),
    )
    .await?;
    let r = &cfg.router;
    let handler = Arc::new(GenerateHandler {
        client: client.clone(),
        subjects: subjects.clone(),
        router: Router::new(&r.routing)?,
        cache: cache.clone(),
        metrics: metrics.clone(),
        max_prompt_bytes: r.max_prompt_bytes,
        provider_timeout: Duration::from_millis(r.provider_timeout_ms),
        log_payloads: cfg.log.log_payloads,
    });
    let spec = EndpointSpec {
        service: "optiroute-router".into(),
        description: "OptiRoute router: cache, routing, fallback".into(),
        endpoint: "generate".into(),
        subject: subjects.generate.clone(),
        queue_group: format!("{}.router", subjects.prefix),
        max_in_flight: r.max_in_flight,
        default_deadline: Duration::from_millis(r.default_deadline_ms),
        drain_timeout: Duration::from_millis(r.drain_timeout_ms),
        reply_prefixes: cfg.nats.allowed_reply_prefixes(),
    };
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
        cache,
        task,
    })
}
