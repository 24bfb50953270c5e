//! Prints the semantic cache's calibration table: hit rate and false-hit
//! rate of plain thresholds and of the threshold with the lexical guard,
//! chosen on one half of the labelled pairs and reported on the other.
//!
//!   optiroute-semantic-calibrate [--model DIR] [--pairs FILE.tsv] [--errors]
//!
//! `--errors` also lists the held-out pairs the shipped policy gets wrong.

use optiroute_embed::{Embedder, DEFAULT_MODEL_DIR};
use optiroute_router::semantic::calibrate::{
    self, parse, report, report_fresh, score, FRESH, PAIRS,
};
use optiroute_router::semantic::index::dot;

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
