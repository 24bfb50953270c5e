//! Prints how our router and the original 60-character rule do on the
//! labelled prompt set: `optiroute-route-eval [FILE] [--errors] [--bench]`.

use std::time::Instant;

use optiroute_common::config::RoutingConfig;
use optiroute_common::wire::GenerateRequest;
use optiroute_router::eval::{is_held_out, load, original, ours, score, table, Labelled};
use optiroute_router::routing::Router;

fn main() -> std::process::ExitCode {
    let mut path = concat!(env!("CARGO_MANIFEST_DIR"), "/data/prompts.jsonl").to_string();
    let (mut errors, mut bench) = (false, false);
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "--errors" => errors = true,
            "--bench" => bench = true,
            "-h" | "--help" => {
                println!("usage: optiroute-route-eval [FILE.jsonl] [--errors] [--bench]");
                return std::process::ExitCode::SUCCESS;
            }
            _ => path = a,
        }
    }
    let items = match std::fs::read_to_string(&path).map_err(|e| e.to_string()).and_then(|t| load(&t)) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("route-eval: {path}: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let cfg = RoutingConfig::default();
    let split = |held: bool| -> Vec<&Labelled> {
        items.iter().enumerate().filter(|(i, _)| is_held_out(*i) == held).map(|(_, x)| x).collect()
    };
    let (held, tune) = (split(true), split(false));
    let all: Vec<&Labelled> = items.iter().collect();
    let rows = [
        ("held-out third", "OptiRoute", score(&held, ours(&cfg))),
        ("held-out third", "original > 60 chars", score(&held, original)),
        ("tuning two-thirds", "OptiRoute", score(&tune, ours(&cfg))),
        ("tuning two-thirds", "original > 60 chars", score(&tune, original)),
        ("all", "OptiRoute", score(&all, ours(&cfg))),
        ("all", "original > 60 chars", score(&all, original)),
    ];
    println!("{path}: {} prompts\n", items.len());
    print!("{}", table(&rows));
    println!("\ncost model: cloud ${}/1k tokens for prompt + {} output tokens; local {} s x ${}/s; a cloud prompt routed local is paid twice (retried on cloud).",
        optiroute_router::eval::CLOUD_PRICE_PER_1K, optiroute_router::eval::OUTPUT_TOKENS,
        optiroute_router::eval::LOCAL_SECONDS, optiroute_router::eval::LOCAL_PRICE_PER_S);
    if errors {
        let router = Router::new(&cfg);
        println!("\nmisrouted (tuning split only):");
        for item in &tune {
            let d = router.decide(&GenerateRequest::new(item.prompt.as_str()));
            if d.target != item.label {
                let p: String = item.prompt.chars().take(90).collect();
                println!("  want {:5} got {:5} [{}] {}  <{}>", item.label.as_str(), d.target.as_str(), item.category, p.replace('\n', " "), d.reason);
            }
        }
    }
    if bench {
        let router = Router::new(&cfg);
        let reqs: Vec<GenerateRequest> = items.iter().map(|i| GenerateRequest::new(i.prompt.as_str())).collect();
        let rounds = 200;
        let started = Instant::now();
        let mut cloud = 0usize;
        for _ in 0..rounds {
            for r in &reqs {
                cloud += usize::from(router.decide(std::hint::black_box(r)).target == optiroute_common::wire::Pool::Cloud);
            }
        }
        let per = started.elapsed().as_secs_f64() / (rounds * reqs.len()) as f64;
        println!("\nrouting cost: {:.2} µs per decision (mean over {} decisions, {} prompts; {} cloud)", per * 1e6, rounds * reqs.len(), reqs.len(), cloud / rounds);
    }
    std::process::ExitCode::SUCCESS
}
