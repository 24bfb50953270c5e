//! Benchmarks the sentence embedder: p50 and p99 latency of one `embed`
//! call for a 20-token and a 300-token prompt (the latter truncated to 256
//! tokens, as the model reads at most that many), on one thread, plus load
//! time and resident memory.
//!
//! ```sh
//! scripts/fetch-embed-model.sh
//! cargo run --release -p optiroute-embed --bin embed-bench
//! cargo run --release -p optiroute-embed --bin embed-bench -- --runs 200
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use optiroute_embed::{simd_kernels, Embedder, DEFAULT_MODEL_DIR};

const USAGE: &str = "usage: embed-bench [--model DIR] [--runs N] [--warmup N]";

/// 20 tokens with [CLS] and [SEP].
const SHORT: &str =
    "Please summarise the main causes of the French Revolution in three sentences for a student.";

/// Repeated to make the 300-token prompt.
const PARAGRAPH: &str = "The router picks a provider for each request by weighing price, latency \
and the quality its policy asks for, then falls back to the next candidate when one fails. ";

struct Args {
    model: PathBuf,
    runs: usize,
    warmup: usize,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        model: default_model(),
        runs: 100,
        warmup: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match flag.as_str() {
            "--model" => a.model = PathBuf::from(value("--model")?),
            "--runs" => {
                a.runs = value("--runs")?
                    .parse()
                    .map_err(|e| format!("--runs: {e}"))?
            }
            "--warmup" => {
                a.warmup = value("--warmup")?
                    .parse()
                    .map_err(|e| format!("--warmup: {e}"))?
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown flag {other}\n{USAGE}")),
        }
    }
    if a.runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    Ok(a)
}

/// `models/...` from the working directory, else from the repository root.
fn default_model() -> PathBuf {
    let here = PathBuf::from(DEFAULT_MODEL_DIR);
    if here.exists() {
        return here;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(DEFAULT_MODEL_DIR)
}

fn rss() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .filter(|l| l.starts_with("VmRSS") || l.starts_with("VmHWM"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(", ")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

fn bench(e: &Embedder, label: &str, text: &str, args: &Args) {
    let input_tokens = e.count_tokens(text);
    let model_tokens = e.tokenize(text).len();
    for _ in 0..args.warmup {
        std::hint::black_box(e.embed(text));
    }
    let mut times: Vec<Duration> = (0..args.runs)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(e.embed(std::hint::black_box(text)));
            t.elapsed()
        })
        .collect();
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{label:>10}: {input_tokens:>3} tokens ({model_tokens} in the model), {} runs: p50 {:.2} ms, p99 {:.2} ms, min {:.2} ms",
        args.runs,
        ms(percentile(&times, 0.50)),
        ms(percentile(&times, 0.99)),
        ms(times[0]),
    );
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let t = Instant::now();
    let e = match Embedder::load(&args.model) {
        Ok(e) => e,
        Err(err) => {
            eprintln!("embed-bench: {err}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "model {} loaded in {:.0} ms; kernels {}; one thread; {}",
        args.model.display(),
        t.elapsed().as_secs_f64() * 1e3,
        simd_kernels(),
        rss()
    );

    // Words of the paragraph, round and round, up to 300 tokens.
    let mut long = String::new();
    for word in PARAGRAPH.split_whitespace().cycle() {
        if e.count_tokens(&long) >= 300 {
            break;
        }
        long.push_str(word);
        long.push(' ');
    }
    bench(&e, "20-token", SHORT, &args);
    bench(&e, "300-token", &long, &args);
    println!("after: {}", rss());
    ExitCode::SUCCESS
}
