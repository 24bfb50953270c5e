//! Prints the semantic cache's calibration table: hit rate and false-hit
//! rate of plain thresholds and of the threshold with the lexical guard,
//! chosen on one half of the labelled pairs and reported on the other.
//!
//!   optiroute-semantic-calibrate [--model DIR] [--pairs FILE.tsv] [--errors]
//!   optiroute-semantic-calibrate --search N,N,...
//!
//! `--errors` also lists the held-out pairs the shipped policy gets wrong;
//! `--search` times a brute-force search of one partition holding N random
//! unit vectors (no model needed), p50 and p99 of 200 searches.

use optiroute_embed::{Embedder, DEFAULT_MODEL_DIR};
use optiroute_router::semantic::calibrate::{
    self, parse, report, report_fresh, score, FRESH, PAIRS,
};
use std::sync::Arc;
use std::time::Instant;

use optiroute_router::semantic::guard::Features;
use optiroute_router::semantic::index::{dot, Index, Item};
use optiroute_router::semantic::DIMS;

/// A deterministic unit vector (xorshift), for the search timing.
fn unit(seed: &mut u64) -> Vec<f32> {
    let mut v: Vec<f32> = (0..DIMS)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            (*seed % 2001) as f32 / 1000.0 - 1.0
        })
        .collect();
    let n = dot(&v, &v).sqrt();
    v.iter_mut().for_each(|x| *x /= n);
    v
}

fn search_bench(sizes: &str) -> std::process::ExitCode {
    let features = Arc::new(Features::of("q"));
    println!("| entries in the partition | search p50 | search p99 |");
    println!("| --- | --- | --- |");
    for n in sizes.split(',') {
        let Ok(n) = n.trim().parse::<usize>() else {
            eprintln!("--search takes sizes like 1000,10000");
            return std::process::ExitCode::from(2);
        };
        let mut seed = 42u64;
        let mut ix = Index::new(n.max(1));
        for i in 0..n {
            ix.insert(
                "p",
                Item {
                    key: i.to_string(),
                    question: Arc::from("q"),
                    vector: Arc::new(unit(&mut seed)),
                    features: features.clone(),
                    expires_ms: u64::MAX,
                },
                0,
            );
        }
        let mut times: Vec<f64> = (0..200)
            .map(|_| {
                let q = unit(&mut seed);
                let t = Instant::now();
                let s = ix.search("p", &q, 0.8, 0);
                std::hint::black_box(s.best);
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        times.sort_by(f64::total_cmp);
        println!("| {n} | {:.3} ms | {:.3} ms |", times[100], times[197]);
    }
    std::process::ExitCode::SUCCESS
}

fn main() -> std::process::ExitCode {
    let mut model = concat!(env!("CARGO_MANIFEST_DIR"), "/../").to_string() + DEFAULT_MODEL_DIR;
    let mut pairs_file = None;
    let mut errors = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--model" => model = args.next().unwrap_or_default(),
            "--pairs" => pairs_file = args.next(),
            "--errors" => errors = true,
            "--search" => return search_bench(&args.next().unwrap_or_default()),
            _ => {
                println!(
                    "usage: optiroute-semantic-calibrate [--model DIR] [--pairs FILE.tsv] [--errors]"
                );
                return std::process::ExitCode::from(2);
            }
        }
    }
    let text = match &pairs_file {
        Some(f) => match std::fs::read_to_string(f) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("cannot read {f}: {e}");
                return std::process::ExitCode::FAILURE;
            }
        },
        None => PAIRS.to_string(),
    };
    let pairs = match parse(&text) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let embedder = match Embedder::load(&model) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let sim = |a: &str, b: &str| dot(&embedder.embed(a), &embedder.embed(b));
    let scored = score(pairs, sim);
    print!("{}", report(&scored));
    let fresh = match parse(FRESH) {
        Ok(p) => score(p, sim),
        Err(e) => {
            eprintln!("fresh set: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    println!(
        "\nfresh set: {} pairs ({} paraphrases), written after the guard's last change\n",
        fresh.len(),
        fresh.iter().filter(|s| s.pair.same).count()
    );
    print!("{}", report_fresh(&scored, &fresh));
    if errors {
        let t = calibrate::shipped_threshold(&scored);
        println!("\nheld-out pairs the shipped policy (threshold {t:.2} + guard) gets wrong:");
        for s in scored.iter().filter(|s| !s.tune) {
            if calibrate::served(s, t, true) != s.pair.same {
                println!(
                    "  held-out {:.3} {:?} [{}] {} / {}",
                    s.similarity,
                    s.guard.map_err(|r| r.as_str()),
                    s.pair.category,
                    s.pair.a,
                    s.pair.b
                );
            }
        }
        for s in &fresh {
            if calibrate::served(s, t, true) != s.pair.same {
                println!(
                    "  fresh {:.3} {:?} [{}] {} / {}",
                    s.similarity,
                    s.guard.map_err(|r| r.as_str()),
                    s.pair.category,
                    s.pair.a,
                    s.pair.b
                );
            }
        }
    }
    std::process::ExitCode::SUCCESS
}
