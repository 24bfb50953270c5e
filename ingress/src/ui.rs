//! The web UI: a chat page at `/` (static files embedded in the binary) and
//! the small JSON stats endpoint `GET /stats` its live panel polls.
//!
//! `/stats` is built from two sources, never from Prometheus:
//! - the ingress's own view of the answers it relays ([`UiStats::record`]):
//!   spend by provider, cache hits and the cost they saved (each cached
//!   answer carries its `saved_usd`), routes, fallbacks and a rolling
//!   60-second window of latencies;
//! - the NATS service API: `$SRV.STATS` of the routers and of both provider
//!   pools, whose replies are collected on an inbox for a short while; the
//!   cloud workers publish their circuit breaker's state there.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use futures::StreamExt;
use optiroute_common::nats::is_connected;
use optiroute_common::protocol::BREAKER_STATS_FIELD;
use optiroute_common::subjects::Discovery;
use optiroute_common::wire::{GenerateResponse, Pool};
use serde_json::{json, Value};

use crate::AppState;

const INDEX_HTML: &str = include_str!("../static/index.html");
const APP_JS: &str = include_str!("../static/app.js");
const STYLE_CSS: &str = include_str!("../static/style.css");

/// Latencies older than this leave the rolling window.
const WINDOW: Duration = Duration::from_secs(60);
/// Upper bound on the samples kept in the window, so a burst cannot grow it
/// without limit; the oldest go first.
const MAX_WINDOW_SAMPLES: usize = 20_000;
/// How long replies to a `$SRV.STATS` request are collected.
const DISCOVERY_WINDOW: Duration = Duration::from_millis(150);
/// `/stats` reuses the NATS part for this long, so many open pages polling
/// every few seconds cost NATS one round per second at most.
const NATS_PART_TTL: Duration = Duration::from_secs(1);
/// After a fallback (the breaker may have changed) the NATS part is
/// refreshed sooner, but never more than once per this: while the breaker
/// is open every cloud request falls back, and polls must not turn into a
/// NATS round each.
const NATS_PART_STALE_TTL: Duration = Duration::from_millis(250);

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; \
    frame-ancestors 'none'";

/// `GET /`, `GET /ui/app.js`, `GET /ui/style.css` and `GET /stats`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(index))
        .route("/ui/app.js", get(app_js))
        .route("/ui/style.css", get(style_css))
        .route("/stats", get(stats))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    resp
}

async fn index() -> Response {
    let mut resp = asset("text/html; charset=utf-8", INDEX_HTML);
    let h = resp.headers_mut();
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    resp
}

async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn style_css() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

/// What the ingress learned from the answers it relayed. One short-held
/// mutex; `record` does O(1) work apart from evicting expired samples.
pub struct UiStats {
    started: Instant,
    inner: Mutex<Totals>,
    nats_part: tokio::sync::Mutex<Option<(Instant, Value)>>,
    /// Set by an answer that fell back: the breaker may have changed, so
    /// the next `/stats` asks the services again instead of reusing.
    nats_part_stale: AtomicBool,
}

#[derive(Default)]
struct Totals {
    answers: u64,
    /// Requests the routers were sent that ended in an error.
    failed: u64,
    /// (when, latency in seconds) of the answers of the last [`WINDOW`].
    window: VecDeque<(Instant, f64)>,
    spend_by_provider: [f64; 2],
    served_by_provider: [u64; 2],
    by_route: [u64; 2],
    cache_hits: u64,
    cache_misses: u64,
    /// The sum of the cached answers' `saved_usd`.
    cost_saved: f64,
    fallbacks: BTreeMap<&'static str, u64>,
    tokens: u64,
}

fn idx(p: Pool) -> usize {
    match p {
        Pool::Local => 0,
        Pool::Cloud => 1,
    }
}

/// The `q` quantile (0..=1) of sorted values, nearest rank.
fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

impl Default for UiStats {
    fn default() -> Self {
        Self::new()
    }
}

impl UiStats {
    pub fn new() -> Self {
        UiStats {
            started: Instant::now(),
            inner: Mutex::new(Totals::default()),
            nats_part: tokio::sync::Mutex::new(None),
            nats_part_stale: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Totals> {
        // A panic while holding the lock leaves plain counters behind: keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one answer relayed to an HTTP client.
    pub fn record(&self, answer: &GenerateResponse) {
        self.record_at(answer, Instant::now());
    }

    /// A request the routers were sent that ended in an error. (The NATS
    /// service API's own `num_errors` cannot count these: error replies
    /// carry a `{code, message}` body, and it counts only empty ones.)
    /// A failure that was still charged (a stream that broke off after
    /// tokens went out) adds its cost to the spend, as the cost metric does.
    pub fn record_failure(&self, charged: Option<&optiroute_common::error::Charge>) {
        let mut t = self.lock();
        t.failed += 1;
        if let Some(c) = charged {
            if c.cost_usd.is_finite() && c.cost_usd > 0.0 {
                t.spend_by_provider[idx(c.pool)] += c.cost_usd;
            }
        }
    }

    fn record_at(&self, a: &GenerateResponse, now: Instant) {
        let real = |v: f64| if v.is_finite() && v > 0.0 { v } else { 0.0 };
        let cost = real(a.cost);
        let latency = real(a.latency);
        if a.fallback_reason.is_some() {
            self.nats_part_stale.store(true, Ordering::Relaxed);
        }
        let mut t = self.lock();
        t.answers += 1;
        t.tokens = t
            .tokens
            .saturating_add(u64::from(a.completion.usage.total_tokens));
        t.by_route[idx(a.routed_to)] += 1;
        t.served_by_provider[idx(a.provider)] += 1;
        t.spend_by_provider[idx(a.provider)] += cost;
        if let Some(reason) = a.fallback_reason {
            *t.fallbacks.entry(reason.as_str()).or_default() += 1;
        }
        t.window.push_back((now, latency));
        while t.window.len() > MAX_WINDOW_SAMPLES {
            t.window.pop_front();
        }
        expire(&mut t.window, now);
        if a.cached {
            t.cache_hits += 1;
            t.cost_saved += real(a.saved_usd.unwrap_or(0.0));
        } else {
            t.cache_misses += 1;
        }
    }

    /// The ingress's own part of `/stats`.
    fn snapshot(&self, now: Instant) -> Value {
        let (t, mut lat) = {
            let mut t = self.lock();
            expire(&mut t.window, now);
            let lat: Vec<f64> = t.window.iter().map(|&(_, l)| l).collect();
            let t = Snapshot {
                answers: t.answers,
                failed: t.failed,
                spend: t.spend_by_provider,
                served: t.served_by_provider,
                by_route: t.by_route,
                hits: t.cache_hits,
                misses: t.cache_misses,
                saved: t.cost_saved,
                fallbacks: t.fallbacks.clone(),
                tokens: t.tokens,
            };
            (t, lat)
        };
        lat.sort_by(f64::total_cmp);
        let lookups = t.hits + t.misses;
        let hit_ratio = (lookups > 0).then(|| t.hits as f64 / lookups as f64);
        let fallbacks_total: u64 = t.fallbacks.values().sum();
        json!({
            "requests": {
                "total": t.answers,
                "failed": t.failed,
                "by_route": {"local": t.by_route[0], "cloud": t.by_route[1]},
                "by_provider": {"local": t.served[0], "cloud": t.served[1]},
                "fallbacks": {"total": fallbacks_total, "by_reason": t.fallbacks},
                "tokens": t.tokens,
            },
            "spend_usd": {
                "total": t.spend[0] + t.spend[1],
                "by_provider": {"local": t.spend[0], "cloud": t.spend[1]},
            },
            "cache": {
                "hits": t.hits,
                "misses": t.misses,
                "hit_ratio": hit_ratio,
                "cost_saved_usd": t.saved,
            },
            "latency_s": {
                "window_s": WINDOW.as_secs(),
                "count": lat.len(),
                "p50": quantile(&lat, 0.50),
                "p95": quantile(&lat, 0.95),
            },
        })
    }
}

struct Snapshot {
    answers: u64,
    failed: u64,
    spend: [f64; 2],
    served: [u64; 2],
    by_route: [u64; 2],
    hits: u64,
    misses: u64,
    saved: f64,
    fallbacks: BTreeMap<&'static str, u64>,
    tokens: u64,
}

fn expire(window: &mut VecDeque<(Instant, f64)>, now: Instant) {
    while let Some(&(at, _)) = window.front() {
        if now.saturating_duration_since(at) > WINDOW {
            window.pop_front();
        } else {
            break;
        }
    }
}

/// Sums of the `$SRV.STATS` replies of one service, counting only the
/// instances that serve `subject` (another deployment with another prefix
/// may run a service of the same name on the same NATS).
#[derive(Default, Debug, PartialEq)]
struct ServiceSums {
    workers: u64,
    requests: u64,
    processing_ns: f64,
    /// Workers by the breaker state they publish (cloud workers only).
    breakers: BTreeMap<String, u64>,
}

impl ServiceSums {
    fn add(&mut self, reply: &Value, subject: &str) {
        let Some(endpoints) = reply.get("endpoints").and_then(Value::as_array) else {
            return;
        };
        let ours: Vec<&Value> = endpoints
            .iter()
            .filter(|e| e.get("subject").and_then(Value::as_str) == Some(subject))
            .collect();
        if ours.is_empty() {
            return;
        }
        self.workers += 1;
        let breaker = ours.iter().find_map(|e| {
            e.get("data")
                .and_then(|d| d.get(BREAKER_STATS_FIELD))
                .and_then(Value::as_str)
        });
        if let Some(state) = breaker {
            // A bounded set from our own workers; anything else is one bucket.
            let state = match state {
                "closed" | "open" | "half_open" => state,
                _ => "other",
            };
            *self.breakers.entry(state.to_string()).or_default() += 1;
        }
        for e in ours {
            let n = e.get("num_requests").and_then(Value::as_u64).unwrap_or(0);
            self.requests += n;
            let avg = e
                .get("average_processing_time")
                .and_then(Value::as_f64)
                .unwrap_or(0.0);
            self.processing_ns += avg * n as f64;
        }
    }

    fn avg_processing_ms(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.processing_ns / self.requests as f64 / 1e6)
    }

    /// The pool's breaker state as its workers publish it: theirs when they
    /// agree, `mixed` when they do not, `unknown` when none says.
    fn breaker(&self) -> &str {
        let mut states = self.breakers.keys();
        match (states.next(), states.next()) {
            (None, _) => "unknown",
            (Some(one), None) => one,
            (Some(_), Some(_)) => "mixed",
        }
    }
}

/// Sends `$SRV.STATS.<service>` and collects replies for [`DISCOVERY_WINDOW`].
async fn service_stats(client: &async_nats::Client, service: &str, subject: &str) -> ServiceSums {
    let mut sums = ServiceSums::default();
    let inbox = client.new_inbox();
    let mut sub = match client.subscribe(inbox.clone()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "stats: cannot subscribe");
            return sums;
        }
    };
    if let Err(e) = client
        .publish_with_reply(Discovery::Stats.subject(service), inbox, Bytes::new())
        .await
    {
        tracing::debug!(error = %e, "stats: cannot publish");
        return sums;
    }
    let deadline = tokio::time::Instant::now() + DISCOVERY_WINDOW;
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, sub.next()).await {
        if let Ok(v) = serde_json::from_slice::<Value>(&msg.payload) {
            sums.add(&v, subject);
        }
    }
    let _ = sub.unsubscribe().await;
    sums
}

/// The NATS part of `/stats`, reused for [`NATS_PART_TTL`].
async fn nats_part(state: &AppState) -> Value {
    let s = &state.inner;
    let mut cached = s.ui.nats_part.lock().await;
    let stale = s.ui.nats_part_stale.load(Ordering::Relaxed);
    if let Some((at, v)) = cached.as_ref() {
        let ttl = if stale {
            NATS_PART_STALE_TTL
        } else {
            NATS_PART_TTL
        };
        if at.elapsed() < ttl {
            return v.clone();
        }
    }
    s.ui.nats_part_stale.store(false, Ordering::Relaxed);
    let connected = is_connected(&s.client);
    let (routers, local, cloud) = if connected {
        tokio::join!(
            service_stats(&s.client, &s.subjects.router_service, &s.subjects.generate),
            service_stats(
                &s.client,
                &s.subjects.local_service,
                &s.subjects.provider_local
            ),
            service_stats(
                &s.client,
                &s.subjects.cloud_service,
                &s.subjects.provider_cloud
            ),
        )
    } else {
        Default::default()
    };
    let v = json!({
        "nats": {"connected": connected},
        "routers": {
            "workers": routers.workers,
            "requests": routers.requests,
            "avg_processing_ms": routers.avg_processing_ms(),
        },
        "local_pool": {"workers": local.workers, "requests": local.requests},
        "cloud_pool": {
            "workers": cloud.workers,
            "requests": cloud.requests,
            "breaker": cloud.breaker(),
            "breaker_states": cloud.breakers,
        },
    });
    *cached = Some((Instant::now(), v.clone()));
    v
}

/// `GET /stats`: what the live panel shows.
async fn stats(State(state): State<AppState>) -> Response {
    let mut v = state.inner.ui.snapshot(Instant::now());
    let nats = nats_part(&state).await;
    if let (Some(obj), Value::Object(extra)) = (v.as_object_mut(), nats) {
        obj.extend(extra);
        obj.insert(
            "uptime_s".into(),
            json!(state.inner.ui.started.elapsed().as_secs()),
        );
    }
    let mut resp = Json(v).into_response();
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Built from JSON so fields added to the wire type later need no change here.
    fn answer(routed: Pool, provider: Pool, cost: f64, cached: bool) -> GenerateResponse {
        let mut a: GenerateResponse = serde_json::from_value(json!({
            "text": format!("answer from {}", provider.as_str()),
            "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30},
            "cost": cost,
            "latency": 0.5,
            "model": "m",
            "routed_to": routed,
            "provider": provider,
            "cached": cached,
        }))
        .unwrap();
        // What the router says a cached answer saved: its original cost.
        if cached {
            a.saved_usd = Some(cost);
            a.cost = 0.0;
        }
        a
    }

    #[test]
    fn totals_window_and_cache_savings() {
        let s = UiStats::new();
        let t0 = Instant::now();
        s.record_at(&answer(Pool::Cloud, Pool::Cloud, 0.002, false), t0);
        s.record_at(&answer(Pool::Local, Pool::Local, 0.000001, false), t0);
        s.record_at(&answer(Pool::Cloud, Pool::Cloud, 0.002, true), t0);
        let v = s.snapshot(t0);
        assert_eq!(v["requests"]["total"], 3);
        assert_eq!(v["requests"]["by_route"]["cloud"], 2);
        assert_eq!(v["cache"]["hits"], 1);
        assert_eq!(v["cache"]["misses"], 2);
        assert!((v["cache"]["cost_saved_usd"].as_f64().unwrap() - 0.002).abs() < 1e-12);
        assert!((v["spend_usd"]["by_provider"]["cloud"].as_f64().unwrap() - 0.002).abs() < 1e-12);
        assert_eq!(v["latency_s"]["count"], 3);
        assert_eq!(v["latency_s"]["p50"], 0.5);
        // A minute later the window is empty, the totals stay.
        let v = s.snapshot(t0 + Duration::from_secs(61));
        assert_eq!(v["latency_s"]["count"], 0);
        assert!(v["latency_s"]["p50"].is_null());
        assert_eq!(v["requests"]["total"], 3);
    }

    #[test]
    fn hits_count_the_saving_they_carry() {
        let s = UiStats::new();
        let now = Instant::now();
        s.record_at(&answer(Pool::Cloud, Pool::Cloud, 0.003, true), now);
        // No saving stated, or one that is not a real amount: nothing counted.
        let mut bare = answer(Pool::Cloud, Pool::Cloud, 0.0, true);
        bare.saved_usd = None;
        s.record_at(&bare, now);
        let mut bad = answer(Pool::Local, Pool::Local, 0.0, true);
        bad.saved_usd = Some(f64::NAN);
        s.record_at(&bad, now);
        let v = s.snapshot(now);
        assert_eq!(v["cache"]["hits"], 3);
        assert!((v["cache"]["cost_saved_usd"].as_f64().unwrap() - 0.003).abs() < 1e-12);
        assert_eq!(v["spend_usd"]["total"], 0.0);
    }

    #[test]
    fn a_fallback_makes_the_nats_part_stale() {
        let s = UiStats::new();
        let now = Instant::now();
        s.record_at(&answer(Pool::Cloud, Pool::Cloud, 0.001, false), now);
        assert!(!s.nats_part_stale.load(Ordering::Relaxed));
        let mut open = answer(Pool::Cloud, Pool::Local, 0.0, false);
        open.fallback_reason = Some(optiroute_common::ErrorKind::CircuitOpen);
        s.record_at(&open, now);
        assert!(s.nats_part_stale.load(Ordering::Relaxed));
        assert_eq!(
            s.snapshot(now)["requests"]["fallbacks"]["by_reason"]["circuit_open"],
            1
        );
    }

    #[test]
    fn quantiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), Some(50.0));
        assert_eq!(quantile(&v, 0.95), Some(95.0));
        assert_eq!(quantile(&[3.0], 0.95), Some(3.0));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn service_sums_count_only_our_subject() {
        let mut s = ServiceSums::default();
        let reply = |subject: &str, n: u64| {
            json!({"endpoints": [{"subject": subject, "num_requests": n, "num_errors": 1,
                                  "average_processing_time": 2_000_000}]})
        };
        s.add(&reply("optiroute.generate", 3), "optiroute.generate");
        s.add(&reply("optiroute.generate", 1), "optiroute.generate");
        s.add(&reply("blue.generate", 50), "optiroute.generate");
        s.add(&json!({"garbage": true}), "optiroute.generate");
        assert_eq!(s.workers, 2);
        assert_eq!(s.requests, 4);
        assert_eq!(s.avg_processing_ms(), Some(2.0));
        assert_eq!(s.breaker(), "unknown");
    }

    #[test]
    fn breaker_is_what_the_cloud_workers_publish() {
        let subject = "optiroute.provider.cloud";
        let reply = |state: &str| {
            json!({"endpoints": [{"subject": subject, "num_requests": 1,
                                  "data": {"breaker": state}}]})
        };
        let mut s = ServiceSums::default();
        s.add(&reply("open"), subject);
        assert_eq!(s.breaker(), "open");
        s.add(&reply("open"), subject);
        assert_eq!(s.breaker(), "open");
        s.add(&reply("closed"), subject);
        assert_eq!(s.breaker(), "mixed");
        assert_eq!(s.breakers["open"], 2);
        // Another deployment's cloud workers do not count.
        let mut s = ServiceSums::default();
        s.add(&reply("half_open"), subject);
        s.add(&reply("open"), "blue.provider.cloud");
        assert_eq!(s.breaker(), "half_open");
    }
}
