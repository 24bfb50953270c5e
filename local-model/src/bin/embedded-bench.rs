//! Benchmarks the embedded model: tokens/s, first-token latency and resident
//! memory, for 1 and 2 (or `--concurrency a,b,...`) generations at once.
//!
//! ```sh
//! scripts/fetch-model.sh
//! cargo run --release -p optiroute-local-model --bin embedded-bench
//! cargo run --release -p optiroute-local-model --bin embedded-bench -- --concurrency 1,2,4
//! ```

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use optiroute_local_model::{EmbeddedModel, GenerateParams, Turn, DEFAULT_MODEL_PATH};

const USAGE: &str = "usage: embedded-bench [--model PATH] [--max-tokens N] \
[--concurrency 1,2] [--runs N] [--prompt TEXT] [--show] [--repeat-penalty F]";

const PROMPTS: [&str; 2] = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle works, step by step.",
];

struct Args {
    model: PathBuf,
    max_tokens: u32,
    concurrency: Vec<usize>,
    runs: usize,
    prompt: Option<String>,
    show: bool,
    repeat_penalty: f32,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        model: default_model(),
        max_tokens: 128,
        concurrency: vec![1, 2],
        runs: 2,
        prompt: None,
        show: false,
        repeat_penalty: GenerateParams::default().repeat_penalty,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match flag.as_str() {
            "--model" => a.model = PathBuf::from(value("--model")?),
            "--max-tokens" => {
                a.max_tokens = value("--max-tokens")?.parse().map_err(|e| format!("{e}"))?
            }
            "--runs" => a.runs = value("--runs")?.parse().map_err(|e| format!("{e}"))?,
            "--concurrency" => {
                a.concurrency = value("--concurrency")?
                    .split(',')
                    .map(|s| s.trim().parse::<usize>().map_err(|e| format!("{e}")))
                    .collect::<Result<_, _>>()?
            }
            "--prompt" => a.prompt = Some(value("--prompt")?),
            "--show" => a.show = true,
            "--repeat-penalty" => {
                a.repeat_penalty = value("--repeat-penalty")?
                    .parse()
                    .map_err(|e| format!("{e}"))?
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown flag {other}\n{USAGE}")),
        }
    }
    Ok(a)
}

/// `models/...` from the working directory, else from the repository root.
fn default_model() -> PathBuf {
    let here = PathBuf::from(DEFAULT_MODEL_PATH);
    if here.exists() {
        return here;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(DEFAULT_MODEL_PATH)
}

/// A line of `/proc/self/status` in MiB (VmRSS, VmHWM).
fn status_mib(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

struct Run {
    tokens: u32,
    first_token_ms: f64,
    tokens_per_second: f64,
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    println!(
        "embedded-bench: {} ({} cores available, one thread per generation)",
        args.model.display(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let rss_before = status_mib("VmRSS:");
    let model = match EmbeddedModel::load(&args.model) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let info = model.info();
    println!(
        "loaded in {:.2}s: {} layers, vocab {}, context {}, weights {:.0} MiB, kernels {}; RSS {:.0} MiB (was {:.0})",
        info.load_time.as_secs_f64(),
        info.layers,
        info.vocab_size,
        info.context_length,
        info.weight_bytes as f64 / (1 << 20) as f64,
        info.kernels,
        status_mib("VmRSS:"),
        rss_before
    );
    // Warm-up: first-use costs (thread pools, page faults) out of the figures.
    let warm = GenerateParams {
        max_tokens: 4,
        ..GenerateParams::default()
    };
    let _ = model.generate(&[Turn::user("Hi")], &warm, &mut |_| {
        ControlFlow::Continue(())
    });

    for &n in &args.concurrency {
        for run in 0..args.runs {
            let started = Instant::now();
            let results: Vec<Result<Run, String>> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..n)
                    .map(|i| {
                        let model = &model;
                        let prompt = args
                            .prompt
                            .clone()
                            .unwrap_or_else(|| PROMPTS[i % PROMPTS.len()].to_string());
                        let max_tokens = args.max_tokens;
                        let show = args.show && i == 0 && run == 0;
                        let repeat_penalty = args.repeat_penalty;
                        s.spawn(move || {
                            let params = GenerateParams {
                                max_tokens,
                                repeat_penalty,
                                ..GenerateParams::default()
                            };
                            let c = model
                                .generate(&[Turn::user(&prompt)], &params, &mut |_| {
                                    ControlFlow::Continue(())
                                })
                                .map_err(|e| e.to_string())?;
                            if show {
                                let ids = model
                                    .tokenizer()
                                    .chat_prompt(&[Turn::user(&prompt)])
                                    .unwrap_or_default();
                                println!("prompt ids {ids:?}");
                                println!(
                                    "--- {prompt}\n{}\n--- ({}, {} tokens)",
                                    c.text,
                                    c.finish_reason.as_str(),
                                    c.completion_tokens
                                );
                            }
                            Ok(Run {
                                tokens: c.completion_tokens,
                                first_token_ms: c.first_token.as_secs_f64() * 1000.0,
                                tokens_per_second: c.tokens_per_second(),
                            })
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| Err("panicked".into())))
                    .collect()
            });
            let wall = started.elapsed().as_secs_f64();
            let runs: Vec<Run> = match results.into_iter().collect() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("generation failed: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let tokens: u32 = runs.iter().map(|r| r.tokens).sum();
            let per_stream: Vec<String> = runs
                .iter()
                .map(|r| format!("{:.1}", r.tokens_per_second))
                .collect();
            let ttft: Vec<String> = runs
                .iter()
                .map(|r| format!("{:.0}", r.first_token_ms))
                .collect();
            println!(
                "concurrency {n} run {}: {tokens} tokens in {wall:.2}s = {:.1} tokens/s total; \
                 per stream {} tokens/s; first token {} ms; RSS {:.0} MiB (peak {:.0})",
                run + 1,
                f64::from(tokens) / wall,
                per_stream.join(" / "),
                ttft.join(" / "),
                status_mib("VmRSS:"),
                status_mib("VmHWM:")
            );
        }
    }
    ExitCode::SUCCESS
}
