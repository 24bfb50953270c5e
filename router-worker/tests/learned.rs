//! The learned router with the real embedding model (fetched by
//! `scripts/fetch-embed-model.sh` on first use, as the embed crate's tests
//! do): the shipped weights load and route pinned prompts as labelled; a
//! missing or corrupt weights file, or a missing model, falls back to the
//! feature router with the reason in `route_reason`; `cloud_share`
//! calibration hits its share on the reference workload.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use optiroute_common::config::{EmbeddingConfig, RouterKind, RoutingConfig};
use optiroute_common::wire::{GenerateRequest, Pool, ProviderChoice};
use optiroute_embed::{Embedder, DEFAULT_MODEL_DIR};
use optiroute_router::decide::Routing;
use optiroute_router::embedding::{Embeddings, RequestEmbedding};
use optiroute_router::eval::{in_split, load, Labelled, Split};
use optiroute_router::eval_learned::examples;
use optiroute_router::learned::train::train;
use optiroute_router::learned::{Weights, BUILT_IN};
use optiroute_router::routing::Router;

const SET: &str = include_str!("../data/prompts.jsonl");

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn embedder() -> Arc<Embedder> {
    static MODEL: OnceLock<Arc<Embedder>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let out = std::process::Command::new("bash")
                .arg(root().join("scripts/fetch-embed-model.sh"))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "scripts/fetch-embed-model.sh failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            Arc::new(Embedder::load(root().join(DEFAULT_MODEL_DIR)).unwrap())
        })
        .clone()
}

fn learned_cfg() -> RoutingConfig {
    RoutingConfig {
        kind: RouterKind::Learned,
        ..RoutingConfig::default()
    }
}

async fn decide(
    routing: &Routing,
    embeddings: &Embeddings,
    req: &GenerateRequest,
) -> (Pool, String) {
    let text = req.text();
    let e = RequestEmbedding::new(embeddings, &text);
    let d = routing.decide(req, &e, "").await;
    (d.target, d.reason)
}

#[tokio::test]
async fn shipped_weights_load_and_pinned_prompts_route_as_labelled() {
    // The file next to the labelled set is the one built in.
    let file = Weights::load(&format!(
        "{}/data/learned-router.json",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    assert_eq!(file, Weights::parse(BUILT_IN).unwrap());
    assert_eq!(RoutingConfig::default().kind, RouterKind::Learned);

    let embeddings = Embeddings::with_model(embedder(), 2);
    let routing = Routing::new(&learned_cfg())
        .unwrap()
        .require_embeddings(&embeddings);
    assert!(routing.needs_embedding() && routing.unavailable().is_none());
    let items = load(SET).unwrap();
    // From the held-out third (never stored in the model), both labels,
    // several styles; the terse cloud one the feature router gets wrong.
    let held = in_split(&items, Split::HeldOut);
    let pinned = [
        "nice",
        "cat in german",
        "How many continents are there?",
        "Nice to meet you! What should I call you?",
        "why is housing so expensive",
        "Assess the risks of building a product on top of a single LLM vendor's API.",
        "Find the eigenvalues and eigenvectors of the matrix [[2, 1], [1, 2]].",
        "Compare Raft and Paxos for a small team building a replicated key-value store. Which would you pick and why?",
    ];
    let mut labels = Vec::new();
    for p in pinned {
        let item = held
            .iter()
            .find(|i| i.prompt == p)
            .unwrap_or_else(|| panic!("{p} not in the held-out third"));
        let (target, reason) = decide(&routing, &embeddings, &item.request()).await;
        assert_eq!(target, item.label, "{p}: {reason}");
        assert!(reason.starts_with("learned "), "{reason}");
        assert!(reason.contains("features score"), "{reason}");
        // A max_tokens no labelled prompt had moves one input, not the
        // whole prompt away from every stored one.
        let mut big = item.request();
        big.params.max_tokens = 1024;
        let (target, reason) = decide(&routing, &embeddings, &big).await;
        assert_eq!(target, item.label, "{p} with max_tokens 1024: {reason}");
        assert!(!reason.contains("kernel 0.00"), "{reason}");
        labels.push(item.label);
    }
    assert!(labels.contains(&Pool::Local) && labels.contains(&Pool::Cloud));
    assert_eq!(
        features_decision(&GenerateRequest::new(pinned[4])).0,
        Pool::Local,
        "the feature router sends it local"
    );

    // An explicit provider still wins without computing an embedding.
    let mut req = GenerateRequest::new("Why did the Roman Republic fall?");
    req.provider = ProviderChoice::Local;
    let text = req.text();
    let e = RequestEmbedding::new(&embeddings, &text);
    assert_eq!(routing.decide(&req, &e, "").await.target, Pool::Local);
    assert!(e.computed().is_none());

    // A repeated prompt (a cache hit, mostly) is not embedded again, and
    // decided the same way.
    let req = GenerateRequest::new(pinned[6]);
    let text = req.text();
    let again = RequestEmbedding::new(&embeddings, &text);
    let d = routing.decide(&req, &again, "").await;
    assert!(again.computed().is_none(), "embedded again");
    assert_eq!(
        (d.target, d.reason.as_str()),
        (
            Pool::Cloud,
            decide(&routing, &embeddings, &req).await.1.as_str()
        )
    );
    let fresh = Routing::new(&learned_cfg())
        .unwrap()
        .require_embeddings(&embeddings);
    let first = RequestEmbedding::new(&embeddings, &text);
    assert_eq!(fresh.decide(&req, &first, "").await, d);
    assert!(first.computed().is_some());

    // route_bias moves the learned threshold both ways: a prompt near it
    // (it scores about −0.22, the threshold itself) goes to the cloud at
    // +1 and local at −1.
    let mut req = GenerateRequest::new("Who discovered penicillin?");
    req.route_bias = Some(-1.0);
    let (low, why) = decide(&routing, &embeddings, &req).await;
    assert_eq!(low, Pool::Local, "{why}");
    req.route_bias = Some(1.0);
    let (high, why) = decide(&routing, &embeddings, &req).await;
    assert_eq!(high, Pool::Cloud, "{why}");
}

/// The feature router's decision, for comparison.
fn features_decision(req: &GenerateRequest) -> (Pool, String) {
    let d = Router::new(&RoutingConfig::default()).unwrap().decide(req);
    (d.target, d.reason)
}

#[tokio::test]
async fn missing_or_corrupt_weights_fall_back_to_the_feature_router_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let bad_dims = {
        let mut v: serde_json::Value = serde_json::from_str(BUILT_IN).unwrap();
        v["input_mean"].as_array_mut().unwrap().pop();
        v.to_string()
    };
    let cases = [
        ("missing.json", None, "missing.json"),
        (
            "truncated.json",
            Some("{\"format\": \"optiroute-learned-router/2\", "),
            "not a weights file",
        ),
        (
            "dims.json",
            Some(bad_dims.as_str()),
            "input_mean has 394 values, expected 395",
        ),
    ];
    let embeddings = Embeddings::with_model(embedder(), 1);
    let req = GenerateRequest::new(
        "Implement a thread-safe bounded queue in C++ using condition variables.",
    );
    let (want, features_reason) = features_decision(&req);
    for (name, contents, why) in cases {
        let path = dir.join(name);
        if let Some(c) = contents {
            std::fs::write(&path, c).unwrap();
        }
        let mut cfg = learned_cfg();
        cfg.learned.weights_file = Some(path.to_string_lossy().into_owned());
        let routing = Routing::new(&cfg).unwrap().require_embeddings(&embeddings);
        assert!(!routing.needs_embedding(), "{name}");
        assert!(
            routing.unavailable().unwrap().contains(why),
            "{name}: {:?}",
            routing.unavailable()
        );
        let text = req.text();
        let e = RequestEmbedding::new(&embeddings, &text);
        let d = routing.decide(&req, &e, "").await;
        assert_eq!(d.target, want, "{name}");
        assert!(
            d.reason.starts_with("learned router unavailable (weights ") && d.reason.contains(why),
            "{name}: {}",
            d.reason
        );
        assert!(
            d.reason.ends_with(&format!("features: {features_reason}")),
            "{}",
            d.reason
        );
        assert!(
            e.computed().is_none(),
            "no embedding is computed for nothing"
        );
    }

    // Good weights, but no embedding model.
    let no_model = Embeddings::load(
        &EmbeddingConfig {
            model_dir: dir.join("no-model").to_string_lossy().into_owned(),
            ..EmbeddingConfig::default()
        },
        true,
    );
    let routing = Routing::new(&learned_cfg())
        .unwrap()
        .require_embeddings(&no_model);
    let d = decide(&routing, &no_model, &req).await;
    assert_eq!(d.0, want);
    assert!(
        d.1.starts_with("learned router unavailable (embedding model: "),
        "{}",
        d.1
    );
    assert!(d.1.contains("fetch-embed-model.sh"), "{}", d.1);
}

/// The reference workload is the training and validation thirds as a new
/// prompt would score: each scored by a model that did not see it. Training
/// again from the same prompts makes the shipped file (threshold and
/// quantiles), `cloud_share` hits its share of that workload within ±3
/// points through the router, and on the held-out third, prompts the
/// calibration never saw, within ±5.
#[tokio::test]
async fn cloud_share_calibration_hits_its_share_on_the_reference_workload() {
    let items = load(SET).unwrap();
    let (train_set, val_set) = (
        in_split(&items, Split::Train),
        in_split(&items, Split::Validation),
    );
    let router = Router::new(&RoutingConfig::default()).unwrap();
    let model = embedder();
    let examples = |set: &[&Labelled]| {
        let embs: Vec<Vec<f32>> = set
            .iter()
            .map(|i| model.embed(i.request().params.last_user_text()))
            .collect();
        examples(&router, set, &embs)
    };
    let shipped = Weights::parse(BUILT_IN).unwrap();
    let trained = train(
        &examples(&train_set),
        &examples(&val_set),
        shipped.training.seed,
        "test",
    )
    .unwrap();
    let w = &trained.weights;
    assert!(
        (w.threshold - shipped.threshold).abs() < 1e-3,
        "{} vs {}",
        w.threshold,
        shipped.threshold
    );
    assert_eq!(w.support_cloud, shipped.support_cloud);
    assert_eq!(w.alpha.len(), shipped.alpha.len());
    for (a, b) in w.alpha.iter().zip(&shipped.alpha) {
        assert!((a - b).abs() < 1e-3, "alpha {a} vs shipped {b}");
    }
    for (a, b) in w.input_mean.iter().zip(&shipped.input_mean) {
        assert!((a - b).abs() < 1e-5, "mean {a} vs shipped {b}");
    }
    for (a, b) in w
        .reference_quantiles
        .iter()
        .zip(&shipped.reference_quantiles)
    {
        assert!((a - b).abs() < 1e-3, "quantile {a} vs shipped {b}");
    }
    let oof = &trained.out_of_fold;
    let held = in_split(&items, Split::HeldOut);
    let held_reqs: Vec<GenerateRequest> = held.iter().map(|i| i.request()).collect();
    let held_embs: Vec<Vec<f32>> = held_reqs
        .iter()
        .map(|r| model.embed(r.params.last_user_text()))
        .collect();
    let embeddings = Embeddings::with_model(model.clone(), 1);
    for share in [0.1f32, 0.25, 0.5, 0.75, 0.9] {
        let mut cfg = learned_cfg();
        cfg.cloud_share = Some(share);
        let routing = Routing::new(&cfg).unwrap().require_embeddings(&embeddings);
        let threshold = routing.learned().unwrap().threshold();
        let got = oof.iter().filter(|s| **s >= threshold).count() as f32 / oof.len() as f32;
        assert!(
            (got - share).abs() <= 0.03,
            "cloud_share {share}: {got} of the reference"
        );
        let cloud = held_reqs
            .iter()
            .zip(&held_embs)
            .filter(|(r, e)| routing.decide_with(r, Some(e)).target == Pool::Cloud)
            .count();
        let got = cloud as f32 / held_reqs.len() as f32;
        assert!(
            (got - share).abs() <= 0.05,
            "cloud_share {share}: {got} of the held-out third"
        );
        let d = routing.decide_with(&held_reqs[0], Some(&held_embs[0]));
        assert!(
            d.reason.contains(&format!("cloud_share {share:.2}")),
            "{}",
            d.reason
        );
    }
}
