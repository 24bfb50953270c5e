//! Who is asking, and what they may spend: the router checks every
//! request's key (the one place all traffic passes, HTTP or direct NATS),
//! holds its rate limits and budgets in the shared ledger, scopes its cache
//! entries, and writes one spend record per served request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::Client;
use optiroute_accounts::ledger::{Hold, Ledger, LedgerSettings, Limit, Refusal};
use optiroute_accounts::model::{rfc3339, to_nanos, to_usd, Period};
use optiroute_accounts::spend::{SpendLog, SpendRecord, ANONYMOUS};
use optiroute_accounts::{Directory, KeyRecord, TeamRecord};
use optiroute_common::config::{AuthMode, CacheScope, Config};
use optiroute_common::cost;
use optiroute_common::error::Charge;
use optiroute_common::nats::RequestMeta;
use optiroute_common::protocol::{models, JetStreamNames};
use optiroute_common::wire::{GenerateRequest, GenerateResponse, Pool, ProviderChoice, Usage};
use optiroute_common::{Error, ErrorKind};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

/// The authenticated caller of one request (all `None` when auth is off).
#[derive(Clone, Default)]
pub struct Caller {
    pub key: Option<Arc<KeyRecord>>,
    pub team: Option<Arc<TeamRecord>>,
    pub user: Option<String>,
    /// When the request was admitted (Unix ms): it picks the budget
    /// windows and stamps the spend record, so both put the request in
    /// the same period even at a boundary.
    pub at_ms: u64,
}

impl Caller {
    pub fn key_id(&self) -> &str {
        self.key.as_ref().map_or(ANONYMOUS, |k| k.id.as_str())
    }

    pub fn team_name(&self) -> Option<&str> {
        self.key.as_ref().and_then(|k| k.team.as_deref())
    }
}

/// Rate-limit holds, settled when the reply is made.
pub struct Admission {
    rpm: Option<Hold>,
    tpm: Option<Hold>,
}

/// Budget holds of one provider call, settled to what it cost.
#[derive(Default)]
pub struct BudgetHolds(Vec<Hold>);

pub struct Access {
    mode: AuthMode,
    directory: Option<Arc<Directory>>,
    ledger: Option<Ledger>,
    spend: Option<SpendLog>,
    record_anonymous: bool,
    scope: CacheScope,
    cfg: Config,
    local_models: Vec<String>,
    batches: Option<crate::batch_auth::BatchAuth>,
    spend_dropped: prometheus::IntCounter,
}

impl Access {
    /// Starts following the keys and opens the ledger when auth is required.
    pub fn start(
        client: &Client,
        cfg: &Config,
        shutdown: &CancellationToken,
        spend_dropped: prometheus::IntCounter,
    ) -> Self {
        let names = JetStreamNames::for_prefix(&cfg.nats.prefix);
        let js = async_nats::jetstream::new(client.clone());
        let required = cfg.auth.mode == AuthMode::Required;
        let directory = required.then(|| {
            Directory::spawn(
                js.clone(),
                names.accounts_bucket.clone(),
                cfg.nats.replicas,
                shutdown.clone(),
            )
        });
        let ledger = required.then(|| {
            Ledger::new(
                js.clone(),
                names.ledger_bucket.clone(),
                LedgerSettings {
                    lease_ttl: Duration::from_millis(cfg.auth.lease_ttl_ms),
                    lease_idle: Duration::from_millis(cfg.auth.lease_idle_ms),
                    budget_wait: Duration::from_millis(cfg.auth.budget_wait_ms),
                    replicas: cfg.nats.replicas,
                },
            )
        });
        let record = required || cfg.auth.record_anonymous;
        let spend = record.then(|| {
            let js2 = js.clone();
            let stream = names.spend_stream.clone();
            let subject = optiroute_common::protocol::Subjects::new(&cfg.nats.prefix).spend_all();
            let (replicas, days) = (cfg.nats.replicas, cfg.auth.spend_retention_days);
            let stop = shutdown.clone();
            tokio::spawn(async move {
                // Created once here; records published before it exists
                // are retried by the log.
                loop {
                    match optiroute_accounts::spend::ensure_stream(
                        &js2, &stream, &subject, replicas, days,
                    )
                    .await
                    {
                        Ok(_) => return,
                        Err(e) => tracing::warn!(error = %e, "spend stream unavailable; retrying"),
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            });
            SpendLog::new(js, &cfg.nats.prefix)
        });
        Access {
            mode: cfg.auth.mode,
            directory,
            ledger,
            spend,
            record_anonymous: cfg.auth.record_anonymous,
            scope: cfg.cache.scope,
            cfg: cfg.clone(),
            local_models: models::local_models(cfg),
            spend_dropped,
            batches: required.then(|| {
                crate::batch_auth::BatchAuth::new(
                    async_nats::jetstream::new(client.clone()),
                    cfg.batch.meta_bucket.clone(),
                )
            }),
        }
    }

    /// The caller of `req`: 401 for a missing, unknown or revoked key,
    /// 403 when the key may not use the pool or model asked for.
    pub async fn identify(
        &self,
        meta: &RequestMeta,
        req: &GenerateRequest,
    ) -> Result<Caller, Error> {
        let Some(dir) = &self.directory else {
            return Ok(Caller {
                user: req.user.clone(),
                at_ms: optiroute_accounts::store::now_ms(),
                ..Caller::default()
            });
        };
        let credential = meta.api_key.as_deref();
        let key = match (
            credential.and_then(optiroute_common::protocol::headers::parse_batch_credential),
            &self.batches,
        ) {
            // A batch job: its batch's token stands for the owner's key.
            (Some((id, token)), Some(batches)) => {
                let owner = batches.owner(id, token, &meta.request_id).await?;
                match dir.key_by_id(&owner) {
                    Some(k) if !k.revoked => k,
                    Some(k) => {
                        return Err(Error::new(
                            ErrorKind::InvalidApiKey,
                            format!("API key {} was revoked", k.id),
                        ))
                    }
                    None => return Err(Error::new(ErrorKind::InvalidApiKey, "unknown API key")),
                }
            }
            _ => dir.authenticate(credential)?,
        };
        // A key whose team is missing is refused, not served without its
        // team's budget.
        let team = match key.team.as_deref() {
            Some(t) => Some(dir.team(t).ok_or_else(|| {
                Error::new(
                    ErrorKind::PermissionDenied,
                    format!("the team `{t}` of this key does not exist"),
                )
            })?),
            None => None,
        };
        let caller = Caller {
            key: Some(key),
            team,
            user: req.user.clone(),
            at_ms: optiroute_accounts::store::now_ms(),
        };
        let asked = match req.provider {
            ProviderChoice::Auto => None,
            ProviderChoice::Local => Some(Pool::Local),
            ProviderChoice::Cloud => Some(Pool::Cloud),
        };
        if let Some(pool) = asked {
            if !self.allows(&caller, pool) {
                return Err(Error::new(
                    ErrorKind::PermissionDenied,
                    format!("this key may not use the {} pool", pool.as_str()),
                )
                .with_param("provider"));
            }
        }
        if !self.allows(&caller, Pool::Local) && !self.allows(&caller, Pool::Cloud) {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                "this key may use no pool that serves its allowed models",
            ));
        }
        if let (Some(m), Some(k)) = (&req.params.model_id, &caller.key) {
            if k.models.as_ref().is_some_and(|ms| !ms.contains(m)) {
                return Err(Error::new(
                    ErrorKind::PermissionDenied,
                    format!("this key may not use the model `{m}`"),
                )
                .with_param("model"));
            }
        }
        Ok(caller)
    }

    /// Whether `caller` may be served by `pool` (its `providers`, and its
    /// `models` against the models the pool serves).
    pub fn allows(&self, caller: &Caller, pool: Pool) -> bool {
        let Some(k) = &caller.key else {
            return true;
        };
        if k.providers.as_ref().is_some_and(|ps| !ps.contains(&pool)) {
            return false;
        }
        match &k.models {
            None => true,
            Some(ms) => match pool {
                Pool::Local => self.local_models.iter().any(|m| ms.contains(m)),
                Pool::Cloud => self.cfg.cloud.models().any(|m| ms.iter().any(|x| x == m)),
            },
        }
    }

    /// With a key limited to some `models` and a request that names none,
    /// the model `pool` will use must be one of them: it is named (the
    /// first allowed model the pool serves), not left to the pool's default.
    pub fn pin_model(&self, caller: &Caller, pool: Pool, req: &mut GenerateRequest) {
        if req.params.model_id.is_none() {
            req.params.model_id = self.pinned_model(caller, pool);
        }
    }

    /// The model a key limited to `models` uses on `pool` when the request
    /// names none (`None`: no limit, or no model of the pool allowed).
    pub fn pinned_model(&self, caller: &Caller, pool: Pool) -> Option<String> {
        let allowed = caller.key.as_ref()?.models.as_ref()?;
        let pinned = match pool {
            Pool::Local => self
                .local_models
                .iter()
                .find(|m| allowed.contains(m))
                .cloned(),
            Pool::Cloud => self
                .cfg
                .cloud
                .models()
                .find(|m| allowed.iter().any(|a| a == m))
                .map(str::to_string),
        };
        pinned
    }

    /// The tenant part of the cache key: empty when answers are shared by
    /// everyone, else `t:<team>` or `k:<key id>`, then the namespace.
    pub fn cache_scope(&self, caller: &Caller, req: &GenerateRequest) -> String {
        let tenant = match (&caller.key, self.scope) {
            (None, _) | (_, CacheScope::Global) => String::new(),
            (Some(k), CacheScope::Team) => match &k.team {
                Some(t) => format!("t:{t}"),
                None => format!("k:{}", k.id),
            },
            (Some(k), CacheScope::Key) => format!("k:{}", k.id),
        };
        match &req.cache_namespace {
            Some(ns) => format!("{tenant}\n{ns}"),
            None => tenant,
        }
    }

    /// Takes the request's rate-limit capacity (a cache hit counts too).
    pub async fn admit(
        &self,
        caller: &Caller,
        req: &GenerateRequest,
        deadline: Instant,
    ) -> Result<Admission, Error> {
        let (Some(ledger), Some(k)) = (&self.ledger, &caller.key) else {
            return Ok(Admission {
                rpm: None,
                tpm: None,
            });
        };
        // One bucket per limit and key: `rpm.<id>`, `tpm.<id>`.
        let take = |bucket: &str, what: &'static str, limit: u32, need: u64| {
            let entry = format!("{bucket}.{}", k.id);
            async move {
                let capacity = u64::from(limit);
                ledger
                    .reserve(
                        &entry,
                        Limit::Rate { capacity },
                        need.min(capacity),
                        None,
                        deadline,
                    )
                    .await?
                    .map_err(|r| rate_error(what, limit, &r))
            }
        };
        let rpm = match k.rpm {
            Some(limit) => Some(take("rpm", "requests", limit, 1).await?),
            None => None,
        };
        let tpm = match k.tpm {
            Some(limit) => Some(take("tpm", "tokens", limit, token_bound(req)).await?),
            None => None,
        };
        Ok(Admission { rpm, tpm })
    }

    /// Settles the rate limits to what the request used.
    pub fn finish_admission(&self, a: Admission, usage: Option<&Usage>) {
        let Some(ledger) = &self.ledger else {
            return;
        };
        if let Some(h) = a.rpm {
            ledger.settle(h, 1);
        }
        if let Some(h) = a.tpm {
            ledger.settle(h, usage.map_or(0, |u| u64::from(u.total_tokens)));
        }
    }

    /// Reserves the most a provider call for `req` can cost (on any pool it
    /// may reach, fallback included) from every budget over the caller.
    pub async fn reserve(
        &self,
        caller: &Caller,
        req: &GenerateRequest,
        meta: &RequestMeta,
        provider_timeout: Duration,
    ) -> Result<BudgetHolds, Error> {
        let (Some(ledger), Some(k)) = (&self.ledger, &caller.key) else {
            return Ok(BudgetHolds::default());
        };
        let budgets = self.budgets(caller, k);
        if budgets.is_empty() {
            return Ok(BudgetHolds::default());
        }
        let need = [Pool::Local, Pool::Cloud]
            .into_iter()
            .filter(|p| self.allows(caller, *p))
            .map(|p| self.cost_bound(p, req, meta, provider_timeout))
            .max()
            .unwrap_or(0);
        let give_up = Instant::now() + meta.remaining();
        let mut holds = BudgetHolds::default();
        for b in budgets {
            match ledger
                .reserve(
                    &b.entry,
                    Limit::Budget {
                        capacity: b.capacity,
                    },
                    need,
                    b.window_end,
                    give_up,
                )
                .await?
            {
                Ok(h) => holds.0.push(h),
                // Holds taken so far are given back as `holds` drops.
                Err(r) => return Err(budget_error(&b, need, &r)),
            }
        }
        Ok(holds)
    }

    /// Settles the budget holds to what the call cost.
    pub fn settle(&self, holds: BudgetHolds, cost_usd: f64) {
        if let Some(ledger) = &self.ledger {
            let n = to_nanos(cost_usd);
            for h in holds.0 {
                ledger.settle(h, n);
            }
        }
    }

    fn budgets(&self, caller: &Caller, k: &KeyRecord) -> Vec<Budget> {
        let now = caller.at_ms;
        let mut out = Vec::new();
        if let Some(usd) = k.budget_usd {
            out.push(Budget::new(
                format!("key {}", k.id),
                format!("b.k.{}", k.id),
                usd,
                k.budget_period,
                now,
            ));
        }
        if let Some(t) = &caller.team {
            if let Some(usd) = t.budget_usd {
                out.push(Budget::new(
                    format!("team {}", t.name),
                    format!("b.t.{}", t.name),
                    usd,
                    t.budget_period,
                    now,
                ));
            }
        }
        if let (Some(usd), Some(user)) = (k.end_user_budget_usd, &caller.user) {
            let u = hex::encode(&Sha256::digest(user.as_bytes())[..12]);
            out.push(Budget::new(
                format!("end user `{user}` of key {}", k.id),
                format!("b.u.{}.{u}", k.id),
                usd,
                k.budget_period,
                now,
            ));
        }
        out
    }

    /// The most one attempt on `pool` can cost, in nano-USD: cloud at the
    /// highest configured price for a prompt of at most one token per byte
    /// (plus chat framing) and `max_tokens` out; local by compute time up
    /// to the attempt's deadline.
    fn cost_bound(
        &self,
        pool: Pool,
        req: &GenerateRequest,
        meta: &RequestMeta,
        provider_timeout: Duration,
    ) -> u64 {
        match pool {
            Pool::Cloud => {
                let c = &self.cfg.cloud;
                let usage = Usage::new(prompt_token_bound(req), req.params.max_tokens, false);
                let mut worst = cost::cloud_cost(c, &c.upstream.model, &usage);
                for m in c.prices.keys() {
                    worst = worst.max(cost::cloud_cost(c, m, &usage));
                }
                to_nanos(worst)
            }
            Pool::Local => {
                let secs = meta.remaining().min(provider_timeout).as_secs_f64();
                to_nanos(cost::local_cost(self.cfg.local.price_per_second, secs))
            }
        }
    }

    /// Appends the request's spend record (auth on, or anonymous records asked for).
    pub async fn record(&self, caller: &Caller, meta: &RequestMeta, resp: &GenerateResponse) {
        let charge = Charge {
            pool: resp.provider,
            model: resp.completion.model.clone(),
            usage: resp.completion.usage,
            cost_usd: resp.cost,
        };
        self.append(caller, meta, &charge, resp.cached).await;
    }

    /// The spend record of a request that failed after it was charged (a
    /// stream that broke off).
    pub async fn record_charge(&self, caller: &Caller, meta: &RequestMeta, charge: &Charge) {
        self.append(caller, meta, charge, false).await;
    }

    async fn append(&self, caller: &Caller, meta: &RequestMeta, c: &Charge, cached: bool) {
        let Some(log) = &self.spend else {
            return;
        };
        if caller.key.is_none() && !self.record_anonymous {
            return;
        }
        let kept = log
            .record(SpendRecord {
                ts_ms: caller.at_ms,
                request_id: meta.request_id.clone(),
                key_id: caller.key_id().to_string(),
                team: caller.team_name().map(str::to_string),
                user: caller.user.clone(),
                pool: c.pool,
                model: c.model.clone(),
                prompt_tokens: c.usage.prompt_tokens,
                completion_tokens: c.usage.completion_tokens,
                cost_usd: c.cost_usd,
                cost_nanos: to_nanos(c.cost_usd),
                cached,
                estimated: c.usage.estimated,
            })
            .await;
        if !kept {
            self.spend_dropped.inc();
        }
    }

    pub fn required(&self) -> bool {
        self.mode == AuthMode::Required
    }

    /// After the service drained: writes back every settled spend, gives
    /// the leases back and stores the queued spend records.
    pub async fn close(&self) {
        if let Some(l) = &self.ledger {
            l.close(Duration::from_secs(5)).await;
        }
        if let Some(s) = &self.spend {
            s.close(Duration::from_secs(5)).await;
        }
    }
}

struct Budget {
    what: String,
    entry: String,
    capacity: u64,
    period: Period,
    window_end: Option<u64>,
}

impl Budget {
    /// `usd` over `period`'s window holding `now_ms`: the ledger entry is
    /// `<entry>.<window label>`, so a new period starts a new entry.
    fn new(what: String, entry: String, usd: f64, period: Period, now_ms: u64) -> Self {
        let w = period.window(now_ms);
        Budget {
            what,
            entry: format!("{entry}.{}", w.label),
            capacity: to_nanos(usd),
            period,
            window_end: w.end_ms,
        }
    }
}

/// Prompt tokens at most: one per byte of text (a byte-level BPE token
/// covers at least one byte), plus a chat template's framing: 16 per
/// message and 64 for the whole (a system header with a date is ~25).
fn prompt_token_bound(req: &GenerateRequest) -> u32 {
    let p = &req.params;
    let text: usize = p.prompt.len()
        + p.messages
            .iter()
            .map(|m| m.content.len() + 16)
            .sum::<usize>();
    u32::try_from(text + 64).unwrap_or(u32::MAX)
}

fn token_bound(req: &GenerateRequest) -> u64 {
    u64::from(prompt_token_bound(req)) + u64::from(req.params.max_tokens)
}

fn rate_error(what: &str, limit: u32, r: &Refusal) -> Error {
    let secs = r.retry_after_secs.unwrap_or(1);
    Error::new(
        ErrorKind::RateLimited,
        format!("rate limit of {limit} {what} per minute reached for this key; retry in {secs} s"),
    )
    .with_retry_after(secs)
}

fn budget_error(b: &Budget, need: u64, r: &Refusal) -> Error {
    let reset = match b.window_end {
        Some(end) => format!("it resets at {}", rfc3339(end)),
        None => "it is a total budget and does not reset".to_string(),
    };
    let why = if r.exhausted {
        format!(
            "the {} budget of {} USD ({}) has no room for this request (up to {} USD)",
            b.what,
            to_usd(b.capacity),
            b.period.as_str(),
            to_usd(need)
        )
    } else {
        // Not spent: held by requests in flight longer than this one could
        // wait. Transient, so a rate limit (retry in a second), not a
        // spent quota.
        return Error::new(
            ErrorKind::RateLimited,
            format!(
                "the {} budget of {} USD ({}) is held by requests in flight; retry shortly",
                b.what,
                to_usd(b.capacity),
                b.period.as_str()
            ),
        )
        .with_retry_after(r.retry_after_secs.unwrap_or(1));
    };
    let e = Error::new(ErrorKind::BudgetExceeded, format!("{why}; {reset}"));
    match r.retry_after_secs {
        Some(s) => e.with_retry_after(s),
        None => e,
    }
}
