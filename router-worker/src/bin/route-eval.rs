//! Prints how the routers do on the labelled prompt set and the external
//! set: the original 60-character rule, the feature router and the learned
//! router, the cost–quality curve, and (`--bench`) the cost of a decision.
//! `--train` writes the learned router's weights; `--calibrate SHARE`
//! prints the threshold that sends SHARE of the reference workload to the cloud.

use std::time::Instant;

use optiroute_common::config::{RouterKind, RoutingConfig};
use optiroute_common::wire::Pool;
use optiroute_common::Error;
use optiroute_embed::Embedder;
use optiroute_router::decide::Routing;
use optiroute_router::eval::{self, in_split, load, original, ours, score, table, Labelled, Split};
use optiroute_router::eval_learned::{self as el, curve_table};
use optiroute_router::learned::{self, train, LearnedRouter, Weights};
use optiroute_router::routing::Router;

const USAGE: &str = "usage: optiroute-route-eval [FILE.jsonl] [--external FILE] [--weights FILE] \
[--model DIR] [--train] [--seed N] [--calibrate SHARE] [--explain PROMPT] [--errors] [--bench] [--tune]";

struct Args {
    path: String,
    external: String,
    weights: String,
    model: String,
    train: bool,
    seed: u64,
    calibrate: Option<f32>,
    explain: Option<String>,
    errors: bool,
    bench: bool,
    tune: bool,
}

fn data(file: &str) -> String {
    format!("{}/data/{file}", env!("CARGO_MANIFEST_DIR"))
}

fn parse() -> Result<Option<Args>, String> {
    let mut a = Args {
        path: data("prompts.jsonl"),
        external: data("external.jsonl"),
        weights: data("learned-router.json"),
        model: format!(
            "{}/../{}",
            env!("CARGO_MANIFEST_DIR"),
            optiroute_embed::DEFAULT_MODEL_DIR
        ),
        train: false,
        seed: 20,
        calibrate: None,
        explain: None,
        errors: false,
        bench: false,
        tune: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--errors" => a.errors = true,
            "--bench" => a.bench = true,
            "--tune" => a.tune = true,
            "--train" => a.train = true,
            "--external" => a.external = value("--external")?,
            "--weights" => a.weights = value("--weights")?,
            "--model" => a.model = value("--model")?,
            "--explain" => a.explain = Some(value("--explain")?),
            "--seed" => {
                a.seed = value("--seed")?
                    .parse()
                    .map_err(|e| format!("--seed: {e}"))?
            }
            "--calibrate" => {
                let s: f32 = value("--calibrate")?
                    .parse()
                    .map_err(|e| format!("--calibrate: {e}"))?;
                if !(0.0..=1.0).contains(&s) {
                    return Err("--calibrate: the share must be between 0 and 1".into());
                }
                a.calibrate = Some(s);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            s if s.starts_with("--") => return Err(format!("unknown option {s}\n{USAGE}")),
            _ => a.path = arg,
        }
    }
    Ok(Some(a))
}

fn main() -> std::process::ExitCode {
    let result = match parse() {
        Ok(None) => return std::process::ExitCode::SUCCESS,
        Ok(Some(a)) => run(&a).map_err(|e| e.message),
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("route-eval: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

fn read_set(path: &str) -> Result<Vec<Labelled>, Error> {
    let text =
        std::fs::read_to_string(path).map_err(|e| Error::bad_request(format!("{path}: {e}")))?;
    load(&text).map_err(|e| Error::bad_request(format!("{path}: {e}")))
}

/// The learned router from `weights` with `cfg`'s threshold settings.
fn learned_router(cfg: &RoutingConfig, weights: Weights) -> LearnedRouter {
    LearnedRouter::new(weights, cfg)
}

fn run(a: &Args) -> Result<(), Error> {
    let items = read_set(&a.path)?;
    let external = read_set(&a.external)?;
    let (train_set, val_set, held) = (
        in_split(&items, Split::Train),
        in_split(&items, Split::Validation),
        in_split(&items, Split::HeldOut),
    );
    let reference: Vec<&Labelled> = train_set.iter().chain(&val_set).copied().collect();
    let ext: Vec<&Labelled> = external.iter().collect();
    let mut cfg = RoutingConfig::default();
    if a.tune {
        cfg = eval::tune(&reference, &cfg)?;
        println!(
            "tuned on the training and validation thirds only: threshold = {}\n{:#?}\n",
            cfg.threshold, cfg.weights
        );
    }
    let router = Router::new(&cfg)?;
    let model = Embedder::load(&a.model);
    if a.train {
        let model = model
            .as_ref()
            .map_err(|e| Error::bad_request(format!("--train needs the embedding model: {e}")))?;
        train_and_write(a, &router, model, &train_set, &val_set)?;
    }
    let weights = Weights::load(&a.weights);
    let (model, weights) = match (model, weights) {
        (Ok(m), Ok(w)) => (m, w),
        (m, w) => {
            let why = [m.err().map(|e| e.to_string()), w.err()];
            println!(
                "learned router skipped: {}\n",
                why.into_iter().flatten().collect::<Vec<_>>().join("; ")
            );
            return features_only(a, &cfg, &held, &ext);
        }
    };
    let mut lcfg = cfg.clone();
    lcfg.kind = RouterKind::Learned;
    let learned = learned_router(&lcfg, weights.clone());
    if let Some(p) = &a.explain {
        let req = optiroute_common::wire::GenerateRequest::new(p.as_str());
        let emb = model.embed(p);
        let (f, l) = (router.decide(&req), learned.decide(&router, &req, &emb));
        println!("features: {} ({})", f.target.as_str(), f.reason);
        println!("learned:  {} ({})", l.target.as_str(), l.reason);
        return Ok(());
    }
    let started = Instant::now();
    let ref_embs = el::embed_all(&model, &reference);
    let held_embs = el::embed_all(&model, &held);
    let ext_embs = el::embed_all(&model, &ext);
    println!(
        "embedded {} prompts in {:.1} s\n",
        reference.len() + held.len() + ext.len(),
        started.elapsed().as_secs_f64()
    );
    let held_l = el::learned_scores(&learned, &router, &held, &held_embs);
    let ext_l = el::learned_scores(&learned, &router, &ext, &ext_embs);
    let ref_l = el::learned_scores(&learned, &router, &reference, &ref_embs);
    let t = learned.threshold();
    if let Some(share) = a.calibrate {
        return calibrate(&router, &weights, (&reference, &held), &held_l, share);
    }
    let rows = [
        (
            "train + validation (in sample for learned)",
            "features",
            score(&reference, ours(&cfg)?),
        ),
        (
            "train + validation (in sample for learned)",
            "learned",
            eval::score_decisions(&reference, &el::at_threshold(&ref_l, t)),
        ),
        (
            "held-out third",
            "original > 60 chars",
            score(&held, original),
        ),
        ("held-out third", "features", score(&held, ours(&cfg)?)),
        (
            "held-out third",
            "learned",
            eval::score_decisions(&held, &el::at_threshold(&held_l, t)),
        ),
        ("external", "original > 60 chars", score(&ext, original)),
        ("external", "features", score(&ext, ours(&cfg)?)),
        (
            "external",
            "learned",
            eval::score_decisions(&ext, &el::at_threshold(&ext_l, t)),
        ),
    ];
    println!(
        "{}: {} prompts (train {}, validation {}, held out {}: every third line); {}: {} prompts\n",
        a.path,
        items.len(),
        train_set.len(),
        val_set.len(),
        held.len(),
        a.external,
        external.len()
    );
    print!("{}", table(&rows));
    println!(
        "\nlearned threshold: score {t:+.3} (trained for cloud recall; kernel ridge {}, {}-fold, seed {}, {} examples)",
        weights.training.ridge, weights.training.folds, weights.training.seed, weights.training.examples
    );
    println!(
        "cost model: cloud ${}/1k tokens for the prompt + {} output tokens; local {} s x ${}/s; \
         a cloud prompt routed local is paid twice (asked again on cloud).",
        eval::CLOUD_PRICE_PER_1K,
        eval::OUTPUT_TOKENS,
        eval::LOCAL_SECONDS,
        eval::LOCAL_PRICE_PER_S
    );
    // Equal cloud recall: the learned threshold (swept on the held-out
    // scores) that is cheapest while keeping the feature router's recall.
    for (name, set, scores_l) in [
        ("held-out third", &held, &held_l),
        ("external", &ext, &ext_l),
    ] {
        let f = score(set, ours(&cfg)?);
        if let Some((lt, l)) = el::cheapest_at_recall(set, scores_l, f.cloud_recall) {
            println!(
                "{name}, at the feature router's cloud recall {:.1} %: features ${:.4}/1k (accuracy {:.1} %), \
                 learned ${:.4}/1k (accuracy {:.1} %, recall {:.1} %, score {lt:+.3})",
                f.cloud_recall * 100.0,
                f.cost_per_1k,
                f.accuracy * 100.0,
                l.cost_per_1k,
                l.accuracy * 100.0,
                l.cloud_recall * 100.0
            );
        }
    }
    by_style(&cfg, &held, &held_l, t)?;
    let shares: Vec<f32> = (1..=9).map(|i| i as f32 / 10.0).collect();
    let ref_f = el::feature_scores(&router, &reference);
    let held_f = el::feature_scores(&router, &held);
    println!(
        "\ncost–quality curve on the held-out third (each threshold calibrated on the training and validation thirds):\n"
    );
    print!(
        "{}",
        curve_table(&[
            (
                "learned",
                el::curve(&weights.reference_quantiles, &held, &held_l, &shares)
            ),
            (
                "features",
                el::curve(&learned::quantiles(&ref_f), &held, &held_f, &shares)
            ),
        ])
    );
    if a.errors {
        println!("\nmisrouted by the learned router (training and validation thirds only):");
        for (item, s) in reference.iter().zip(&ref_l) {
            let got = if *s >= t { Pool::Cloud } else { Pool::Local };
            if got != item.label {
                let p: String = item.text().chars().take(90).collect();
                println!(
                    "  want {:5} score {s:+.2} [{}] {}",
                    item.label.as_str(),
                    item.category,
                    p.replace('\n', " ")
                );
            }
        }
    }
    if a.bench {
        bench(&cfg, &router, &learned, &model, &held)?;
    }
    Ok(())
}

/// Held-out accuracy by style, for the feature and the learned router.
fn by_style(cfg: &RoutingConfig, held: &[&Labelled], scores: &[f32], t: f32) -> Result<(), Error> {
    let features = ours(cfg)?;
    let mut styles: Vec<&str> = held.iter().filter_map(|i| i.style.as_deref()).collect();
    styles.sort_unstable();
    styles.dedup();
    println!("\nheld-out third by style: n, features accuracy, learned accuracy");
    for style in styles {
        let (mut n, mut f_ok, mut l_ok) = (0, 0, 0);
        for (item, s) in held.iter().zip(scores) {
            if item.style.as_deref() != Some(style) {
                continue;
            }
            let learned = if *s >= t { Pool::Cloud } else { Pool::Local };
            n += 1;
            f_ok += usize::from(features(item) == item.label);
            l_ok += usize::from(learned == item.label);
        }
        println!(
            "  {style:12} {n:4}  {:5.1} %  {:5.1} %",
            f_ok as f64 * 100.0 / n as f64,
            l_ok as f64 * 100.0 / n as f64
        );
    }
    Ok(())
}

fn train_and_write(
    a: &Args,
    router: &Router,
    model: &Embedder,
    train_set: &[&Labelled],
    val_set: &[&Labelled],
) -> Result<(), Error> {
    let started = Instant::now();
    let t = el::examples(router, train_set, &el::embed_all(model, train_set));
    let v = el::examples(router, val_set, &el::embed_all(model, val_set));
    let source = format!(
        "router-worker/data/{} (training and validation thirds)",
        std::path::Path::new(&a.path)
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    let train::Trained {
        weights, report, ..
    } = train::train(&t, &v, a.seed, &source).map_err(Error::internal)?;
    let text = serde_json::to_string_pretty(&weights)
        .map_err(|e| Error::internal(format!("weights: {e}")))?;
    std::fs::write(&a.weights, text + "\n")
        .map_err(|e| Error::bad_request(format!("{}: {e}", a.weights)))?;
    println!(
        "trained in {:.1} s (seed {}):\n{report}wrote {}\n",
        started.elapsed().as_secs_f64(),
        a.seed,
        a.weights
    );
    Ok(())
}

/// The thresholds for `share`: the learned one from the weights'
/// reference quantiles (out-of-fold scores of the training and validation
/// thirds), the feature router's from its scores on them; and the share
/// each sends of the held-out third, prompts neither was calibrated on.
fn calibrate(
    router: &Router,
    weights: &Weights,
    (reference, held): (&[&Labelled], &[&Labelled]),
    held_l: &[f32],
    share: f32,
) -> Result<(), Error> {
    let above = |s: &[f32], t: f32| {
        s.iter().filter(|x| **x >= t).count() as f64 / s.len().max(1) as f64 * 100.0
    };
    let t = weights.threshold_for_share(share);
    let ref_f = el::feature_scores(router, reference);
    let tf = learned::threshold_for_share(&learned::quantiles(&ref_f), share);
    let held_f = el::feature_scores(router, held);
    println!(
        "cloud_share {share}: learned threshold {t:+.4} (set router.routing.cloud_share = {share}); \
         it sends {:.1} % of the {} held-out prompts to the cloud\n\
         features: threshold {tf:.3} (sends {:.1} % of the {} reference prompts and {:.1} % of the held-out ones; \
         set router.routing.threshold = {tf:.3})",
        above(held_l, t),
        held.len(),
        above(&ref_f, tf),
        reference.len(),
        above(&held_f, tf)
    );
    Ok(())
}

fn features_only(
    a: &Args,
    cfg: &RoutingConfig,
    held: &[&Labelled],
    ext: &[&Labelled],
) -> Result<(), Error> {
    let rows = [
        (
            "held-out third",
            "original > 60 chars",
            score(held, original),
        ),
        ("held-out third", "features", score(held, ours(cfg)?)),
        ("external", "original > 60 chars", score(ext, original)),
        ("external", "features", score(ext, ours(cfg)?)),
    ];
    print!("{}", table(&rows));
    if a.bench {
        let router = Router::new(cfg)?;
        let reqs: Vec<_> = held.iter().map(|i| i.request()).collect();
        let mut us = time_each(&reqs, |r| router.decide(r).target);
        println!(
            "\nfeatures decision: p50 {:.1} µs, p99 {:.1} µs",
            el::percentile(&mut us, 50.0),
            el::percentile(&mut us, 99.0)
        );
    }
    Ok(())
}

/// Microseconds per call of `f` on each request (10 rounds).
fn time_each<T, R>(reqs: &[T], mut f: impl FnMut(&T) -> R) -> Vec<f64> {
    let mut samples = Vec::with_capacity(reqs.len() * 10);
    for _ in 0..10 {
        for r in reqs {
            let started = Instant::now();
            std::hint::black_box(f(std::hint::black_box(r)));
            samples.push(started.elapsed().as_secs_f64() * 1e6);
        }
    }
    samples
}

fn bench(
    cfg: &RoutingConfig,
    router: &Router,
    learned: &LearnedRouter,
    model: &Embedder,
    held: &[&Labelled],
) -> Result<(), Error> {
    let mut lcfg = cfg.clone();
    lcfg.kind = RouterKind::Learned;
    let _ = Routing::new(&lcfg)?; // the same construction the handler uses
    let reqs: Vec<_> = held.iter().map(|i| i.request()).collect();
    let embs: Vec<Vec<f32>> = reqs
        .iter()
        .map(|r| model.embed(r.params.last_user_text()))
        .collect();
    let pairs: Vec<_> = reqs.iter().zip(&embs).collect();
    let mut f = time_each(&reqs, |r| router.decide(r).target);
    let mut l_pre = time_each(&pairs, |(r, e)| learned.decide(router, r, e).target);
    let mut l_full = Vec::with_capacity(reqs.len());
    for r in &reqs {
        let started = Instant::now();
        let e = model.embed(r.params.last_user_text());
        std::hint::black_box(learned.decide(router, r, &e).target);
        l_full.push(started.elapsed().as_secs_f64() * 1e6);
    }
    let mean_chars =
        reqs.iter().map(|r| r.text().chars().count()).sum::<usize>() / reqs.len().max(1);
    println!(
        "\ndecision cost on the {} held-out prompts (mean {mean_chars} chars), one thread:",
        reqs.len()
    );
    for (name, s) in [
        ("features", &mut f),
        (
            "learned, embedding already computed (shared with the semantic cache)",
            &mut l_pre,
        ),
        ("learned, embedding included", &mut l_full),
    ] {
        println!(
            "  {name}: p50 {:.1} µs, p99 {:.1} µs",
            el::percentile(s, 50.0),
            el::percentile(s, 99.0)
        );
    }
    Ok(())
}
