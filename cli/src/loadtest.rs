//! `optiroute loadtest`: drives `POST /generate` (or an OpenAI-style
//! `/v1/chat/completions`) and reports latency, throughput, failures, cache
//! hits, routing and cost.
//!
//! Three load models:
//! - `original`: the original OptiRoute's Locust scenario. Users start at
//!   `--spawn-rate` per second, each sends a request, waits for the answer,
//!   thinks 1–4 s, and again.
//! - `closed`: `--concurrency` users with no think time: the most the stack
//!   serves at that concurrency.
//! - `open`: arrivals scheduled at `--rate` per second whatever the answers
//!   do; latency counts from the scheduled send time, so a stalled server
//!   shows up in the percentiles (no coordinated omission).

mod http;
pub mod stats;
pub mod workload;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::args::Args;
use stats::{Answer, Record, Report};
use workload::{Rng, Workload};

pub const USAGE: &str = "optiroute loadtest [options]
  --url URL             target (default http://127.0.0.1:8000; /generate, or
                        /v1/chat/completions with --api openai, is added when URL has no path)
  --mode MODE           original | closed | open (default original)
  --users N             original mode: simulated users (default 50)
  --spawn-rate R        users started per second (default 5 in original mode, all at once otherwise)
  --duration S          seconds of load (default 60)
  --think-min S, --think-max S
                        think time between a user's requests, uniform
                        (default 1..4 in original mode, 0 otherwise)
  --concurrency N       closed mode: users without think time (default 8)
  --rate R              open mode: requests per second, evenly scheduled (default 10)
  --max-in-flight N     open mode: cap on outstanding requests; waiting for a slot
                        counts in the latency (default 4096)
  --workload W          original (the original's 2 prompts: 75 % short, 25 % complex)
                        | unique (a new prompt each request: every request misses the cache)
                        | FILE.jsonl (one {\"prompt\", \"provider\"?, \"max_tokens\"?} a line,
                          drawn with Zipf popularity: line 1 is the most popular)
  --zipf S              Zipf exponent for a workload file (default 1.0; 0 = uniform)
  --provider P          provider for every request (auto, local, cloud); a file's own wins
  --max-tokens N        max_tokens for every request; a file's own wins
  --cache-off           send \"cache\": \"off\"
  --api API             generate (OptiRoute /generate, default) | openai (chat completions)
  --model M             model for --api openai (default fake)
  --timeout S           per-request timeout (default 35)
  --api-key KEY         send `Authorization: Bearer KEY` (default: $OPTIROUTE_API_KEY)
  --seed N              random seed (default 42)
  --cloud-price-per-1k USD
                        price of 1k tokens for the all-cloud estimate (default 0.0002)
  --csv PREFIX          write PREFIX_stats.csv (Locust's _stats.csv shape, times in ms)
  --json FILE           write the summary as JSON
  --quiet               no progress line";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Original,
    Closed,
    Open,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Generate,
    Openai,
}

#[derive(Debug, Clone)]
pub enum WorkloadSpec {
    Original,
    Unique,
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct Options {
    pub url: String,
    pub api_key: Option<String>,
    pub mode: Mode,
    pub users: usize,
    pub spawn_rate: f64,
    pub duration: Duration,
    pub think_min: f64,
    pub think_max: f64,
    pub rate: f64,
    pub max_in_flight: usize,
    pub workload: WorkloadSpec,
    pub zipf: f64,
    pub provider: Option<String>,
    pub max_tokens: Option<u32>,
    pub cache_off: bool,
    pub api: Api,
    pub model: String,
    pub timeout: Duration,
    pub seed: u64,
    pub cloud_price_per_1k: f64,
    pub csv: Option<String>,
    pub json: Option<PathBuf>,
    pub quiet: bool,
}

fn positive(name: &str, v: f64) -> Result<f64, String> {
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(format!("--{name} must be a positive number"))
    }
}

fn non_negative(name: &str, v: f64) -> Result<f64, String> {
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(format!("--{name} must be zero or more"))
    }
}

impl Options {
    pub fn parse(args: &mut Args) -> Result<Options, String> {
        let mode = match args.value("mode")?.as_deref() {
            None | Some("original") => Mode::Original,
            Some("closed") => Mode::Closed,
            Some("open") => Mode::Open,
            Some(other) => {
                return Err(format!(
                    "--mode `{other}`: expected original, closed or open"
                ))
            }
        };
        let api = match args.value("api")?.as_deref() {
            None | Some("generate") => Api::Generate,
            Some("openai") => Api::Openai,
            Some(other) => return Err(format!("--api `{other}`: expected generate or openai")),
        };
        let users: Option<usize> = args.parsed("users")?;
        let concurrency: Option<usize> = args.parsed("concurrency")?;
        let users = match mode {
            Mode::Original => users.or(concurrency).unwrap_or(50),
            _ => concurrency.or(users).unwrap_or(8),
        };
        if users == 0 {
            return Err("--users / --concurrency must be at least 1".into());
        }
        let original = mode == Mode::Original;
        let spawn_rate = match args.parsed::<f64>("spawn-rate")? {
            Some(r) => non_negative("spawn-rate", r)?,
            None if original => 5.0,
            None => 0.0,
        };
        let duration = positive("duration", args.parsed("duration")?.unwrap_or(60.0))?;
        let (dmin, dmax): (f64, f64) = if original { (1.0, 4.0) } else { (0.0, 0.0) };
        let think_min = non_negative("think-min", args.parsed("think-min")?.unwrap_or(dmin))?;
        let think_max = non_negative(
            "think-max",
            args.parsed("think-max")?.unwrap_or(dmax.max(think_min)),
        )?;
        if think_max < think_min {
            return Err("--think-max must not be below --think-min".into());
        }
        let rate = positive("rate", args.parsed("rate")?.unwrap_or(10.0))?;
        let max_in_flight = args.parsed("max-in-flight")?.unwrap_or(4096usize).max(1);
        let workload = match args.value("workload")?.as_deref() {
            None | Some("original") => WorkloadSpec::Original,
            Some("unique") => WorkloadSpec::Unique,
            Some(path) => WorkloadSpec::File(PathBuf::from(path)),
        };
        let zipf = non_negative("zipf", args.parsed("zipf")?.unwrap_or(1.0))?;
        let timeout = positive("timeout", args.parsed("timeout")?.unwrap_or(35.0))?;
        let default_path = match api {
            Api::Generate => "/generate",
            Api::Openai => "/v1/chat/completions",
        };
        let url = target_url(
            &args
                .value("url")?
                .unwrap_or_else(|| "http://127.0.0.1:8000".into()),
            default_path,
        )?;
        let api_key = args.value("api-key")?.or_else(|| {
            std::env::var("OPTIROUTE_API_KEY")
                .ok()
                .filter(|k| !k.is_empty())
        });
        Ok(Options {
            url,
            api_key,
            mode,
            users,
            spawn_rate,
            duration: Duration::from_secs_f64(duration),
            think_min,
            think_max,
            rate,
            max_in_flight,
            workload,
            zipf,
            provider: args.value("provider")?,
            max_tokens: args.parsed("max-tokens")?,
            cache_off: args.switch("cache-off"),
            api,
            model: args.value("model")?.unwrap_or_else(|| "fake".into()),
            timeout: Duration::from_secs_f64(timeout),
            seed: args.parsed("seed")?.unwrap_or(42),
            cloud_price_per_1k: non_negative(
                "cloud-price-per-1k",
                args.parsed("cloud-price-per-1k")?.unwrap_or(0.0002),
            )?,
            csv: args.value("csv")?,
            json: args.value("json")?.map(PathBuf::from),
            quiet: args.switch("quiet"),
        })
    }

    fn describe(&self) -> String {
        let load = match self.mode {
            Mode::Original | Mode::Closed => {
                let spawn = if self.spawn_rate > 0.0 {
                    format!("spawn {}/s", self.spawn_rate)
                } else {
                    "all at once".into()
                };
                let think = if self.think_max > 0.0 {
                    format!(", think {}–{} s", self.think_min, self.think_max)
                } else {
                    ", no think time".into()
                };
                let who = if self.mode == Mode::Original {
                    "users"
                } else {
                    "concurrency"
                };
                format!(
                    "{} {who} {} ({spawn}{think})",
                    mode_name(self.mode),
                    self.users
                )
            }
            Mode::Open => format!(
                "open, {} req/s scheduled (max {} in flight)",
                self.rate, self.max_in_flight
            ),
        };
        let workload = match &self.workload {
            WorkloadSpec::Original => "original (75 % short, 25 % complex)".to_string(),
            WorkloadSpec::Unique => "unique prompts".to_string(),
            WorkloadSpec::File(p) => format!("{} (zipf {})", p.display(), self.zipf),
        };
        format!(
            "{load}, {} s, workload {workload}{}, {}",
            self.duration.as_secs_f64(),
            if self.cache_off { ", cache off" } else { "" },
            self.url
        )
    }
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Original => "original",
        Mode::Closed => "closed",
        Mode::Open => "open",
    }
}

/// `base` with `default_path` added when it has no path of its own.
fn target_url(base: &str, default_path: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(base).map_err(|e| format!("--url `{base}`: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("--url `{base}`: expected http:// or https://"));
    }
    if url.path() == "/" || url.path().is_empty() {
        Ok(format!("{}{default_path}", base.trim_end_matches('/')))
    } else {
        Ok(base.to_string())
    }
}

/// The JSON body for one request.
fn body(opts: &Options, d: &workload::Drawn<'_>) -> String {
    let max_tokens = d.max_tokens.or(opts.max_tokens);
    let v = match opts.api {
        Api::Generate => {
            let mut v = serde_json::json!({ "prompt": d.prompt });
            if let Some(p) = d.provider.or(opts.provider.as_deref()) {
                v["provider"] = p.into();
            }
            if let Some(n) = max_tokens {
                v["max_tokens"] = n.into();
            }
            if opts.cache_off {
                v["cache"] = "off".into();
            }
            v
        }
        Api::Openai => serde_json::json!({
            "model": opts.model,
            "messages": [{"role": "user", "content": d.prompt}],
            "max_tokens": max_tokens.unwrap_or(100),
        }),
    };
    v.to_string()
}

#[derive(Deserialize)]
struct WireAnswer {
    #[serde(default)]
    cached: Option<bool>,
    #[serde(default)]
    routed_to: Option<String>,
    #[serde(default)]
    provider: Option<String>,
    #[serde(default)]
    fallback_reason: Option<serde_json::Value>,
    #[serde(default)]
    cost: Option<f64>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: Option<u32>,
    #[serde(default)]
    completion_tokens: Option<u32>,
}

#[derive(Deserialize)]
struct WireError {
    error: WireErrorBody,
}

#[derive(Deserialize)]
struct WireErrorBody {
    #[serde(default)]
    code: Option<String>,
}

/// Reads an answer body: the answer's fields, or the failure kind.
fn parse_answer(status: u16, body: &[u8]) -> Result<Answer, String> {
    if !(200..300).contains(&status) {
        let code = serde_json::from_slice::<WireError>(body)
            .ok()
            .and_then(|e| e.error.code);
        return Err(match code {
            Some(c) => format!("HTTP {status} {c}"),
            None => format!("HTTP {status}"),
        });
    }
    let a: WireAnswer =
        serde_json::from_slice(body).map_err(|_| "invalid JSON answer".to_string())?;
    Ok(Answer {
        cached: a.cached,
        routed_to: a.routed_to,
        provider: a.provider,
        fallback: a.fallback_reason.is_some_and(|v| !v.is_null()),
        cost: a.cost,
        prompt_tokens: a.usage.as_ref().and_then(|u| u.prompt_tokens),
        completion_tokens: a.usage.as_ref().and_then(|u| u.completion_tokens),
    })
}

/// What the progress line shows and the report is computed from.
#[derive(Default)]
struct Recorder {
    records: Vec<Record>,
    /// Latencies (µs) finished since the last progress line.
    window: Vec<u64>,
    window_failures: u64,
    failures: u64,
    last_done: Option<Instant>,
}

struct Shared {
    opts: Options,
    client: http::Client,
    workload: Workload,
    recorder: Mutex<Recorder>,
    seq: AtomicU64,
    end: Instant,
}

impl Shared {
    fn record(&self, rec: Record) {
        let Ok(mut r) = self.recorder.lock() else {
            return;
        };
        r.window.push(rec.latency_us);
        if rec.outcome.is_err() {
            r.failures += 1;
            r.window_failures += 1;
        }
        r.last_done = Some(Instant::now());
        r.records.push(rec);
    }

    /// Sends one request drawn from the workload; latency counts from `intended`.
    async fn send(&self, rng: &mut Rng, intended: Instant) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let drawn = self.workload.draw(rng, seq);
        let body = body(&self.opts, &drawn);
        let prompt_chars = drawn.prompt.chars().count();
        let item = drawn.item;
        let (outcome, size) = match self.client.post_json(body).await {
            Ok((status, b)) => (parse_answer(status, &b), b.len()),
            Err(e) => (Err(e), 0),
        };
        self.record(Record {
            latency_us: intended.elapsed().as_micros() as u64,
            item,
            prompt_chars,
            content_size: size,
            outcome,
        });
    }
}

/// A user of the original and closed models: request, think, repeat.
async fn user(shared: Arc<Shared>, id: u64, start_at: Instant) {
    tokio::time::sleep_until(start_at).await;
    let mut rng = Rng::for_stream(shared.opts.seed, id);
    while Instant::now() < shared.end {
        shared.send(&mut rng, Instant::now()).await;
        let think = rng.range_f64(shared.opts.think_min, shared.opts.think_max);
        if think > 0.0 {
            let wake = Instant::now() + Duration::from_secs_f64(think);
            tokio::time::sleep_until(wake.min(shared.end)).await;
        }
    }
}

/// The open model: one arrival every `1 / rate` s from `start`, each sent
/// on its own task; latency counts from the arrival's scheduled time.
async fn open_loop(shared: Arc<Shared>, start: Instant, tasks: &mut JoinSet<()>) {
    let interval = 1.0 / shared.opts.rate;
    let slots = Arc::new(Semaphore::new(shared.opts.max_in_flight));
    for i in 0u64.. {
        let at = start + Duration::from_secs_f64(i as f64 * interval);
        if at >= shared.end {
            break;
        }
        tokio::time::sleep_until(at).await;
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let s = shared.clone();
        tasks.spawn(async move {
            let mut rng = Rng::for_stream(s.opts.seed, i);
            s.send(&mut rng, at).await;
            drop(permit);
        });
    }
}

/// Prints one progress line a second until aborted.
async fn progress(shared: Arc<Shared>, start: Instant) {
    let tty = std::io::stderr().is_terminal();
    let mut tick = tokio::time::interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
    let mut last = start;
    loop {
        let now = tick.tick().await;
        let (mut window, window_failures, done, failures) = {
            let Ok(mut r) = shared.recorder.lock() else {
                return;
            };
            let w = std::mem::take(&mut r.window);
            let wf = std::mem::take(&mut r.window_failures);
            (w, wf, r.records.len(), r.failures)
        };
        window.sort_unstable();
        let secs = now.duration_since(last).as_secs_f64().max(1e-9);
        last = now;
        let p50 = stats::percentile(&window, 50.0)
            .map(|us| format!("{:.1} ms", us as f64 / 1000.0))
            .unwrap_or_else(|| "-".into());
        let line = format!(
            "[{:>4.0}s] {done} requests · {:.1} req/s · {failures} failures ({window_failures} this second) · p50 {p50}",
            now.duration_since(start).as_secs_f64(),
            window.len() as f64 / secs,
        );
        let mut err = std::io::stderr().lock();
        let _ = if tty {
            write!(err, "\r\x1b[2K{line}")
        } else {
            writeln!(err, "{line}")
        };
        let _ = err.flush();
    }
}

/// Runs the load test and prints the summary; the process exit code.
pub async fn main(args: Vec<String>) -> std::process::ExitCode {
    let mut args = Args::new(args);
    if args.help() {
        println!("{USAGE}");
        return std::process::ExitCode::SUCCESS;
    }
    let parsed = Options::parse(&mut args).and_then(|o| args.finish().map(|()| o));
    let opts = match parsed {
        Ok(o) => o,
        Err(e) => {
            eprintln!("optiroute loadtest: {e}\n{USAGE}");
            return std::process::ExitCode::from(2);
        }
    };
    match run(opts).await {
        Ok(_) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("optiroute loadtest: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs the load test described by `opts`, prints the summary, writes the
/// CSV and JSON files asked for, and returns the report.
pub async fn run(opts: Options) -> Result<Report, String> {
    let workload = match &opts.workload {
        WorkloadSpec::Original => Workload::original(),
        WorkloadSpec::Unique => Workload::Unique {
            nonce: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
                ^ opts.seed,
        },
        WorkloadSpec::File(p) => Workload::catalogue(workload::read_jsonl(p)?, opts.zipf),
    };
    let client = http::Client::new(&opts.url, opts.timeout, opts.api_key.as_deref())?;
    let description = opts.describe();
    eprintln!("optiroute loadtest: {description}");
    let start = Instant::now();
    let shared = Arc::new(Shared {
        end: start + opts.duration,
        opts,
        client,
        workload,
        recorder: Mutex::new(Recorder::default()),
        seq: AtomicU64::new(0),
    });
    let progress_task = (!shared.opts.quiet).then(|| tokio::spawn(progress(shared.clone(), start)));
    let mut tasks = JoinSet::new();
    match shared.opts.mode {
        Mode::Original | Mode::Closed => {
            for id in 0..shared.opts.users {
                let at = if shared.opts.spawn_rate > 0.0 {
                    start + Duration::from_secs_f64(id as f64 / shared.opts.spawn_rate)
                } else {
                    start
                };
                tasks.spawn(user(shared.clone(), id as u64, at));
            }
        }
        Mode::Open => open_loop(shared.clone(), start, &mut tasks).await,
    }
    // Requests in flight at the end finish (each bounded by its timeout).
    while tasks.join_next().await.is_some() {}
    if let Some(t) = progress_task {
        t.abort();
        if std::io::stderr().is_terminal() {
            eprintln!();
        }
    }
    let (records, last_done) = {
        let mut r = shared
            .recorder
            .lock()
            .map_err(|_| "a request task panicked".to_string())?;
        (std::mem::take(&mut r.records), r.last_done)
    };
    let elapsed = last_done.unwrap_or_else(Instant::now).duration_since(start);
    let report = stats::report(
        &records,
        elapsed.as_secs_f64(),
        shared.opts.cloud_price_per_1k,
    );
    println!(
        "{}",
        summary(&description, &report, shared.workload.distinct())
    );
    if let Some(prefix) = &shared.opts.csv {
        let name = reqwest::Url::parse(&shared.opts.url)
            .map(|u| u.path().to_string())
            .unwrap_or_else(|_| "/generate".into());
        let path = format!("{prefix}_stats.csv");
        std::fs::write(&path, stats::stats_csv("POST", &name, &report))
            .map_err(|e| format!("cannot write {path}: {e}"))?;
        eprintln!("optiroute loadtest: wrote {path}");
    }
    if let Some(path) = &shared.opts.json {
        let mut v = serde_json::to_value(&report).map_err(|e| format!("summary JSON: {e}"))?;
        v["scenario"] = description.clone().into();
        let text = serde_json::to_string_pretty(&v).map_err(|e| format!("summary JSON: {e}"))?;
        std::fs::write(path, text + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(report)
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

fn usd(x: f64) -> String {
    if x == 0.0 {
        "$0".into()
    } else if x >= 0.01 {
        format!("${x:.4}")
    } else {
        format!("${x:.3e}")
    }
}

/// The human-readable summary.
pub fn summary(description: &str, r: &Report, distinct: Option<usize>) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!("== optiroute loadtest: {description}"));
    line(format!(
        "requests       {} in {:.1} s = {:.2} req/s",
        r.requests, r.elapsed_s, r.requests_per_s
    ));
    line(format!(
        "failures       {} ({:.2} %)",
        r.failures,
        pct(r.failures, r.requests)
    ));
    for (kind, n) in &r.failures_by_kind {
        line(format!("  {kind:<28} {n}"));
    }
    let l = &r.latency_ms;
    line(format!(
        "latency (ms)   p50 {:.2} · p90 {:.2} · p95 {:.2} · p99 {:.2} · max {:.2} (mean {:.2}, min {:.2})",
        l.p50, l.p90, l.p95, l.p99, l.max, l.mean, l.min
    ));
    let answers = r.requests - r.failures;
    match r.cache_hit_rate {
        Some(rate) => line(format!(
            "cache          hit rate {:.1} % ({} of {} answers{})",
            rate * 100.0,
            r.cache_hits,
            r.answers_with_cache_flag,
            distinct
                .map(|d| format!("; {d} distinct prompts in the workload"))
                .unwrap_or_default()
        )),
        None if answers == 0 => line("cache          (no answers)".into()),
        None => line("cache          (answers carry no `cached` field)".into()),
    }
    let routed = r.routed_local + r.routed_cloud;
    if routed > 0 {
        line(format!(
            "routed         local {:.1} % · cloud {:.1} %   (served by local {:.1} % · cloud {:.1} %)",
            pct(r.routed_local, routed),
            pct(r.routed_cloud, routed),
            pct(r.served_local, routed),
            pct(r.served_cloud, routed)
        ));
        line(format!(
            "fallbacks      {} ({:.2} % of answers)",
            r.fallbacks,
            pct(r.fallbacks, answers)
        ));
    }
    line(format!(
        "cost           total {} · per request {}",
        usd(r.cost_total),
        usd(r.cost_per_request)
    ));
    line(format!(
        "all-cloud      {} without routing or cache (tokens × cloud price){}",
        usd(r.all_cloud_cost),
        r.saved_vs_all_cloud_pct
            .map(|p| format!(": {p:.1} % saved"))
            .unwrap_or_default()
    ));
    if r.cache_hits > 0 {
        line(format!(
            "cache saved    {} ≈ {} of what this run would have cost without the cache",
            usd(r.cache_saved_cost),
            r.cache_saved_pct
                .map(|p| format!("{p:.1} %"))
                .unwrap_or_else(|| "n/a".into())
        ));
    }
    out.trim_end().to_string()
}

#[cfg(test)]
mod tests;
