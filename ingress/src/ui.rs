//! The web UI: a chat page at `/` (static files embedded in the binary) and
//! the small JSON stats endpoint `GET /stats` its live panel polls.
//!
//! `/stats` is built from two sources, never from Prometheus:
//! - the ingress's own view of the answers it relays ([`UiStats::record`]):
//!   spend by provider, cache hits and the cost they saved, routes, fallbacks,
//!   the last cloud-routed outcome (for the breaker state) and a rolling
//!   60-second window of latencies;
//! - the NATS service API: `$SRV.STATS` of the routers and of both provider
//!   pools, whose replies are collected on an inbox for a short while.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
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
use optiroute_common::wire::{GenerateResponse, Pool};
use optiroute_common::ErrorKind;
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
/// Fresh answers remembered (by a fingerprint) so a later cache hit on one of
/// them can be credited with exactly what it cost.
const MAX_REMEMBERED_COSTS: usize = 4_096;
/// How long replies to a `$SRV.STATS` request are collected.
const DISCOVERY_WINDOW: Duration = Duration::from_millis(150);
/// `/stats` reuses the NATS part for this long, so many open pages polling
/// every few seconds cost NATS one round per second at most.
const NATS_PART_TTL: Duration = Duration::from_secs(1);

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
    cost_saved: f64,
    /// Part of `cost_saved` estimated from the per-model price per token
    /// (the hit's original answer went through another ingress, or long ago).
    cost_saved_estimated: f64,
    fallbacks: BTreeMap<&'static str, u64>,
    tokens: u64,
    /// Fingerprint of a fresh answer → its cost, for crediting cache hits.
    costs: HashMap<u64, f64>,
    costs_order: VecDeque<u64>,
    /// Per (provider, model): (USD, tokens) of fresh answers, for estimates.
    rates: HashMap<(Pool, String), (f64, u64)>,
    last_cloud: Option<CloudOutcome>,
}

/// What the most recent cloud-routed, uncached answer says about the breaker.
#[derive(Clone, Copy)]
struct CloudOutcome {
    at: Instant,
    provider: Pool,
    fallback: Option<ErrorKind>,
}

fn idx(p: Pool) -> usize {
    match p {
        Pool::Local => 0,
        Pool::Cloud => 1,
    }
}

/// Identifies an answer across a cache round trip: a hit carries the text,
/// model, provider and usage of the answer that was stored.
fn fingerprint(a: &GenerateResponse) -> u64 {
    let mut h = DefaultHasher::new();
    a.text.hash(&mut h);
    a.model.hash(&mut h);
    a.provider.hash(&mut h);
    a.usage.prompt_tokens.hash(&mut h);
    a.usage.completion_tokens.hash(&mut h);
    h.finish()
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
    pub fn record_failure(&self) {
        self.lock().failed += 1;
    }

    fn record_at(&self, a: &GenerateResponse, now: Instant) {
        let cost = if a.cost.is_finite() && a.cost > 0.0 {
            a.cost
        } else {
            0.0
        };
        let latency = if a.latency.is_finite() && a.latency >= 0.0 {
            a.latency
        } else {
            0.0
        };
        let fp = fingerprint(a);
        let mut t = self.lock();
        t.answers += 1;
        t.tokens = t.tokens.saturating_add(u64::from(a.usage.total_tokens));
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
            if let Some(c) = t.costs.get(&fp).copied() {
                t.cost_saved += c;
            } else if let Some(&(usd, tokens)) = t.rates.get(&(a.provider, a.model.clone())) {
                if tokens > 0 {
                    let est = usd / tokens as f64 * f64::from(a.usage.total_tokens);
                    t.cost_saved += est;
                    t.cost_saved_estimated += est;
                }
            }
            return;
        }
        t.cache_misses += 1;
        if !t.costs.contains_key(&fp) {
            t.costs_order.push_back(fp);
            while t.costs_order.len() > MAX_REMEMBERED_COSTS {
                if let Some(old) = t.costs_order.pop_front() {
                    t.costs.remove(&old);
                }
            }
        }
        t.costs.insert(fp, cost);
        let rate = t.rates.entry((a.provider, a.model.clone())).or_default();
        rate.0 += cost;
        rate.1 = rate.1.saturating_add(u64::from(a.usage.total_tokens));
        if a.routed_to == Pool::Cloud {
            t.last_cloud = Some(CloudOutcome {
                at: now,
                provider: a.provider,
                fallback: a.fallback_reason,
            });
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
                saved_estimated: t.cost_saved_estimated,
                fallbacks: t.fallbacks.clone(),
                tokens: t.tokens,
                last_cloud: t.last_cloud,
            };
            (t, lat)
        };
        lat.sort_by(f64::total_cmp);
        let lookups = t.hits + t.misses;
        let hit_ratio = (lookups > 0).then(|| t.hits as f64 / lookups as f64);
        let (breaker, breaker_basis) = match t.last_cloud {
            Some(o) if o.fallback == Some(ErrorKind::CircuitOpen) => (
                "open",
                json!({"fallback_reason": "circuit_open", "seconds_ago": secs_since(o.at, now)}),
            ),
            Some(o) if o.provider == Pool::Cloud => (
                "closed",
                json!({"provider": "cloud", "seconds_ago": secs_since(o.at, now)}),
            ),
            Some(o) => (
                "unknown",
                json!({
                    "provider": o.provider.as_str(),
                    "fallback_reason": o.fallback.map(ErrorKind::as_str),
                    "seconds_ago": secs_since(o.at, now),
                }),
            ),
            None => ("unknown", Value::Null),
        };
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
                "cost_saved_estimated_usd": t.saved_estimated,
            },
            "latency_s": {
                "window_s": WINDOW.as_secs(),
                "count": lat.len(),
                "p50": quantile(&lat, 0.50),
                "p95": quantile(&lat, 0.95),
            },
            "breaker": {"state": breaker, "last_cloud_routed": breaker_basis},
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
    saved_estimated: f64,
    fallbacks: BTreeMap<&'static str, u64>,
    tokens: u64,
    last_cloud: Option<CloudOutcome>,
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

fn secs_since(at: Instant, now: Instant) -> f64 {
    (now.saturating_duration_since(at).as_secs_f64() * 10.0).round() / 10.0
}

/// Sums of the `$SRV.STATS` replies of one service, counting only the
/// instances that serve `subject` (another deployment with another prefix
/// may run a service of the same name on the same NATS).
#[derive(Default, Debug, PartialEq)]
struct ServiceSums {
    workers: u64,
    requests: u64,
    processing_ns: f64,
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
        .publish_with_reply(format!("$SRV.STATS.{service}"), inbox, Bytes::new())
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
    if let Some((at, v)) = cached.as_ref() {
        if at.elapsed() < NATS_PART_TTL {
            return v.clone();
        }
    }
    let connected = is_connected(&s.client);
    let (routers, local, cloud) = if connected {
        tokio::join!(
            service_stats(&s.client, "optiroute-router", &s.subjects.generate),
            service_stats(&s.client, "optiroute-local", &s.subjects.provider_local),
            service_stats(&s.client, "optiroute-cloud", &s.subjects.provider_cloud),
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
        "cloud_pool": {"workers": cloud.workers, "requests": cloud.requests},
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
        // The breaker state belongs with the cloud pool it describes.
        if let Some(b) = obj.remove("breaker") {
            if let Some(cloud) = obj.get_mut("cloud_pool").and_then(Value::as_object_mut) {
                cloud.insert("breaker".into(), b["state"].clone());
                cloud.insert("breaker_basis".into(), b["last_cloud_routed"].clone());
            }
        }
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
        serde_json::from_value(json!({
            "text": format!("answer from {}", provider.as_str()),
            "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30},
            "cost": cost,
            "latency": 0.5,
            "model": "m",
            "routed_to": routed,
            "provider": provider,
            "cached": cached,
        }))
        .unwrap()
    }

    #[test]
    fn totals_window_and_cache_savings() {
        let s = UiStats::new();
        let t0 = Instant::now();
        s.record_at(&answer(Pool::Cloud, Pool::Cloud, 0.002, false), t0);
        s.record_at(&answer(Pool::Local, Pool::Local, 0.000001, false), t0);
        s.record_at(&answer(Pool::Cloud, Pool::Cloud, 0.0, true), t0);
        let v = s.snapshot(t0);
        assert_eq!(v["requests"]["total"], 3);
        assert_eq!(v["requests"]["by_route"]["cloud"], 2);
        assert_eq!(v["cache"]["hits"], 1);
        assert_eq!(v["cache"]["misses"], 2);
        assert!((v["cache"]["cost_saved_usd"].as_f64().unwrap() - 0.002).abs() < 1e-12);
        assert_eq!(v["cache"]["cost_saved_estimated_usd"], 0.0);
        assert!((v["spend_usd"]["by_provider"]["cloud"].as_f64().unwrap() - 0.002).abs() < 1e-12);
        assert_eq!(v["latency_s"]["count"], 3);
        assert_eq!(v["latency_s"]["p50"], 0.5);
        assert_eq!(v["breaker"]["state"], "closed");
        // A minute later the window is empty, the totals stay.
        let v = s.snapshot(t0 + Duration::from_secs(61));
        assert_eq!(v["latency_s"]["count"], 0);
        assert!(v["latency_s"]["p50"].is_null());
        assert_eq!(v["requests"]["total"], 3);
    }

    #[test]
    fn unknown_hit_is_estimated_from_the_model_rate() {
        let s = UiStats::new();
        let now = Instant::now();
        s.record_at(&answer(Pool::Cloud, Pool::Cloud, 0.003, false), now);
        let mut hit = answer(Pool::Cloud, Pool::Cloud, 0.0, true);
        hit.text = "something else".into();
        s.record_at(&hit, now);
        let v = s.snapshot(now);
        assert!((v["cache"]["cost_saved_estimated_usd"].as_f64().unwrap() - 0.003).abs() < 1e-12);
    }

    #[test]
    fn breaker_follows_the_last_cloud_routed_answer() {
        let s = UiStats::new();
        let now = Instant::now();
        assert_eq!(s.snapshot(now)["breaker"]["state"], "unknown");
        let mut open = answer(Pool::Cloud, Pool::Local, 0.0, false);
        open.fallback_reason = Some(ErrorKind::CircuitOpen);
        s.record_at(&open, now);
        assert_eq!(s.snapshot(now)["breaker"]["state"], "open");
        assert_eq!(
            s.snapshot(now)["requests"]["fallbacks"]["by_reason"]["circuit_open"],
            1
        );
        // Local-routed and cached answers say nothing about the breaker.
        s.record_at(&answer(Pool::Local, Pool::Local, 0.0, false), now);
        s.record_at(&answer(Pool::Cloud, Pool::Cloud, 0.0, true), now);
        assert_eq!(s.snapshot(now)["breaker"]["state"], "open");
        let mut timeout = answer(Pool::Cloud, Pool::Local, 0.0, false);
        timeout.fallback_reason = Some(ErrorKind::Timeout);
        s.record_at(&timeout, now);
        assert_eq!(s.snapshot(now)["breaker"]["state"], "unknown");
        s.record_at(&answer(Pool::Cloud, Pool::Cloud, 0.001, false), now);
        assert_eq!(s.snapshot(now)["breaker"]["state"], "closed");
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
    }
}
