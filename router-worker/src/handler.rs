//! The `optiroute.generate` handler: validate, cache, route, call a
//! provider pool, fall back, write the cache, reply.

mod fit;
mod semantic;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use async_nats::Client;
use optiroute_common::admin;
use optiroute_common::config::Config;
use optiroute_common::nats::{self, RequestMeta};
use optiroute_common::service::{self, EndpointSpec, Handler};
use optiroute_common::subjects::Subjects;
use optiroute_common::wire::{
    CacheMatch, Completion, GenerateRequest, GenerateResponse, Pool, ProviderReply, ProviderRequest,
};
use optiroute_common::{Error, ErrorKind};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::access::{Access, Caller};
use crate::cache::{scoped_cache_key, Cache, CachedAnswer, Claim, Lookup, Marker};
use crate::coalesce::{Coalescer, Join, LeaderGuard, Turn};
use crate::decide::Routing;
use crate::embedding::{Embeddings, RequestEmbedding};
use crate::metrics::{CacheEvent, RouterMetrics};
use crate::overflow::LocalLoad;
use crate::routing::Decision;
use crate::semantic::SemanticCache;

/// How much earlier than the router a provider gives up on an attempt.
const PROVIDER_GRACE: Duration = Duration::from_millis(250);

/// Less time than this left, a provider attempt could not come back with an
/// answer: it is not made (no call reaches an upstream for nothing).
const MIN_ATTEMPT: Duration = Duration::from_millis(10);

pub struct GenerateHandler {
    client: Client,
    subjects: Subjects,
    router: Routing,
    cache: Arc<Cache>,
    coalescer: Arc<Coalescer>,
    max_waiters: usize,
    metrics: RouterMetrics,
    max_prompt_bytes: usize,
    provider_timeout: Duration,
    max_deadline: Duration,
    log_payloads: bool,
    access: Access,
    local_load: Arc<LocalLoad>,
    inflight: Arc<optiroute_common::liveness::InFlight>,
    /// Each pool's heartbeats: an attempt on a replica that died fails
    /// (and may fall back) at once.
    local_alive: Arc<optiroute_common::liveness::Watcher>,
    cloud_alive: Arc<optiroute_common::liveness::Watcher>,
    embeddings: Arc<Embeddings>,
    semantic: Arc<SemanticCache>,
}

impl Handler for GenerateHandler {
    type Request = GenerateRequest;
    type Reply = GenerateResponse;

    async fn handle(
        &self,
        mut meta: RequestMeta,
        mut req: GenerateRequest,
    ) -> Result<GenerateResponse, Error> {
        // In this router's heartbeat while it is being served.
        let _held = self.inflight.hold(&meta.request_id);
        req.validate(self.max_prompt_bytes)?;
        // A later deadline is clamped, not refused: it is how long the
        // caller is willing to wait, not work it needs, and the request
        // ends with 504 here if it does need longer.
        meta.deadline = meta.deadline.min(SystemTime::now() + self.max_deadline);
        let started = Instant::now();
        if self.log_payloads {
            tracing::debug!(prompt = %req.params.prompt, "prompt");
        }
        // Who asks: 401/403 before any work, and the rate limits (a
        // cache hit counts too).
        let caller = self.access.identify(&meta, &req).await?;
        meta.team = caller.team_name().map(str::to_string);
        let admission = self
            .access
            .admit(&caller, &req, Instant::now() + meta.remaining())
            .await?;
        // Routing comes first: the pool it chooses is part of the cache key.
        // Its question's embedding is computed at most once, by whichever
        // needs it first (the learned router, the semantic cache), and shared.
        let question = req.params.last_user_text().to_string();
        let embedding = RequestEmbedding::new(&self.embeddings, &question);
        let scope = self.access.cache_scope(&caller, &req);
        let mut decision = self.router.decide(&req, &embedding, &scope).await;
        let mut local_slot = self.fit(&mut decision, &req, &caller, &scope).await;
        let pinned = req.params.model_id.is_none();
        self.access.pin_model(&caller, decision.target, &mut req);
        let pinned = pinned && req.params.model_id.is_some();
        let key = scoped_cache_key(&req, decision.target, &scope);
        let call = Call {
            meta: &meta,
            req: &req,
            decision: &decision,
            started,
            key: &key,
            scope: &scope,
            caller: &caller,
            pinned,
            embedding,
            semantic: self.semantic.asked(req.semantic),
            semantic_miss: OnceLock::new(),
        };
        let result = self.serve(&call).await;
        if let (Some(slot), Ok(r)) = (local_slot.as_mut(), &result) {
            slot.served = !r.cached && r.provider == Pool::Local;
        }
        drop(local_slot);
        let usage = match &result {
            Ok(r) => Some(&r.completion.usage),
            Err(e) => e.charged.as_ref().map(|c| &c.usage),
        };
        self.access.finish_admission(admission, usage);
        match &result {
            Ok(resp) => self.access.record(&caller, &meta, resp).await,
            Err(e) => {
                if let Some(c) = &e.charged {
                    self.access.record_charge(&caller, &meta, c).await;
                }
            }
        }
        result
    }
}

impl GenerateHandler {
    /// The cache, then the pools.
    async fn serve(&self, call: &Call<'_>) -> Result<GenerateResponse, Error> {
        match self.cache_outcome(call).await {
            Outcome::Reused {
                answer,
                event,
                leader,
            } => {
                if let Some(event) = event {
                    self.metrics.cache_event(event);
                }
                let result = Ok(self.reply_reused(answer, call));
                // Identical requests here wait for this one: they get it too.
                if let Some(guard) = leader {
                    guard.finish(&result);
                }
                result
            }
            Outcome::Generate {
                store,
                marker,
                leader,
            } => {
                let result = self.generate_and_store(call, store, marker).await;
                if let Some(guard) = leader {
                    guard.finish(&result);
                }
                result
            }
            Outcome::Failed(e) => Err(e),
        }
    }
}

/// What the cache and the requests in flight make of one request.
enum Outcome {
    /// An answer this request did not generate: a cache hit, or the answer
    /// of an identical request (in this router or another replica). `event`
    /// is the cache event still to count; `leader` the identical requests
    /// in this router that wait for this one.
    Reused {
        answer: Reused,
        event: Option<CacheEvent>,
        leader: Option<LeaderGuard>,
    },
    /// Generate; write the answer to the cache when `store`. `marker` is
    /// this router's placeholder in the key; `leader` the identical
    /// requests in this router that wait for the answer.
    Generate {
        store: bool,
        marker: Option<Box<Marker>>,
        leader: Option<LeaderGuard>,
    },
    /// Waiting for an identical request failed this one.
    Failed(Error),
}

/// An answer served again, with what it cost when it was generated.
struct Reused {
    completion: Completion,
    provider: Pool,
    cost: f64,
    fallback_reason: Option<ErrorKind>,
    matched: CacheMatch,
    similarity: Option<f64>,
}

impl Reused {
    fn from_cache(hit: &CachedAnswer) -> Self {
        Reused {
            completion: hit.completion.clone(),
            provider: hit.provider,
            cost: hit.cost,
            fallback_reason: None,
            matched: CacheMatch::Exact,
            similarity: None,
        }
    }

    fn from_twin(shared: GenerateResponse) -> Self {
        // A twin that was itself served from the cache paid nothing; what
        // it saved, this request saved too.
        let cost = match (shared.cached, shared.saved_usd) {
            (true, Some(saved)) => saved,
            _ => shared.cost,
        };
        Reused {
            completion: shared.completion,
            provider: shared.provider,
            cost,
            fallback_reason: shared.fallback_reason,
            // An identical request: it matched as this one would have.
            matched: shared.cache_match.unwrap_or(CacheMatch::Exact),
            similarity: shared.similarity,
        }
    }
}

/// One request on its way through the cache: what it asked, where routing
/// sends it, and its key.
struct Call<'a> {
    meta: &'a RequestMeta,
    req: &'a GenerateRequest,
    decision: &'a Decision,
    started: Instant,
    key: &'a str,
    /// The tenant scope of its cache entries.
    scope: &'a str,
    caller: &'a Caller,
    /// The model was named for the key's `models`, not by the caller.
    pinned: bool,
    /// Its question's embedding, computed on first use by whichever
    /// feature needs it (never on an exact hit).
    embedding: RequestEmbedding<'a>,
    /// Whether it asked for the semantic cache.
    semantic: bool,
    /// Why the semantic cache did not answer it, when it asked.
    semantic_miss: OnceLock<String>,
}

impl GenerateHandler {
    /// Looks the request up in the cache and among the identical requests
    /// in flight, here and in other replicas.
    async fn cache_outcome(&self, call: &Call<'_>) -> Outcome {
        let mode = call.req.cache;
        let generate = |store, marker, leader| Outcome::Generate {
            store,
            marker,
            leader,
        };
        if !self.cache.enabled() || !(mode.reads() || mode.writes()) {
            self.metrics.cache_event(CacheEvent::Bypass);
            self.semantic_skipped(call, "the cache is off for this request");
            return generate(false, None, None);
        }
        if !mode.reads() {
            self.metrics.cache_event(CacheEvent::Bypass);
            self.semantic_skipped(call, "the cache is not read for this request");
            return generate(true, None, None);
        }
        if let Lookup::Hit(hit) = self.cache.lookup(call.key).await {
            // The lookup counted the hit itself.
            return Outcome::Reused {
                answer: Reused::from_cache(&hit),
                event: None,
                leader: None,
            };
        }
        // A request that asks for a semantic match may be answered by one:
        // only requests that asked the same wait on each other.
        let semantic_key;
        let coalesce_key = if call.semantic {
            semantic_key = format!("{}:semantic", call.key);
            semantic_key.as_str()
        } else {
            call.key
        };
        let leader = match self.coalescer.join(coalesce_key) {
            Join::Leader(guard) => guard,
            Join::Full => {
                return Outcome::Failed(Error::new(
                    ErrorKind::RateLimited,
                    format!(
                    "{} identical requests already wait for this prompt's answer; retry shortly",
                    self.max_waiters
                ),
                ))
            }
            Join::Follower(rx) => match tokio::time::timeout(call.meta.remaining(), rx).await {
                Ok(Ok(Turn::Answer(Ok(shared)))) => {
                    return Outcome::Reused {
                        answer: Reused::from_twin(shared),
                        event: Some(CacheEvent::Coalesced),
                        leader: None,
                    }
                }
                // Only errors about the request itself are shared.
                Ok(Ok(Turn::Answer(Err(e)))) => return Outcome::Failed(e),
                // The leader failed for a reason of its own: this request
                // leads now, while the others keep waiting on it.
                Ok(Ok(Turn::Lead(guard))) => guard,
                // Not sent by the coalescer; should it happen, do the work alone.
                Ok(Err(_)) => return generate(mode.writes(), None, None),
                Err(_) => {
                    return Outcome::Failed(Error::new(
                        ErrorKind::Timeout,
                        "deadline passed waiting for an identical request in flight",
                    ))
                }
            },
        };
        // After the join, so identical requests in flight embed once.
        if call.semantic {
            if let Some(answer) = self.semantic_lookup(call).await {
                return Outcome::Reused {
                    answer,
                    event: Some(CacheEvent::SemanticHit),
                    leader: Some(leader),
                };
            }
        }
        // Only a request that will write its answer may hold other replicas waiting.
        let claim = if mode.writes() {
            self.cache.claim(call.key, call.meta.deadline).await
        } else {
            Claim::Proceed
        };
        match claim {
            Claim::Owner(marker) => generate(mode.writes(), Some(marker), Some(leader)),
            Claim::Answer(answer) => Outcome::Reused {
                answer: Reused::from_cache(&answer),
                event: Some(CacheEvent::Coalesced),
                leader: Some(leader),
            },
            Claim::Proceed => generate(mode.writes(), None, Some(leader)),
        }
    }

    /// The reply for an answer this request did not generate: it costs
    /// nothing and saved what the answer cost; the routing fields are this
    /// request's own (the answer may come from a request that reached the
    /// same pool another way: an explicit provider, another bias).
    fn reply_reused(&self, reused: Reused, call: &Call<'_>) -> GenerateResponse {
        let saved = if reused.cost.is_finite() && reused.cost > 0.0 {
            self.metrics
                .cost_saved
                .with_label_values(&[reused.provider.as_str()])
                .inc_by(reused.cost);
            reused.cost
        } else {
            0.0
        };
        GenerateResponse {
            completion: reused.completion,
            cost: 0.0,
            latency: call.started.elapsed().as_secs_f64(),
            routed_to: call.decision.target,
            provider: reused.provider,
            cached: true,
            saved_usd: Some(saved),
            fallback_reason: reused.fallback_reason,
            route_reason: Some(call.decision.reason.clone()),
            request_id: Some(call.meta.request_id.clone()),
            cache_match: Some(reused.matched),
            similarity: reused.similarity,
            semantic_miss: None,
        }
    }

    /// Generates, then (in the background, after the reply) writes a good
    /// answer to the cache over this router's placeholder, or removes the
    /// placeholder when there is nothing to cache, so waiting replicas move on.
    async fn generate_and_store(
        &self,
        call: &Call<'_>,
        store: bool,
        marker: Option<Box<Marker>>,
    ) -> Result<GenerateResponse, Error> {
        // The most this can cost is reserved from every budget over the
        // caller before any pool is asked, and settled to what it was
        // charged (a failure: nothing, unless a stream broke off after
        // tokens went out, which the provider charges).
        let holds = self
            .access
            .reserve(call.caller, call.req, call.meta, self.provider_timeout)
            .await;
        let generated = match holds {
            Ok(holds) => {
                let r = self.generate(call).await;
                let charged = match &r {
                    Ok((response, _)) => response.cost,
                    Err(e) => e.charged.as_ref().map_or(0.0, |c| c.cost_usd),
                };
                self.access.settle(holds, charged);
                r
            }
            Err(e) => Err(e),
        };
        let (result, answer) = match generated {
            Ok((response, answer)) => (Ok(response), answer.filter(|_| store)),
            Err(e) => (Err(e), None),
        };
        if answer.is_some() || marker.is_some() {
            let cache = self.cache.clone();
            let key = call.key.to_string();
            let vector = answer.as_ref().and_then(|_| self.pending_vector(call));
            tokio::spawn(
                async move {
                    let stored = match answer {
                        Some(a) => cache.store(&key, a).await,
                        None => false,
                    };
                    // Only answers in the exact cache become semantic candidates.
                    if let (true, Some(v)) = (stored, vector) {
                        v.write(&key).await;
                    }
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

    /// Calls the pool routing chose and falls back to the other one when
    /// the failure allows it. Also returns what to cache: only first-choice
    /// answers. An answer from the fallback pool is not cached: under the
    /// key of the pool routing chose it would serve the other pool's answer
    /// for the whole TTL after the chosen pool recovers, and it must not
    /// stand for that pool's answer either.
    async fn generate(
        &self,
        call: &Call<'_>,
    ) -> Result<(GenerateResponse, Option<CachedAnswer>), Error> {
        let (meta, req, decision, started) = (call.meta, call.req, call.decision, call.started);
        self.metrics
            .route_decisions
            .with_label_values(&[decision.target.as_str(), decision.reason_label])
            .inc();
        tracing::debug!(target_pool = decision.target.as_str(), reason = %decision.reason, "routed");
        let preq = &req.params;
        let first = self.call(meta, decision.target, preq).await;
        let (reply, provider, fallback_reason) = match first {
            Ok(reply) => (reply, decision.target, None),
            Err(e) if !e.kind.allows_fallback() => return Err(e),
            Err(e) if !self.access.allows(call.caller, decision.target.other()) => return Err(e),
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
                // A model pinned for the first pool (a key limited to some
                // models) is the other pool's own on the fallback.
                let pinned;
                let preq = match (call.pinned, self.access.pinned_model(call.caller, other)) {
                    (true, model) => {
                        pinned = ProviderRequest {
                            model_id: model,
                            ..preq.clone()
                        };
                        &pinned
                    }
                    (false, _) => preq,
                };
                match self.call(meta, other, preq).await {
                    Ok(reply) => (reply, other, Some(first_err.kind)),
                    Err(e) if !e.kind.allows_fallback() => return Err(e),
                    Err(second_err) => {
                        let kind = if meta.remaining() < MIN_ATTEMPT {
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
        let answer = fallback_reason.is_none().then(|| CachedAnswer {
            completion: reply.completion.clone(),
            provider,
            routed_to: decision.target,
            cost: reply.cost_usd,
            route_reason: Some(decision.reason.clone()),
        });
        let response = GenerateResponse {
            completion: reply.completion,
            cost: reply.cost_usd,
            latency: started.elapsed().as_secs_f64(),
            routed_to: decision.target,
            provider,
            cached: false,
            saved_usd: None,
            fallback_reason,
            route_reason: Some(decision.reason.clone()),
            request_id: Some(meta.request_id.clone()),
            cache_match: None,
            similarity: None,
            semantic_miss: call.semantic_miss.get().cloned(),
        };
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
        if wait < MIN_ATTEMPT {
            return Err(Error::new(
                ErrorKind::Timeout,
                format!("no time left for a {} pool attempt", pool.as_str()),
            ));
        }
        let grace = if wait > PROVIDER_GRACE * 4 {
            PROVIDER_GRACE
        } else {
            Duration::ZERO
        };
        let attempt = RequestMeta {
            request_id: meta.request_id.clone(),
            deadline: wait_until - grace,
            stream_inbox: meta.stream_inbox.clone(),
            api_key: None,
            team: meta.team.clone(),
        };
        let alive = match pool {
            Pool::Local => &self.local_alive,
            Pool::Cloud => &self.cloud_alive,
        };
        let mut tracked = alive.track(&attempt.request_id);
        let died = tracked.death();
        let result = tokio::select! {
                    r = nats::request(
                        &self.client,
                        self.subjects.provider(pool),
                        &attempt,
                        Some(wait),
                        req,
                    ) => r,
        () = died => Err(match pool {
                        // Nothing was paid for on the local pool: the other may answer.
                        Pool::Local => Error::new(
                            ErrorKind::NoResponders,
                            "the local pool replica serving this attempt stopped (its heartbeat ended)",
                        ),
                        // The cloud replica may have had it answered (and paid):
                        // not tried again, on either pool.
                        Pool::Cloud => Error::new(
                            ErrorKind::ReplicaLost,
                            "the cloud pool replica serving this attempt stopped (its heartbeat ended); not retried, as it may have been answered upstream",
                        ),
                    }),
                };
        drop(tracked);
        self.metrics
            .provider_request
            .with_label_values(&[pool.as_str()])
            .observe(started.elapsed().as_secs_f64());
        result.and_then(|reply: ProviderReply| {
            // Costs are summed and charged downstream: only a real amount passes.
            if reply.cost_usd.is_finite() && reply.cost_usd >= 0.0 {
                Ok(reply)
            } else {
                Err(Error::new(
                    ErrorKind::UpstreamError,
                    format!("the {} pool replied with an invalid cost", pool.as_str()),
                ))
            }
        })
    }
}

/// A started router: its admin address, its metrics, and the serving task.
pub struct Running {
    pub admin_addr: SocketAddr,
    pub metrics: RouterMetrics,
    pub cache: Arc<Cache>,
    pub semantic: Arc<SemanticCache>,
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
    let cache = Cache::new(cfg.cache.clone(), cfg.nats.replicas, metrics.clone());
    cache.spawn_open(async_nats::jetstream::new(client.clone()), shutdown.clone());
    // The embedding model is loaded once, when some request may need it; a
    // missing model is logged with its path and the fetch command, and
    // semantic requests are then served as misses that say why.
    let wants_vectors = cfg.cache.enabled && cfg.cache.semantic.in_use();
    let router = Routing::new(&cfg.router.routing)?;
    let mut embeddings = Embeddings::load(
        &cfg.router.embedding,
        wants_vectors || router.needs_embedding(),
    );
    embeddings.seconds = Some(metrics.embedding_seconds.clone());
    let embeddings = Arc::new(embeddings);
    let semantic = SemanticCache::new(
        &cfg.cache,
        cfg.nats.replicas,
        wants_vectors && embeddings.available(),
        metrics.clone(),
    );
    semantic.spawn(async_nats::jetstream::new(client.clone()), shutdown.clone());
    let settings = cfg.router.service();
    let ready = admin::nats_ready(client.clone(), || Ok(()));
    let admin_addr = admin::spawn(
        &settings.admin_listen,
        metrics.registry.clone(),
        ready,
        shutdown.clone(),
    )
    .await?;
    let r = &cfg.router;
    let inflight = Arc::new(optiroute_common::liveness::InFlight::new(
        settings.max_in_flight,
    ));
    // The heartbeat lasts while the router drains: it ends after the service.
    let heartbeat_stop = CancellationToken::new();
    optiroute_common::liveness::spawn_heartbeat(
        client.clone(),
        subjects.router_alive(),
        inflight.clone(),
        heartbeat_stop.clone(),
    );
    let router = router.require_embeddings(&embeddings);
    metrics
        .learned_router_active
        .set(i64::from(router.learned().is_some()));
    let handler = Arc::new(GenerateHandler {
        client: client.clone(),
        subjects: subjects.clone(),
        router,
        cache: cache.clone(),
        coalescer: Coalescer::new(cfg.cache.max_waiters_per_key),
        max_waiters: cfg.cache.max_waiters_per_key,
        metrics: metrics.clone(),
        max_prompt_bytes: settings.max_prompt_bytes,
        provider_timeout: Duration::from_millis(r.provider_timeout_ms),
        max_deadline: Duration::from_millis(r.max_deadline_ms),
        log_payloads: cfg.log.log_payloads,
        access: Access::start(&client, cfg, &shutdown, metrics.spend_dropped.clone()),
        inflight: inflight.clone(),
        local_alive: optiroute_common::liveness::Watcher::spawn(
            client.clone(),
            subjects.pool_alive(Pool::Local),
            shutdown.clone(),
        ),
        cloud_alive: optiroute_common::liveness::Watcher::spawn(
            client.clone(),
            subjects.pool_alive(Pool::Cloud),
            shutdown.clone(),
        ),
        local_load: LocalLoad::start(
            &client,
            &subjects.local_service,
            r.routing.local_max_wait_ms,
            &shutdown,
        ),
        embeddings,
        semantic: semantic.clone(),
    });
    let spec = EndpointSpec {
        service: subjects.router_service.clone(),
        description: "OptiRoute router: cache, routing, fallback".into(),
        endpoint: "generate".into(),
        subject: subjects.generate.clone(),
        queue_group: subjects.router_queue_group(),
        settings,
        reply_prefixes: cfg.nats.allowed_reply_prefixes(),
        stats_data: None,
    };
    let served = service::serve(
        client,
        spec,
        handler.clone(),
        metrics.service.clone(),
        shutdown,
    );
    let task = tokio::spawn(async move {
        let r = served.await;
        // Drained: what the last requests settled is written back.
        handler.access.close().await;
        heartbeat_stop.cancel();
        r
    });
    Ok(Running {
        admin_addr,
        metrics,
        cache,
        semantic,
        task,
    })
}
