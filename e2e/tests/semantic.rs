//! The semantic cache on a real nats-server with the real embedding model:
//! a paraphrase is served the cached answer and says so; the guard refuses
//! a negation and another number; namespaces and teams never share; entries
//! leave with the TTL; two routers share the index through JetStream KV;
//! requests that do not ask see the exact cache unchanged; and without the
//! model the router still serves, saying why semantic lookups miss.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use optiroute_accounts::{AccountStore, NewKey, NewTeam};
use optiroute_common::config::{AuthMode, Config};
use optiroute_common::protocol::JetStreamNames;
use optiroute_testkit::{
    metric, scrape, test_config, wait_until, FakeUpstream, Mode, NatsServer, Stack,
};
use serde_json::{json, Value};

/// The model directory, fetched once by the project's script (idempotent).
fn model_dir() -> String {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = std::process::Command::new("bash")
            .arg(root.join("scripts/fetch-embed-model.sh"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "scripts/fetch-embed-model.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        root.join("models/all-MiniLM-L6-v2")
    })
    .to_string_lossy()
    .into_owned()
}

fn config(nats: &NatsServer, up: &FakeUpstream) -> Config {
    let mut c = test_config(&nats.url());
    c.cloud.upstream.base_url = up.base_url();
    c.router.embedding.model_dir = model_dir();
    c
}

async fn ask(stack: &Stack, body: Value) -> Value {
    let (status, v) = stack.generate(&body).await;
    assert_eq!(status, 200, "{v}");
    v
}

fn q(prompt: &str) -> Value {
    json!({"prompt": prompt, "provider": "cloud", "semantic": true})
}

/// A probe that reads the caches but writes nothing.
fn probe(prompt: &str) -> Value {
    json!({"prompt": prompt, "provider": "cloud", "semantic": true, "cache": "read_only"})
}

async fn router_metric(stack: &Stack, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = scrape(stack.router.as_ref().unwrap().admin_addr).await;
    metric(&text, name, labels).unwrap_or(0.0)
}

/// Asks `prompt` and waits until its vector is in the router's index.
async fn store(stack: &Stack, prompt: &str) -> Value {
    let semantic = stack.router.as_ref().unwrap().semantic.clone();
    let before = semantic.len();
    let first = ask(stack, q(prompt)).await;
    assert_eq!(first["cached"], false, "{first}");
    wait_until("the vector to be indexed", Duration::from_secs(10), || {
        let n = semantic.len();
        async move { n > before }
    })
    .await;
    first
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paraphrase_is_served_the_cached_answer_and_says_semantic() {
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::Ok).await;
    let stack = Stack::start(config(&nats, &up)).await;
    let first = store(&stack, "What is the capital of France?").await;
    let cost = first["cost"].as_f64().unwrap();
    assert!(cost > 0.0);
    assert!(first.get("cache_match").is_none(), "{first}");
    let second = ask(&stack, q("What's the capital city of France")).await;
    assert_eq!(second["cached"], true, "{second}");
    assert_eq!(second["cache_match"], "semantic");
    let s = second["similarity"].as_f64().unwrap();
    assert!((0.8..=1.0).contains(&s), "{second}");
    assert_eq!(second["text"], first["text"]);
    assert_eq!(second["cost"], 0.0);
    assert_eq!(second["saved_usd"].as_f64().unwrap(), cost);
    assert_eq!(up.hits(), 1, "no second provider call");
    let m = |n: &'static str, l: &'static [(&'static str, &'static str)]| {
        let stack = &stack;
        async move { router_metric(stack, n, l).await }
    };
    assert_eq!(
        m("llm_cache_events_total", &[("event_type", "semantic_hit")]).await,
        1.0
    );
    let saved = m("llm_cost_saved_usd_total", &[("provider", "cloud")]).await;
    assert!((saved - cost).abs() < 1e-12, "saved {saved} vs {cost}");
    assert_eq!(
        m("optiroute_semantic_lookups_total", &[("outcome", "hit")]).await,
        1.0
    );
    // The same prompt again is an exact hit, and says so; an exact hit and
    // a request that does not ask compute no embedding.
    let embeddings = m("llm_embedding_seconds_count", &[]).await;
    assert_eq!(embeddings, 2.0, "one per request that looked up");
    let exact = ask(&stack, q("What is the capital of France?")).await;
    assert_eq!(exact["cache_match"], "exact", "{exact}");
    assert!(exact.get("similarity").is_none());
    // A request that does not ask (the default is off) sees the exact
    // cache only, as before the semantic cache existed.
    let plain = ask(
        &stack,
        json!({"prompt": "What's the capital city of France", "provider": "cloud", "cache": "read_only"}),
    )
    .await;
    assert_eq!(plain["cached"], false, "{plain}");
    assert!(plain.get("semantic_miss").is_none(), "{plain}");
    assert!(plain.get("cache_match").is_none(), "{plain}");
    assert_eq!(m("llm_embedding_seconds_count", &[]).await, embeddings);
    // On the OpenAI API the header asks for it, and the answer says how it
    // matched (a conversation is its own partition: its question is the
    // last user turn).
    let chat = |content: &'static str| {
        let url = stack.url("/v1/chat/completions");
        async move {
            reqwest::Client::new()
                .post(url)
                .header("x-optiroute-semantic", "on")
                .json(
                    &json!({"model": "cloud", "messages": [{"role": "user", "content": content}]}),
                )
                .send()
                .await
                .unwrap()
        }
    };
    let semantic = stack.router.as_ref().unwrap().semantic.clone();
    let resp = chat("What is the capital of Germany?").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-optiroute-cache"], "miss");
    wait_until("the chat vector", Duration::from_secs(10), || {
        let n = semantic.len();
        async move { n == 2 }
    })
    .await;
    let resp = chat("What's the capital city of Germany").await;
    assert_eq!(resp.headers()["x-optiroute-cache"], "hit");
    assert_eq!(resp.headers()["x-optiroute-cache-match"], "semantic");
    assert!(resp.headers().contains_key("x-optiroute-similarity"));
    let bad = reqwest::Client::new()
        .post(stack.url("/v1/chat/completions"))
        .header("x-optiroute-semantic", "maybe")
        .json(&json!({"model": "cloud", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    // The first question, the request that did not ask, the first chat.
    assert_eq!(up.hits(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guard_refuses_a_negation_and_another_number() {
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::Ok).await;
    let stack = Stack::start(config(&nats, &up)).await;
    store(&stack, "Is coffee good for your health?").await;
    store(&stack, "List three uses of copper.").await;
    for (prompt, why, outcome) in [
        (
            "Is coffee not good for your health?",
            "negation",
            "guard_negation",
        ),
        ("List five uses of copper.", "numbers", "guard_numbers"),
    ] {
        let a = ask(&stack, probe(prompt)).await;
        assert_eq!(a["cached"], false, "{a}");
        assert!(a["cost"].as_f64().unwrap() > 0.0);
        let reason = a["semantic_miss"].as_str().unwrap();
        assert!(reason.contains(why), "{reason}");
        assert_eq!(
            router_metric(
                &stack,
                "optiroute_semantic_lookups_total",
                &[("outcome", outcome)]
            )
            .await,
            1.0
        );
    }
    assert_eq!(up.hits(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_do_not_share_and_entries_leave_with_the_ttl() {
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::Ok).await;
    let mut cfg = config(&nats, &up);
    cfg.cache.ttl_secs = 2;
    let stack = Stack::start(cfg).await;
    let mut body = q("How do I reverse a list in Python?");
    body["cache_namespace"] = json!("alpha");
    let semantic = stack.router.as_ref().unwrap().semantic.clone();
    ask(&stack, body).await;
    wait_until("indexed", Duration::from_secs(5), || {
        let n = semantic.len();
        async move { n == 1 }
    })
    .await;
    let mut other = probe("How can I reverse a Python list?");
    other["cache_namespace"] = json!("beta");
    let a = ask(&stack, other.clone()).await;
    assert_eq!(a["cached"], false, "another namespace: {a}");
    // Not even a candidate (a refused one would say why it was refused).
    assert!(
        a["semantic_miss"]
            .as_str()
            .unwrap_or_default()
            .contains("no stored question"),
        "{a}"
    );
    let mut same = other.clone();
    same["cache_namespace"] = json!("alpha");
    let a = ask(&stack, same.clone()).await;
    assert_eq!(a["cache_match"], "semantic", "its own namespace: {a}");
    // The bucket's TTL removes the entry; the index follows.
    wait_until("the entry to expire", Duration::from_secs(10), || {
        let (stack, same) = (&stack, same.clone());
        async move { ask(stack, same).await["cached"] == false }
    })
    .await;
    wait_until("the index to drop it", Duration::from_secs(5), || {
        let n = semantic.len();
        async move { n == 0 }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_teams_entries_are_never_candidates_for_another() {
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::Ok).await;
    let mut cfg = config(&nats, &up);
    cfg.auth.mode = AuthMode::Required;
    cfg.auth.admin_key = Some("admin-key-for-tests-0123".into());
    let stack = Stack::start(cfg.clone()).await;
    let nc = async_nats::connect(&cfg.nats.url).await.unwrap();
    let accounts = AccountStore::open(
        &async_nats::jetstream::new(nc),
        &JetStreamNames::for_prefix(&cfg.nats.prefix).accounts_bucket,
        1,
    )
    .await
    .unwrap();
    let url = stack.url("/generate");
    let post = |key: String, body: Value| {
        let url = url.clone();
        async move {
            let r = reqwest::Client::new()
                .post(url)
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let mut keys = Vec::new();
    for team in ["red", "blue"] {
        accounts
            .create_team(NewTeam {
                name: team.into(),
                ..NewTeam::default()
            })
            .await
            .unwrap();
        let k = accounts
            .create_key(NewKey {
                name: team.into(),
                team: Some(team.into()),
                ..NewKey::default()
            })
            .await
            .unwrap();
        let key = k.key.clone();
        wait_until("the key to be known", Duration::from_secs(5), || {
            let (post, key) = (&post, key.clone());
            async move { post(key, json!({})).await.0 == 400 }
        })
        .await;
        keys.push(k.key);
    }
    let semantic = stack.router.as_ref().unwrap().semantic.clone();
    let (s, _) = post(keys[0].clone(), q("What is the capital of France?")).await;
    assert_eq!(s, 200);
    wait_until("indexed", Duration::from_secs(5), || {
        let n = semantic.len();
        async move { n == 1 }
    })
    .await;
    let para = probe("What's the capital city of France");
    let (_, blue) = post(keys[1].clone(), para.clone()).await;
    assert_eq!(blue["cached"], false, "another team: {blue}");
    assert!(
        blue["semantic_miss"]
            .as_str()
            .unwrap()
            .contains("no stored question"),
        "nothing of the other team is even searched: {blue}"
    );
    let (_, red) = post(keys[0].clone(), para).await;
    assert_eq!(red["cache_match"], "semantic", "its own team: {red}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_routers_share_the_index_through_the_bucket() {
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::Ok).await;
    let a = Stack::start(config(&nats, &up)).await;
    // Another deployment prefix: its own subjects (so its ingress reaches
    // only its router), the same cache buckets.
    let mut cfg_b = config(&nats, &up);
    cfg_b.nats.prefix = "other".into();
    let b = Stack::start(cfg_b).await;
    let first = store(&a, "How do solar panels work?").await;
    let b_index = b.router.as_ref().unwrap().semantic.clone();
    wait_until("router B to see A's entry", Duration::from_secs(5), || {
        let n = b_index.len();
        async move { n == 1 }
    })
    .await;
    let hit = ask(&b, q("How does a solar panel work?")).await;
    assert_eq!(hit["cache_match"], "semantic", "{hit}");
    assert_eq!(hit["text"], first["text"]);
    assert_eq!(up.hits(), 1);
    assert_eq!(
        router_metric(
            &b,
            "llm_cache_events_total",
            &[("event_type", "semantic_hit")]
        )
        .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_model_semantic_requests_are_served_as_misses_that_say_why() {
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::Ok).await;
    let mut cfg = config(&nats, &up);
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-model-here");
    cfg.router.embedding.model_dir = missing.to_string_lossy().into_owned();
    let stack = Stack::start(cfg).await;
    assert!(!stack.router.as_ref().unwrap().semantic.active());
    let a = ask(&stack, q("What is the capital of France?")).await;
    assert_eq!(a["cached"], false);
    let why = a["semantic_miss"].as_str().unwrap();
    assert!(why.contains("no-model-here"), "the path: {why}");
    assert!(
        why.contains("scripts/fetch-embed-model.sh"),
        "the fetch command: {why}"
    );
    assert_eq!(
        router_metric(
            &stack,
            "optiroute_semantic_lookups_total",
            &[("outcome", "unavailable")]
        )
        .await,
        1.0
    );
    // The exact cache works as ever.
    wait_until("the exact entry", Duration::from_secs(5), || {
        let stack = &stack;
        async move { ask(stack, probe("What is the capital of France?")).await["cached"] == true }
    })
    .await;
}

/// Under `nats/accounts.conf` the router's user may create, write and
/// watch the semantic bucket, and nothing more is needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_user_of_accounts_conf_runs_the_semantic_cache() {
    let nats = NatsServer::start_with_accounts();
    let up = FakeUpstream::start(Mode::Ok).await;
    let cfg = config(&nats, &up);
    let stack = Stack::start_parts_as(
        cfg.clone(),
        optiroute_testkit::stack::Parts::ALL,
        |part, n| {
            let user = match part {
                "ingress" | "router" => part,
                _ => "provider",
            };
            n.url = nats.url_as(user);
            n.inbox_prefix = format!("_INBOX_{user}");
        },
    )
    .await;
    assert!(stack.router.as_ref().unwrap().semantic.is_connected());
    let first = store(&stack, "How do magnets work?").await;
    let hit = ask(&stack, q("How does a magnet work?")).await;
    assert_eq!(hit["cache_match"], "semantic", "{hit}");
    assert_eq!(hit["text"], first["text"]);
}
