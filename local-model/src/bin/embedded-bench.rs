//! Benchmarks the embedded model as the local pool runs it: one
//! continuous-batching engine, 1, 2, 4, 8 and 16 (`--concurrency`)
//! generations submitted at once. Prints tokens/s per sequence and in
//! total, time to first token (from submission, so it includes the wait
//! for the batch under load) and resident memory; `--json FILE` writes the
//! figures and the prompts' token ids (for `bench/llama_cpp_bench.py`).
//!
//! ```sh
//! bench/embedded.sh                       # with llama.cpp side by side
//! cargo run --release -p optiroute-local-model --bin embedded-bench -- --concurrency 1,8
//! ```

/// The allocator every OptiRoute process runs with (the local pool's
/// worker included), so memory figures read as they would there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::fmt::Write as _;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use optiroute_local_model::{
    BatchEngine, EmbeddedModel, GenerateParams, Progress, SchedulerConfig, StepTimes, Turn,
    DEFAULT_MODEL_PATH,
};

const USAGE: &str = "usage: embedded-bench [--model PATH] [--max-tokens N] \
[--concurrency 1,2,4,8,16] [--runs N] [--threads N] [--prompt TEXT] [--show] \
[--repeat-penalty F] [--json FILE] [--floor] [--breakdown]";

/// Long-form prompts, so that every generation runs its `max_tokens`.
const PROMPTS: [&str; 4] = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle works, step by step.",
    "Describe a day in the life of a lighthouse keeper.",
    "Write a letter to a friend about a trip to the mountains.",
];

struct Args {
    model: PathBuf,
    max_tokens: u32,
    concurrency: Vec<usize>,
    runs: usize,
    threads: usize,
    prompt: Option<String>,
    show: bool,
    repeat_penalty: f32,
    json: Option<PathBuf>,
    floor: bool,
    breakdown: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        model: default_model(),
        max_tokens: 128,
        concurrency: vec![1, 2, 4, 8, 16],
        runs: 2,
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        prompt: None,
        show: false,
        repeat_penalty: GenerateParams::default().repeat_penalty,
        json: None,
        floor: false,
        breakdown: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        let num = |v: String| v.parse::<usize>().map_err(|e| format!("{e}"));
        match flag.as_str() {
            "--model" => a.model = PathBuf::from(value("--model")?),
            "--max-tokens" => {
                a.max_tokens = value("--max-tokens")?.parse().map_err(|e| format!("{e}"))?
            }
            "--runs" => a.runs = num(value("--runs")?)?,
            "--threads" => a.threads = num(value("--threads")?)?.max(1),
            "--concurrency" => {
                a.concurrency = value("--concurrency")?
                    .split(',')
                    .map(|s| s.trim().parse::<usize>().map_err(|e| format!("{e}")))
                    .collect::<Result<_, _>>()?
            }
            "--prompt" => a.prompt = Some(value("--prompt")?),
            "--show" => a.show = true,
            "--floor" => a.floor = true,
            "--breakdown" => a.breakdown = true,
            "--json" => a.json = Some(PathBuf::from(value("--json")?)),
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
    proc_mib("/proc/self/status", key)
}

/// A figure of `/proc/self/smaps_rollup` in MiB (0 where there is none).
fn rollup_mib(key: &str) -> f64 {
    proc_mib("/proc/self/smaps_rollup", key)
}

fn proc_mib(file: &str, key: &str) -> f64 {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

struct Seq {
    tokens: u32,
    ttft_ms: f64,
    tokens_per_second: f64,
    text: String,
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn list(v: &[f64]) -> String {
    let parts: Vec<String> = v.iter().map(|x| format!("{x:.1}")).collect();
    format!("[{}]", parts.join(","))
}

/// Submits `prompts` at once; waits for all.
fn round(
    engine: &BatchEngine,
    prompts: &[Vec<u32>],
    params: &GenerateParams,
) -> Result<(Vec<Seq>, f64), String> {
    let (tx, rx) = mpsc::channel();
    let started = Instant::now();
    for (i, ids) in prompts.iter().enumerate() {
        let tx = tx.clone();
        engine.submit(
            ids.clone(),
            params.clone(),
            Box::new(|_| ControlFlow::Continue(())),
            Box::new(move |r| {
                let _ = tx.send((i, r));
            }),
        );
    }
    let mut out: Vec<Option<Seq>> = prompts.iter().map(|_| None).collect();
    for _ in prompts {
        let (i, r) = rx
            .recv_timeout(Duration::from_secs(600))
            .map_err(|e| format!("no answer: {e}"))?;
        let c = r.map_err(|e| e.to_string())?;
        out[i] = Some(Seq {
            tokens: c.completion_tokens,
            ttft_ms: (c.queued + c.first_token).as_secs_f64() * 1000.0,
            tokens_per_second: c.tokens_per_second(),
            text: c.text,
        });
    }
    let wall = started.elapsed().as_secs_f64();
    Ok((out.into_iter().flatten().collect(), wall))
}

/// Where a decoding step's time goes with `n` sequences (a scheduler on
/// this thread and `threads` in all, as the engine runs it): per step, the
/// weight products, attention and the rest, over the steps after every
/// sequence has read its prompt. Appends `"breakdown":[...],`.
fn breakdown(
    model: &EmbeddedModel,
    prompts: &[Vec<u32>],
    params: &GenerateParams,
    args: &Args,
    json: &mut String,
) -> Result<(), String> {
    let mut parts = Vec::new();
    for &n in &args.concurrency {
        let mut sched = model.scheduler(SchedulerConfig {
            max_active: n.max(1),
            max_queue: n.max(1),
            threads: args.threads,
            ..SchedulerConfig::default()
        });
        let ids = (0..n.max(1))
            .map(|i| {
                let prompt = prompts[i % prompts.len()].clone();
                sched.submit(
                    prompt,
                    params.clone(),
                    Box::new(|_| ControlFlow::Continue(())),
                )
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let decoding = |sched: &optiroute_local_model::Scheduler| {
            ids.iter().all(|id| match sched.progress(*id) {
                Progress::Active { generated, .. } => generated > 0,
                Progress::Queued => false,
                Progress::Gone => true,
            })
        };
        while !decoding(&sched) {
            sched.step();
        }
        let from = sched.step_times();
        while !sched.is_idle() {
            sched.step();
        }
        let to = sched.step_times();
        let steps = (to.steps - from.steps).max(1) as f64;
        let ms = |f: fn(&StepTimes) -> Duration| (f(&to) - f(&from)).as_secs_f64() * 1000.0 / steps;
        let (total, products, attention) =
            (ms(|t| t.total), ms(|t| t.products), ms(|t| t.attention));
        let rest = total - products - attention;
        println!(
            "breakdown {n:>2}: a decoding step of {:.1} rows takes {total:.2} ms: weight products {products:.2}, attention {attention:.2}, the rest {rest:.2} (over {steps:.0} steps)",
            (to.rows - from.rows) as f64 / steps
        );
        parts.push(format!(
            "{{\"concurrency\":{n},\"steps\":{steps:.0},\"ms_per_step\":{total:.3},\"products_ms\":{products:.3},\"attention_ms\":{attention:.3},\"rest_ms\":{rest:.3}}}"
        ));
    }
    let _ = write!(json, "\"breakdown\":[{}],", parts.join(","));
    Ok(())
}

/// The kernels' own bound: the weight products of one decoding step for
/// `n` sequences (every layer and the output head) on one thread, without
/// attention, sampling or thread hand-off; then the same on every core at
/// once (what the cores give together). Appends `"floor":[...],`.
fn floor(model: &EmbeddedModel, ns: &[usize], json: &mut String) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut one = None;
    let mut parts = Vec::new();
    let mut ns: Vec<usize> = ns.to_vec();
    if !ns.contains(&1) {
        ns.insert(0, 1);
    }
    for &n in &ns {
        let n = n.max(1);
        // About a second of products per level, at least three steps.
        let _ = model.time_products(n, 1);
        let probe = model.time_products(n, 1).as_secs_f64();
        let reps = ((1.0 / probe.max(1e-6)) as usize).clamp(3, 200);
        let per_step = model.time_products(n, reps).as_secs_f64() / reps as f64;
        // The same on every core at once: what the cores give together
        // (they share caches, memory and, on some machines, execution
        // units), so what splitting a step across them can reach.
        let together = std::thread::scope(|s| {
            let runs: Vec<_> = (0..cores)
                .map(|_| s.spawn(|| model.time_products(n, reps).as_secs_f64()))
                .collect();
            let times: Vec<f64> = runs.into_iter().filter_map(|r| r.join().ok()).collect();
            times.iter().sum::<f64>() / times.len().max(1) as f64 / reps as f64
        });
        let tps = n as f64 / per_step;
        let one_tps = *one.get_or_insert(tps);
        println!(
            "floor {n:>2}: weight products of one step for {n} sequence(s) on one thread: {:.2} ms = {tps:.0} tokens/s, {:.2}x one sequence's; on all {cores} cores at once: {:.2} ms each ({:.2}x one core's throughput)",
            per_step * 1000.0,
            tps / one_tps,
            together * 1000.0,
            cores as f64 * per_step / together
        );
        parts.push(format!(
            "{{\"concurrency\":{n},\"ms_per_step\":{:.3},\"tps\":{tps:.1},\"cores\":{cores},\"together_ms\":{:.3}}}",
            per_step * 1000.0,
            together * 1000.0
        ));
    }
    let _ = write!(json, "\"floor\":[{}],", parts.join(","));
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "embedded-bench: {} ({cores} cores, engine threads {}, {} tokens per generation, greedy)",
        args.model.display(),
        args.threads,
        args.max_tokens
    );
    let rss_before = status_mib("VmRSS:");
    let model = match EmbeddedModel::load(&args.model) {
        Ok(m) => Arc::new(m),
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let info = model.info();
    println!(
        "loaded in {:.2}s: {} layers, vocab {}, context {}, weights {:.0} MiB ({}; {:.0} MiB of memory on huge pages), kernels {}; RSS {:.0} MiB (was {:.0})",
        info.load_time.as_secs_f64(),
        info.layers,
        info.vocab_size,
        info.context_length,
        info.weight_bytes as f64 / (1 << 20) as f64,
        if info.huge_pages {
            "huge pages asked for"
        } else {
            "small pages"
        },
        rollup_mib("AnonHugePages:"),
        info.kernels,
        status_mib("VmRSS:"),
        rss_before
    );
    let texts: Vec<String> = match &args.prompt {
        Some(p) => vec![p.clone()],
        None => PROMPTS.iter().map(|p| p.to_string()).collect(),
    };
    let prompts: Vec<Vec<u32>> = match texts
        .iter()
        .map(|t| model.tokenizer().chat_prompt(&[Turn::user(t)]))
        .collect::<Result<_, _>>()
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("tokenizer: {e}");
            return ExitCode::FAILURE;
        }
    };
    let max_n = args.concurrency.iter().copied().max().unwrap_or(1);
    let engine = match BatchEngine::start(
        Arc::clone(&model),
        SchedulerConfig {
            max_active: max_n.max(1),
            max_queue: max_n.max(1),
            threads: args.threads,
            ..SchedulerConfig::default()
        },
    ) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("engine: {e}");
            return ExitCode::FAILURE;
        }
    };
    let params = GenerateParams {
        max_tokens: args.max_tokens,
        repeat_penalty: args.repeat_penalty,
        ..GenerateParams::default()
    };
    // Warm-up: first-use costs (threads, page faults) out of the figures.
    let warm = GenerateParams {
        max_tokens: 4,
        ..params.clone()
    };
    let _ = round(&engine, &prompts[..1], &warm);

    let mut json = String::new();
    let _ = write!(
        json,
        "{{\"engine\":\"optiroute-embedded\",\"threads\":{},\"max_tokens\":{},\"prompt_tokens\":[{}],\"prompts\":[{}],",
        args.threads,
        args.max_tokens,
        prompts.iter().map(|p| p.len().to_string()).collect::<Vec<_>>().join(","),
        prompts
            .iter()
            .map(|p| format!("[{}]", p.iter().map(u32::to_string).collect::<Vec<_>>().join(",")))
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut first = true;
    if args.floor {
        floor(&model, &args.concurrency, &mut json);
    }
    if args.breakdown {
        if let Err(e) = breakdown(&model, &prompts, &params, &args, &mut json) {
            eprintln!("breakdown: {e}");
            return ExitCode::FAILURE;
        }
    }
    json.push_str("\"results\":[");
    // Runs outermost: each concurrency level is sampled across the whole
    // run, so a burst of other work on the machine skews no level alone.
    for run in 0..args.runs {
        for &n in &args.concurrency {
            let batch: Vec<Vec<u32>> = (0..n).map(|i| prompts[i % prompts.len()].clone()).collect();
            let (seqs, wall) = match round(&engine, &batch, &params) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("generation failed: {e}");
                    return ExitCode::FAILURE;
                }
            };
            if args.show && run == 0 {
                if let Some(s) = seqs.first() {
                    println!("--- {}\n{}\n---", texts[0], s.text);
                }
            }
            let tokens: u32 = seqs.iter().map(|s| s.tokens).sum();
            let total = f64::from(tokens) / wall;
            let per: Vec<f64> = seqs.iter().map(|s| s.tokens_per_second).collect();
            let ttft: Vec<f64> = seqs.iter().map(|s| s.ttft_ms).collect();
            let (rss, peak) = (status_mib("VmRSS:"), status_mib("VmHWM:"));
            println!(
                "concurrency {n:>2} run {}: {tokens} tokens in {wall:.2}s = {total:.1} tokens/s total; \
                 per sequence {:.1} tokens/s (mean); first token {:.0} ms mean, {:.0} ms max; RSS {rss:.0} MiB (peak {peak:.0})",
                run + 1,
                mean(&per),
                mean(&ttft),
                ttft.iter().copied().fold(0.0, f64::max),
            );
            let _ = write!(
                json,
                "{}{{\"concurrency\":{n},\"run\":{},\"tokens\":{tokens},\"wall_s\":{wall:.4},\"total_tps\":{total:.2},\"per_seq_tps\":{},\"ttft_ms\":{},\"rss_mib\":{rss:.1},\"peak_rss_mib\":{peak:.1}}}",
                if first { "" } else { "," },
                run + 1,
                list(&per),
                list(&ttft),
            );
            first = false;
        }
    }
    json.push_str("]}\n");
    if let Some(path) = &args.json {
        if let Err(e) = std::fs::write(path, json) {
            eprintln!("cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
