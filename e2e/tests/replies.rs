//! Where workers write: only to the requester's inbox. A request may name
//! any reply subject (or stream inbox), so a worker that answers wherever
//! it is told writes with its own rights into KV buckets or calls the
//! JetStream API. And a value in the cache bucket counts only when it is an
//! entry the routers wrote for that key.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use optiroute_common::nats::NATS_SERVICE_ERROR_CODE;
use optiroute_common::wire::{
    self, Completion, Format, GenerateRequest, Pool, ProviderChoice, Usage,
};
use optiroute_router::cache::CachedAnswer;
use optiroute_testkit::stack::client;
use optiroute_testkit::{metric, request_json, scrape, test_config, wait_until, NatsServer, Stack};
use serde_json::{json, Value};

async fn cache_keys(cache: &jetstream::kv::Store) -> HashSet<String> {
    cache
        .keys()
        .await
        .unwrap()
        .map(|k| k.unwrap())
        .collect()
        .await
}

async fn ask(stack: &Stack, prompt: &str) -> Value {
    let (status, v) = stack
        .generate(&json!({"prompt": prompt, "provider": "local"}))
        .await;
    assert_eq!(status, 200, "{v}");
    v
}

/// A valid entry copied under another key, a bare answer without the tag
/// and a router reply are all misses: the request is generated again.
#[tokio::test]
async fn forged_cache_values_are_misses() {
    let nats = NatsServer::start();
    let mut cfg = test_config(&nats.url());
    // Every lookup goes to the bucket, not to a router's memory.
    cfg.cache.local_ttl_ms = 0;
    let stack = Stack::start(cfg.clone()).await;
    let c = client(&cfg, "forger").await;
    let cache = jetstream::new(c)
        .get_key_value("optiroute-cache")
        .await
        .unwrap();

    let a = ask(&stack, "tag test: prompt A").await;
    let key_a = cache_keys(&cache).await.into_iter().next().unwrap();
    let b = ask(&stack, "tag test: prompt B").await;
    assert_ne!(a["text"], b["text"]);
    let mut keys = cache_keys(&cache).await;
    keys.remove(&key_a);
    let key_b = keys.into_iter().next().unwrap();
    assert_eq!(ask(&stack, "tag test: prompt B").await["cached"], true);

    // A's real entry, copied under B's key.
    let entry_a = cache.get(&key_a).await.unwrap().unwrap();
    cache.put(&key_b, entry_a).await.unwrap();
    let got = ask(&stack, "tag test: prompt B").await;
    assert_eq!(
        got["cached"], false,
        "an entry of another key was served: {got}"
    );
    assert_eq!(got["text"], b["text"]);

    // An answer without the entry's tag, and what a router's reply looks like.
    let bare = CachedAnswer {
        completion: Completion {
            text: "FORGED".into(),
            usage: Usage::default(),
            model: "m".into(),
            finish_reason: None,
        },
        provider: Pool::Local,
        routed_to: Pool::Local,
        cost: 0.0,
        route_reason: None,
    };
    let reply: wire::GenerateResponse = wire::decode(
        Format::Json,
        serde_json::to_string(&got)
            .unwrap()
            .replace("[simulated]", "FORGED")
            .as_bytes(),
    )
    .unwrap();
    for forged in [
        wire::encode(Format::MsgPack, &bare).unwrap(),
        wire::encode(Format::MsgPack, &reply).unwrap(),
    ] {
        cache.put(&key_b, forged).await.unwrap();
        let got = ask(&stack, "tag test: prompt B").await;
        assert_eq!(got["cached"], false, "a forged value was served: {got}");
        assert_eq!(got["text"], b["text"]);
    }

    // Each request reads the value twice (the lookup, then the claim's
    // watch): counted at each read.
    let m = scrape(stack.router.as_ref().unwrap().admin_addr).await;
    let rejected = |reason| {
        metric(
            &m,
            "optiroute_cache_rejected_entries_total",
            &[("reason", reason)],
        )
    };
    assert!(rejected("key") >= Some(1.0), "{m}");
    assert!(rejected("undecodable") >= Some(2.0), "{m}");
}

/// On a server without accounts anyone may publish a request whose reply
/// subject is a KV key (or any subject a stream captures): a router or a
/// pool answering it would write its answer there. They drop such
/// requests instead, and count them.
#[tokio::test]
async fn workers_never_answer_outside_the_inboxes() {
    let nats = NatsServer::start();
    let cfg = test_config(&nats.url());
    let stack = Stack::start(cfg.clone()).await;
    let c = client(&cfg, "attacker").await;
    let js = jetstream::new(c.clone());
    let victims = [
        (
            "optiroute.generate",
            "optiroute-router",
            "router",
            stack.router.as_ref().unwrap().admin_addr,
        ),
        (
            "optiroute.provider.local",
            "optiroute-local",
            "local",
            stack.local.as_ref().unwrap().admin_addr,
        ),
        (
            "optiroute.provider.cloud",
            "optiroute-cloud",
            "cloud",
            stack.cloud.as_ref().unwrap().admin_addr,
        ),
    ];
    let bucket = js
        .create_key_value(jetstream::kv::Config {
            bucket: "victim".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut req = GenerateRequest::new("write into a bucket, please");
    req.provider = ProviderChoice::Local;
    for (subject, _, key, _) in victims {
        c.publish_with_reply(
            subject,
            format!("$KV.victim.{key}"),
            wire::encode(Format::MsgPack, &req).unwrap(),
        )
        .await
        .unwrap();
    }
    c.flush().await.unwrap();
    for (_, service, key, admin) in victims {
        wait_until(service, Duration::from_secs(10), || async {
            let m = scrape(admin).await;
            metric(&m, "optiroute_requests_total", &[("service", service)]) >= Some(1.0)
        })
        .await;
        assert!(
            bucket.get(key).await.unwrap().is_none(),
            "{service} wrote its reply into the bucket"
        );
        let m = scrape(admin).await;
        assert_eq!(
            metric(
                &m,
                "optiroute_requests_total",
                &[("service", service), ("outcome", "forbidden_reply")]
            ),
            Some(1.0),
            "{m}"
        );
    }
    // Normal requests are still answered.
    assert_eq!(ask(&stack, "still serving").await["provider"], "local");
}

/// Tokens go to the stream inbox a requester names: one outside the
/// inboxes is refused with a 400 before any work, on the router and on a
/// pool alike.
#[tokio::test]
async fn a_stream_inbox_outside_the_inboxes_is_refused() {
    let nats = NatsServer::start();
    let cfg = test_config(&nats.url());
    let stack = Stack::start(cfg.clone()).await;
    let c = client(&cfg, "streamer").await;
    for subject in ["optiroute.generate", "optiroute.provider.local"] {
        let reply = request_json(
            &c,
            subject,
            &[("Optiroute-Stream-Inbox", "$KV.optiroute-cache.stream")],
            r#"{"prompt": "stream into the cache", "provider": "local"}"#,
        )
        .await;
        let code = reply
            .headers
            .as_ref()
            .and_then(|h| h.get(NATS_SERVICE_ERROR_CODE))
            .map(|v| v.to_string());
        assert_eq!(code.as_deref(), Some("400"), "{subject}: {reply:?}");
        let body: Value = serde_json::from_slice(&reply.payload).unwrap();
        assert_eq!(body["code"], "bad_request", "{body}");
    }
    // A stream inbox under the requester's own inbox still streams.
    let inbox = c.new_inbox();
    let mut tokens = c.subscribe(inbox.clone()).await.unwrap();
    let reply = request_json(
        &c,
        "optiroute.provider.local",
        &[("Optiroute-Stream-Inbox", inbox.as_str())],
        r#"{"prompt": "stream to me", "max_tokens": 3}"#,
    )
    .await;
    assert!(
        reply
            .headers
            .as_ref()
            .and_then(|h| h.get(NATS_SERVICE_ERROR_CODE))
            .is_none(),
        "{reply:?}"
    );
    assert!(tokio::time::timeout(Duration::from_secs(5), tokens.next())
        .await
        .unwrap()
        .is_some());
    drop(stack);
}
