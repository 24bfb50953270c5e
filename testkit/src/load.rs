//! Closed-loop load on one or more ingresses for fault tests: every
//! request recorded (when it was sent and answered, its status, whether its
//! answer was right), and what a fault did to it (failures, the longest gap
//! without a success, how long until throughput was back).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// One request: when it was sent (since the load's start), how long it
/// took, its status (0: no answer within the client's timeout), whether the
/// answer was right and who answered.
#[derive(Clone, Debug)]
pub struct Sample {
    pub sent: Duration,
    pub took: Duration,
    pub status: u16,
    pub right: bool,
    pub provider: Option<String>,
    /// Answered from the cache.
    pub cached: bool,
    /// The answer's `cost` (0 when it failed).
    pub cost: f64,
    /// A failure's error code and message.
    pub error: Option<String>,
}

impl Sample {
    pub fn done(&self) -> Duration {
        self.sent + self.took
    }
}

/// Builds request `n`'s `/generate` body; checks an answer to it.
pub trait Workload: Send + Sync + 'static {
    fn body(&self, n: u64) -> Value;
    fn is_right(&self, body: &Value, answer: &Value) -> bool;
}

pub struct Load {
    pub t0: Instant,
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// `concurrency` workers, each sending to `bases` in turn, until
    /// [`Load::stop`]. A request unanswered after `client_timeout` counts
    /// as status 0 (a hang).
    pub fn start(
        bases: Vec<String>,
        concurrency: usize,
        client_timeout: Duration,
        workload: impl Workload,
    ) -> Load {
        Self::start_as(bases, concurrency, client_timeout, workload, None)
    }

    /// [`Load::start`] with every request carrying `api_key` as a bearer token.
    pub fn start_as(
        bases: Vec<String>,
        concurrency: usize,
        client_timeout: Duration,
        workload: impl Workload,
        api_key: Option<String>,
    ) -> Load {
        let t0 = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let counter = Arc::new(AtomicU64::new(0));
        let workload = Arc::new(workload);
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(k) = api_key {
            headers.insert(
                reqwest::header::AUTHORIZATION,
                format!("Bearer {k}").parse().unwrap(),
            );
        }
        let http = reqwest::Client::builder()
            .timeout(client_timeout)
            .default_headers(headers)
            .build()
            .unwrap();
        let tasks = (0..concurrency)
            .map(|w| {
                let (http, bases, stop, samples, counter, workload) = (
                    http.clone(),
                    bases.clone(),
                    stop.clone(),
                    samples.clone(),
                    counter.clone(),
                    workload.clone(),
                );
                tokio::spawn(async move {
                    let mut turn = w;
                    while !stop.load(Ordering::Relaxed) {
                        turn += 1;
                        let body = workload.body(counter.fetch_add(1, Ordering::Relaxed));
                        let sent = t0.elapsed();
                        let r = http
                            .post(format!("{}/generate", bases[turn % bases.len()]))
                            .json(&body)
                            .send()
                            .await;
                        let (status, answer) = match r {
                            Ok(r) => {
                                let status = r.status().as_u16();
                                (status, r.json().await.unwrap_or(Value::Null))
                            }
                            Err(_) => (0, Value::Null),
                        };
                        let took = t0.elapsed() - sent;
                        let right = status != 200 || workload.is_right(&body, &answer);
                        let provider = answer["provider"].as_str().map(str::to_string);
                        let cached = answer["cached"] == true;
                        let cost = answer["cost"].as_f64().unwrap_or(0.0);
                        let error = (status != 200).then(|| {
                            format!(
                                "{}: {}",
                                answer["error"]["code"], answer["error"]["message"]
                            )
                        });
                        samples.lock().unwrap().push(Sample {
                            sent,
                            took,
                            status,
                            right,
                            provider,
                            cached,
                            cost,
                            error,
                        });
                    }
                })
            })
            .collect();
        Load {
            t0,
            stop,
            samples,
            tasks,
        }
    }

    /// Stops the workers (each finishes its request) and returns every sample.
    pub async fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let samples = self.samples.lock().unwrap().clone();
        samples
    }
}

/// Successes per second among the samples answered before `until`.
pub fn rate_before(samples: &[Sample], until: Duration) -> f64 {
    rate_between(samples, Duration::ZERO, until)
}

/// Successes per second among the samples answered in `[from, until)`.
pub fn rate_between(samples: &[Sample], from: Duration, until: Duration) -> f64 {
    samples
        .iter()
        .filter(|s| s.status == 200 && s.done() >= from && s.done() < until)
        .count() as f64
        / (until - from).as_secs_f64()
}

/// The longest time between two successive successes.
pub fn longest_gap(samples: &[Sample]) -> Duration {
    let mut done: Vec<Duration> = samples
        .iter()
        .filter(|s| s.status == 200)
        .map(Sample::done)
        .collect();
    done.sort();
    done.windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
}

/// How long after `from` until the successes per 250 ms stayed at 80 % of
/// `rate` (per second) or more for the rest of the run: the end of the last
/// slower interval (zero if none was slower); `None` if the run ended slow.
pub fn recovery(samples: &[Sample], from: Duration, rate: f64) -> Option<Duration> {
    let bucket = Duration::from_millis(250);
    // The last interval is left out: the workers stop during it.
    let end = samples
        .iter()
        .map(Sample::done)
        .max()?
        .checked_sub(bucket)?;
    let mut t = from;
    let mut back = Some(Duration::ZERO);
    while t + bucket <= end {
        let n = samples
            .iter()
            .filter(|s| s.status == 200 && s.done() >= t && s.done() < t + bucket)
            .count() as f64;
        back = if n / bucket.as_secs_f64() >= 0.8 * rate {
            back.or(Some(t - from))
        } else {
            None
        };
        t += bucket;
    }
    back
}

/// Failed samples counted by status, for a report.
pub fn failures_by_status(samples: &[Sample]) -> Vec<(u16, usize)> {
    let mut by: std::collections::BTreeMap<u16, usize> = Default::default();
    for s in samples.iter().filter(|s| s.status != 200) {
        *by.entry(s.status).or_default() += 1;
    }
    by.into_iter().collect()
}
