//! What a load test measured: one record per request, then the figures
//! (percentiles, cache, routing, cost) and Locust's `_stats.csv` shape.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

/// What an answer said about itself (all optional: an OpenAI-style upstream
/// says none of the OptiRoute fields).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Answer {
    pub cached: Option<bool>,
    pub routed_to: Option<String>,
    pub provider: Option<String>,
    pub fallback: bool,
    pub cost: Option<f64>,
    pub prompt_tokens: Option<u32>,
    pub completion_tokens: Option<u32>,
}

/// One finished request.
#[derive(Debug, Clone)]
pub struct Record {
    /// From the intended send time to the last byte of the answer.
    pub latency_us: u64,
    /// The workload item, when the workload has a finite catalogue.
    pub item: Option<usize>,
    pub prompt_chars: usize,
    pub content_size: usize,
    /// The answer, or the failure kind (`HTTP 503 no_responders`, `timeout`...).
    pub outcome: Result<Answer, String>,
}

/// Nearest-rank percentile of sorted values: the smallest value with at least
/// `p` % of the values at or below it. `None` when there are no values.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let n = sorted.len();
    // The epsilon absorbs binary rounding (0.999 × 1000 is 999.0000000000001).
    let rank = (p * n as f64 / 100.0 - 1e-9).ceil() as usize;
    Some(sorted[rank.clamp(1, n) - 1])
}

/// The percentiles of Locust's CSV, in its column order.
pub const CSV_PERCENTILES: [(f64, &str); 11] = [
    (50.0, "50%"),
    (66.0, "66%"),
    (75.0, "75%"),
    (80.0, "80%"),
    (90.0, "90%"),
    (95.0, "95%"),
    (98.0, "98%"),
    (99.0, "99%"),
    (99.9, "99.9%"),
    (99.99, "99.99%"),
    (100.0, "100%"),
];

/// Latency figures in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
    /// Locust's percentile columns, in order.
    pub csv: Vec<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub requests: u64,
    pub failures: u64,
    pub failures_by_kind: BTreeMap<String, u64>,
    pub elapsed_s: f64,
    pub requests_per_s: f64,
    pub failures_per_s: f64,
    /// Over every request, failed ones included (as Locust does).
    pub latency_ms: Latency,
    pub avg_content_size: f64,
    /// Answers that said whether they were cached.
    pub answers_with_cache_flag: u64,
    pub cache_hits: u64,
    pub cache_hit_rate: Option<f64>,
    pub routed_local: u64,
    pub routed_cloud: u64,
    pub served_local: u64,
    pub served_cloud: u64,
    pub fallbacks: u64,
    /// Sum of the answers' `cost` (USD).
    pub cost_total: f64,
    pub cost_per_request: f64,
    /// What the answers would have cost had every request gone to the cloud
    /// without a cache: tokens × the cloud price.
    pub all_cloud_cost: f64,
    pub saved_vs_all_cloud_pct: Option<f64>,
    /// Estimated cost of the cached answers had they been generated again.
    pub cache_saved_cost: f64,
    /// `cache_saved_cost` as a share of what this run would have cost without the cache.
    pub cache_saved_pct: Option<f64>,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Computes the report. `cloud_price_per_1k` is the USD price of 1k tokens
/// (input and output alike, as the original's cost model).
pub fn report(records: &[Record], elapsed_s: f64, cloud_price_per_1k: f64) -> Report {
    let mut r = Report {
        requests: records.len() as u64,
        elapsed_s,
        ..Report::default()
    };
    let mut lat: Vec<u64> = records.iter().map(|x| x.latency_us).collect();
    lat.sort_unstable();
    if let (Some(&min), Some(&max)) = (lat.first(), lat.last()) {
        let pct = |p| ms(percentile(&lat, p).unwrap_or(0));
        r.latency_ms = Latency {
            min: ms(min),
            mean: ms(lat.iter().sum::<u64>()) / lat.len() as f64,
            p50: pct(50.0),
            p90: pct(90.0),
            p95: pct(95.0),
            p99: pct(99.0),
            max: ms(max),
            csv: CSV_PERCENTILES.iter().map(|&(p, _)| pct(p)).collect(),
        };
    }
    let mut content = 0usize;
    // Per workload item: the cost of its uncached answers, to price its cache hits.
    let mut item_cost: HashMap<usize, (f64, u64)> = HashMap::new();
    let mut pool_cost: HashMap<&str, (f64, u64)> = HashMap::new();
    for rec in records {
        content += rec.content_size;
        let a = match &rec.outcome {
            Err(kind) => {
                r.failures += 1;
                *r.failures_by_kind.entry(kind.clone()).or_default() += 1;
                continue;
            }
            Ok(a) => a,
        };
        if let Some(c) = a.cached {
            r.answers_with_cache_flag += 1;
            r.cache_hits += u64::from(c);
        }
        match a.routed_to.as_deref() {
            Some("local") => r.routed_local += 1,
            Some("cloud") => r.routed_cloud += 1,
            _ => {}
        }
        match a.provider.as_deref() {
            Some("local") => r.served_local += 1,
            Some("cloud") => r.served_cloud += 1,
            _ => {}
        }
        r.fallbacks += u64::from(a.fallback);
        let cost = a.cost.unwrap_or(0.0);
        r.cost_total += cost;
        let prompt_tokens = a
            .prompt_tokens
            .unwrap_or_else(|| rec.prompt_chars.div_ceil(4) as u32);
        let completion = a.completion_tokens.unwrap_or(0);
        // Counts come from replies (so from an upstream): summed as floats, never overflowed.
        r.all_cloud_cost +=
            (f64::from(prompt_tokens) + f64::from(completion)) / 1000.0 * cloud_price_per_1k;
        if a.cached == Some(false) && !a.fallback {
            if let Some(i) = rec.item {
                let e = item_cost.entry(i).or_default();
                e.0 += cost;
                e.1 += 1;
            }
            if let Some(p) = a.routed_to.as_deref() {
                let e = pool_cost.entry(p).or_default();
                e.0 += cost;
                e.1 += 1;
            }
        }
    }
    // Price each cache hit: the same item's uncached cost seen in this run,
    // else its pool's mean, else (cloud) the token estimate.
    for rec in records {
        let Ok(a) = &rec.outcome else { continue };
        if a.cached != Some(true) {
            continue;
        }
        let mean = |(sum, n): (f64, u64)| (n > 0).then(|| sum / n as f64);
        let by_item = rec
            .item
            .and_then(|i| item_cost.get(&i).copied().and_then(mean));
        let by_pool = a
            .routed_to
            .as_deref()
            .and_then(|p| pool_cost.get(p).copied().and_then(mean));
        let estimate = || {
            if a.routed_to.as_deref() == Some("cloud") {
                let t = a
                    .prompt_tokens
                    .unwrap_or_else(|| rec.prompt_chars.div_ceil(4) as u32)
                    + a.completion_tokens.unwrap_or(0);
                f64::from(t) / 1000.0 * cloud_price_per_1k
            } else {
                0.0
            }
        };
        r.cache_saved_cost += by_item.or(by_pool).unwrap_or_else(estimate);
    }
    if r.requests > 0 {
        r.avg_content_size = content as f64 / r.requests as f64;
        r.cost_per_request = r.cost_total / r.requests as f64;
    }
    if elapsed_s > 0.0 {
        r.requests_per_s = r.requests as f64 / elapsed_s;
        r.failures_per_s = r.failures as f64 / elapsed_s;
    }
    if r.answers_with_cache_flag > 0 {
        r.cache_hit_rate = Some(r.cache_hits as f64 / r.answers_with_cache_flag as f64);
    }
    if r.all_cloud_cost > 0.0 {
        r.saved_vs_all_cloud_pct = Some(100.0 * (1.0 - r.cost_total / r.all_cloud_cost));
    }
    let without_cache = r.cost_total + r.cache_saved_cost;
    if without_cache > 0.0 {
        r.cache_saved_pct = Some(100.0 * r.cache_saved_cost / without_cache);
    }
    r
}

/// The header of Locust's `_stats.csv`.
pub const CSV_HEADER: &str = "Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%";

fn num(x: f64) -> String {
    // Short and exact enough: three decimals, trailing zeros dropped.
    let s = format!("{x:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() || s == "-" {
        "0".into()
    } else {
        s.to_string()
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Locust's `_stats.csv`: the header, one row for the endpoint, one
/// `Aggregated` row. Times in milliseconds (with decimals, where Locust
/// rounds to whole milliseconds); percentiles are `N/A` without requests.
pub fn stats_csv(method: &str, name: &str, r: &Report) -> String {
    let row = |typ: &str, name: &str| {
        let l = &r.latency_ms;
        let mut cols = vec![
            csv_field(typ),
            csv_field(name),
            r.requests.to_string(),
            r.failures.to_string(),
            num(l.p50),
            num(l.mean),
            num(l.min),
            num(l.max),
            num(r.avg_content_size),
            num(r.requests_per_s),
            num(r.failures_per_s),
        ];
        if r.requests == 0 {
            cols.extend(CSV_PERCENTILES.iter().map(|_| "N/A".to_string()));
        } else {
            cols.extend(l.csv.iter().map(|&v| num(v)));
        }
        cols.join(",")
    };
    format!(
        "{CSV_HEADER}\n{}\n{}\n",
        row(method, name),
        row("", "Aggregated")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(latency_ms: u64, cached: bool, routed: &str, cost: f64, item: usize) -> Record {
        Record {
            latency_us: latency_ms * 1000,
            item: Some(item),
            prompt_chars: 40,
            content_size: 100,
            outcome: Ok(Answer {
                cached: Some(cached),
                routed_to: Some(routed.into()),
                provider: Some(routed.into()),
                fallback: false,
                cost: Some(cost),
                prompt_tokens: Some(10),
                completion_tokens: Some(20),
            }),
        }
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 66.0), Some(66));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 99.9), Some(100));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&[7], 50.0), Some(7));
        assert_eq!(percentile(&[1, 2], 50.0), Some(1));
        assert_eq!(percentile(&[1, 2, 3], 50.0), Some(2));
        assert_eq!(percentile(&[], 50.0), None);
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&v, 99.9), Some(999));
        assert_eq!(percentile(&v, 99.99), Some(1000));
    }

    #[test]
    fn report_counts_cache_routing_failures_and_cost() {
        let mut recs = vec![
            ok(10, false, "cloud", 0.006, 1),
            ok(2, true, "cloud", 0.0, 1),
            ok(2, true, "cloud", 0.0, 1),
            ok(5, false, "local", 0.001, 0),
            ok(1, true, "local", 0.0, 0),
        ];
        recs.push(Record {
            latency_us: 30_000,
            item: None,
            prompt_chars: 4,
            content_size: 0,
            outcome: Err("HTTP 503 no_responders".into()),
        });
        let r = report(&recs, 2.0, 0.0002);
        assert_eq!(r.requests, 6);
        assert_eq!(r.failures, 1);
        assert_eq!(r.failures_by_kind["HTTP 503 no_responders"], 1);
        assert_eq!(r.requests_per_s, 3.0);
        assert_eq!(r.cache_hits, 3);
        assert_eq!(r.cache_hit_rate, Some(0.6));
        assert_eq!((r.routed_local, r.routed_cloud), (2, 3));
        assert!((r.cost_total - 0.007).abs() < 1e-12);
        // Hits priced by their item's uncached cost: 2 × 0.006 + 1 × 0.001.
        assert!((r.cache_saved_cost - 0.013).abs() < 1e-12);
        assert!((r.cache_saved_pct.unwrap() - 65.0).abs() < 1e-9);
        // 5 answers × 30 tokens × $0.0002/1k.
        assert!((r.all_cloud_cost - 5.0 * 30.0 * 0.0002 / 1000.0).abs() < 1e-15);
        assert_eq!(r.latency_ms.p50, 2.0);
        assert_eq!(r.latency_ms.max, 30.0);
        assert_eq!(r.latency_ms.min, 1.0);
        assert_eq!(r.latency_ms.csv.len(), CSV_PERCENTILES.len());
    }

    #[test]
    fn csv_has_locusts_shape() {
        let recs: Vec<Record> = (1..=10).map(|i| ok(i, false, "local", 0.0, 0)).collect();
        let r = report(&recs, 5.0, 0.0002);
        let csv = stats_csv("POST", "/generate", &r);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], CSV_HEADER);
        let header: Vec<&str> = lines[0].split(',').collect();
        assert_eq!(header.len(), 22);
        let row: Vec<&str> = lines[1].split(',').collect();
        assert_eq!(row.len(), header.len());
        assert_eq!(&row[..4], &["POST", "/generate", "10", "0"]);
        assert_eq!(row[4], "5", "median ms");
        assert_eq!(row[5], "5.5", "average ms");
        assert_eq!(row[9], "2", "requests/s");
        assert_eq!(row[21], "10", "100%");
        let agg: Vec<&str> = lines[2].split(',').collect();
        assert_eq!(&agg[..2], &["", "Aggregated"]);
        assert_eq!(&agg[2..], &row[2..]);
        let empty = stats_csv("POST", "/generate", &report(&[], 1.0, 0.0002));
        assert!(empty.lines().nth(1).unwrap().ends_with("N/A,N/A"));
    }
}
