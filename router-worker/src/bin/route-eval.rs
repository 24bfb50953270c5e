//! Prints how our router and the original 60-character rule do on the
//! labelled prompt set: `optiroute-route-eval [FILE] [--errors] [--bench] [--tune]`.

use std::time::Instant;

use optiroute_common::config::RoutingConfig;
use optiroute_common::wire::{GenerateRequest, Pool};
use optiroute_common::Error;
use optiroute_router::eval::{self, is_held_out, load, original, ours, score, table, Labelled};
use optiroute_router::routing::Router;

struct Args {
    path: String,
    errors: bool,
    bench: bool,
    tune: bool,
}

fn main() -> std::process::ExitCode {
    let mut a = Args {
        path: concat!(env!("CARGO_MANIFEST_DIR"), "/data/prompts.jsonl").to_string(),
        errors: false,
        bench: false,
        tune: false,
    };
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--errors" => a.errors = true,
            "--bench" => a.bench = true,
            "--tune" => a.tune = true,
            "-h" | "--help" => {
                println!("usage: optiroute-route-eval [FILE.jsonl] [--errors] [--bench] [--tune]");
                return std::process::ExitCode::SUCCESS;
            }
            _ => a.path = arg,
        }
    }
    match run(&a) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("route-eval: {}", e.message);
            std::process::ExitCode::from(2)
        }
    }
}

fn run(a: &Args) -> Result<(), Error> {
    let text = std::fs::read_to_string(&a.path)
        .map_err(|e| Error::bad_request(format!("{}: {e}", a.path)))?;
    let items = load(&text).map_err(|e| Error::bad_request(format!("{}: {e}", a.path)))?;
    let split = |held: bool| -> Vec<&Labelled> {
        items
            .iter()
            .enumerate()
            .filter(|(i, _)| is_held_out(*i) == held)
            .map(|(_, x)| x)
            .collect()
    };
    let (held, tuning) = (split(true), split(false));
    let all: Vec<&Labelled> = items.iter().collect();
    let mut cfg = RoutingConfig::default();
    if a.tune {
        cfg = eval::tune(&tuning, &cfg)?;
        println!(
            "tuned on the tuning two-thirds only: threshold = {}\n{:#?}\n",
            cfg.threshold, cfg.weights
        );
    }
    let rows = [
        ("held-out third", "OptiRoute", score(&held, ours(&cfg)?)),
        (
            "held-out third",
            "original > 60 chars",
            score(&held, original),
        ),
        (
            "tuning two-thirds",
            "OptiRoute",
            score(&tuning, ours(&cfg)?),
        ),
        (
            "tuning two-thirds",
            "original > 60 chars",
            score(&tuning, original),
        ),
        ("all", "OptiRoute", score(&all, ours(&cfg)?)),
        ("all", "original > 60 chars", score(&all, original)),
    ];
    println!(
        "{}: {} prompts; held out: every third line\n",
        a.path,
        items.len()
    );
    print!("{}", table(&rows));
    println!(
        "\ncost model: cloud ${}/1k tokens for the prompt + {} output tokens; local {} s x ${}/s; \
         a cloud prompt routed local is paid twice (asked again on cloud).",
        eval::CLOUD_PRICE_PER_1K,
        eval::OUTPUT_TOKENS,
        eval::LOCAL_SECONDS,
        eval::LOCAL_PRICE_PER_S
    );
    let router = Router::new(&cfg)?;
    if a.errors {
        println!("\nmisrouted (tuning split only):");
        for item in &tuning {
            let d = router.decide(&GenerateRequest::new(item.prompt.as_str()));
            if d.target != item.label {
                let p: String = item.prompt.chars().take(90).collect();
                println!(
                    "  want {:5} got {:5} [{}] {}  <{}>",
                    item.label.as_str(),
                    d.target.as_str(),
                    item.category,
                    p.replace('\n', " "),
                    d.reason
                );
            }
        }
    }
    if a.bench {
        let reqs: Vec<GenerateRequest> = items
            .iter()
            .map(|i| GenerateRequest::new(i.prompt.as_str()))
            .collect();
        let rounds = 500;
        let started = Instant::now();
        let mut cloud = 0usize;
        for _ in 0..rounds {
            for r in &reqs {
                cloud += usize::from(router.decide(std::hint::black_box(r)).target == Pool::Cloud);
            }
        }
        let per = started.elapsed().as_secs_f64() / (rounds * reqs.len()) as f64;
        let mean_len = items.iter().map(|i| i.prompt.len()).sum::<usize>() / items.len().max(1);
        println!(
            "\nrouting cost: {:.2} µs per decision (mean of {} decisions over {} prompts, mean {} bytes; {} routed cloud)",
            per * 1e6,
            rounds * reqs.len(),
            reqs.len(),
            mean_len,
            cloud / rounds
        );
    }
    Ok(())
}
