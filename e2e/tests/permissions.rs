//! The whole pipeline under `nats/accounts.conf`: every process connects as
//! its own user with only the permissions that file grants, and everything
//! still works — HTTP, cache, streaming, batches,
//! direct publishing — while a user cannot reach what its role does not
//! need: the provider pools behind the routers, or another user's replies.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures::StreamExt;
use optiroute_batch::BatchClient;
use optiroute_common::config::Config;
use optiroute_common::wire::{self, Format, GenerateRequest, ProviderChoice};
use optiroute_testkit::stack::{client, Parts};
use optiroute_testkit::{
    json_body, metric, request_json, scrape, test_config, wait_until, NatsServer, Stack,
};
use serde_json::{json, Value};

/// `cfg` connecting as `user`, with replies on that user's own inbox.
fn as_user(nats: &NatsServer, cfg: &Config, user: &str) -> Config {
    let mut c = cfg.clone();
    c.nats.url = nats.url_as(user);
    c.nats.inbox_prefix = format!("_INBOX_{user}");
    c
}

#[tokio::test]
async fn every_role_works_with_only_its_permissions() {
    let nats = NatsServer::start_with_accounts();
    let cfg = test_config(&nats.url());
    let stack = Stack::start_parts_as(cfg.clone(), Parts::ALL, |part, n| {
        let user = match part {
            "ingress" | "router" => part,
            _ => "provider",
        };
        *n = as_user(&nats, &cfg, user).nats;
        if part == "router" {
            // A server list, one of them down: credentials come with the list.
            n.url = format!("nats://127.0.0.1:1, {}", n.url);
        }
    })
    .await;

    // HTTP, then the same prompt again from the cache (KV through the router's user).
    let body = json!({"prompt": "permissions: what is 2+2?", "provider": "local"});
    let (status, first) = stack.generate(&body).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["cached"], false);
    let (status, again) = stack.generate(&body).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["cached"], true, "{again}");

    // The UI's live panel: every service answers the ingress's $SRV.STATS.
    let (status, stats) = stack.get("/stats").await;
    assert_eq!(status, 200, "{stats}");
    let stats: Value = serde_json::from_str(&stats).unwrap();
    for pool in ["routers", "local_pool", "cloud_pool"] {
        assert_eq!(stats[pool]["workers"], 1, "{pool}: {stats}");
    }

    // Streaming: tokens from the provider to the ingress's inbox.
    let http = reqwest::Client::new();
    let text = http
        .post(stack.url("/v1/chat/completions"))
        .json(&json!({"model": "local", "stream": true, "max_tokens": 4,
            "messages": [{"role": "user", "content": "permissions: stream"}]}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("\"delta\""), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");

    // A batch through the HTTP API and a worker connected as `batch`.
    let batch_cfg = as_user(&nats, &cfg, "batch");
    let worker = optiroute_batch::run(
        client(&batch_cfg, "batch").await,
        &batch_cfg,
        stack.shutdown.clone(),
    )
    .await
    .unwrap();
    let (_, submitted) = stack
        .post_raw(
            "/v1/batches",
            "{\"prompt\": \"permissions: one\"}\n{\"prompt\": \"permissions: two\", \"provider\": \"local\"}\n".into(),
        )
        .await;
    let id = submitted["id"].as_str().unwrap().to_string();
    wait_until("the batch to finish", Duration::from_secs(20), || async {
        let (_, s) = stack.get(&format!("/v1/batches/{id}")).await;
        serde_json::from_str::<Value>(&s).unwrap()["status"] == "completed"
    })
    .await;
    let (_, results) = stack.get(&format!("/v1/batches/{id}/results")).await;
    assert_eq!(results.lines().count(), 2, "{results}");
    assert!(!results.contains("\"error\""), "{results}");
    drop(worker);

    // Another system, as `client`: direct requests to the routers work...
    let other = client(&as_user(&nats, &cfg, "client"), "other").await;
    let reply = request_json(
        &other,
        "optiroute.generate",
        &[],
        r#"{"prompt": "permissions: direct", "provider": "local"}"#,
    )
    .await;
    assert!(json_body(&reply)["text"].is_string(), "{:?}", reply);
    let b = BatchClient::open(client(&as_user(&nats, &cfg, "ingress"), "b").await, &cfg)
        .await
        .unwrap();
    assert!(b.status(&id).await.is_ok());

    // ...but not the provider pools behind the routers' backs: the server
    // refuses the publish, so nobody answers, while the same request from
    // the router's user is answered.
    let ask_pool = |c: async_nats::Client| async move {
        let r = request_json(
            &c,
            "optiroute.provider.local",
            &[],
            r#"{"prompt": "a pool"}"#,
        );
        tokio::time::timeout(Duration::from_secs(2), r).await
    };
    let router_user = client(&as_user(&nats, &cfg, "router"), "router-2").await;
    let answered = ask_pool(router_user)
        .await
        .expect("the router user is answered");
    assert!(json_body(&answered)["text"].is_string(), "{answered:?}");
    assert!(
        ask_pool(other).await.is_err(),
        "the client user reached a provider pool directly"
    );

    // Replies are private: another user cannot read the ingress's inbox,
    // while the ingress's own user can.
    let ingress_user = client(&as_user(&nats, &cfg, "ingress"), "spy-control").await;
    let mut allowed = ingress_user.subscribe("_INBOX_ingress.>").await.unwrap();
    let spy = client(&as_user(&nats, &cfg, "client"), "spy").await;
    let mut denied = spy.subscribe("_INBOX_ingress.>").await.unwrap();
    ingress_user.flush().await.unwrap();
    let _ = spy.flush().await;
    let (status, _) = stack
        .generate(&json!({"prompt": "permissions: private", "provider": "local"}))
        .await;
    assert_eq!(status, 200);
    let seen = tokio::time::timeout(Duration::from_secs(2), allowed.next()).await;
    assert!(
        matches!(seen, Ok(Some(_))),
        "the ingress user reads its inbox"
    );
    let leaked = tokio::time::timeout(Duration::from_millis(500), denied.next()).await;
    assert!(
        !matches!(leaked, Ok(Some(_))),
        "the client user read a reply meant for the ingress"
    );

    // And a connection without a user is turned away.
    let anonymous = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(2))
        .connect(nats.url())
        .await;
    assert!(anonymous.is_err(), "an anonymous connection was accepted");
}

/// The stack under `nats/accounts.conf`, each part as its role's user.
async fn stack_as_roles(nats: &NatsServer, cfg: &Config) -> Stack {
    Stack::start_parts_as(cfg.clone(), Parts::ALL, |part, n| {
        let user = match part {
            "ingress" | "router" => part,
            _ => "provider",
        };
        *n = as_user(nats, cfg, user).nats;
    })
    .await
}

/// The only key in the cache bucket, read as the router's user.
async fn only_cache_key(cache: &async_nats::jetstream::kv::Store) -> String {
    let keys: Vec<String> = cache
        .keys()
        .await
        .unwrap()
        .map(|k| k.unwrap())
        .collect()
        .await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    keys.into_iter().next().unwrap()
}

/// A `client` may publish requests, and so name any reply subject. Naming
/// the KV subject of a cached prompt (computable offline) must not make
/// the router write its answer there: the entry is unchanged and callers
/// keep getting the real answer.
#[tokio::test]
async fn a_client_cannot_write_into_the_cache_through_a_reply_subject() {
    let nats = NatsServer::start_with_accounts();
    let mut cfg = test_config(&nats.url());
    // Every lookup goes to the bucket, not to a router's memory.
    cfg.cache.local_ttl_ms = 0;
    let stack = stack_as_roles(&nats, &cfg).await;
    let body = json!({"prompt": "forgery: what is the capital of France?", "provider": "local"});
    let (status, real) = stack.generate(&body).await;
    assert_eq!(status, 200, "{real}");
    assert_eq!(real["cached"], false);

    let router_user = client(&as_user(&nats, &cfg, "router"), "inspector").await;
    let cache = async_nats::jetstream::new(router_user)
        .get_key_value("optiroute-cache")
        .await
        .unwrap();
    let key = only_cache_key(&cache).await;
    let before = cache.entry(&key).await.unwrap().unwrap();

    // The forged request, in MessagePack: the router's answer to it has
    // every field of a cached answer, so the old code served it as one.
    let attacker = client(&as_user(&nats, &cfg, "client"), "attacker").await;
    let mut forged = GenerateRequest::new("FORGED: the capital of France is Berlin");
    forged.provider = ProviderChoice::Local;
    attacker
        .publish_with_reply(
            "optiroute.generate",
            format!("$KV.optiroute-cache.{key}"),
            wire::encode(Format::MsgPack, &forged).unwrap(),
        )
        .await
        .unwrap();
    attacker.flush().await.unwrap();
    let router_admin = stack.router.as_ref().unwrap().admin_addr;
    wait_until(
        "the router to take the forged request",
        Duration::from_secs(10),
        || async {
            let m = scrape(router_admin).await;
            metric(
                &m,
                "optiroute_requests_total",
                &[("service", "optiroute-router")],
            ) >= Some(2.0)
        },
    )
    .await;

    // Callers still get the real answer, from the cache, and the entry is untouched.
    let (status, again) = stack.generate(&body).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["cached"], true, "{again}");
    assert_eq!(again["text"], real["text"], "a forged answer was served");
    let after = cache.entry(&key).await.unwrap().unwrap();
    assert_eq!(
        after.revision, before.revision,
        "the cache entry was rewritten"
    );
    assert_eq!(after.value, before.value);
    let m = scrape(router_admin).await;
    assert_eq!(
        metric(
            &m,
            "optiroute_requests_total",
            &[
                ("service", "optiroute-router"),
                ("outcome", "forbidden_reply")
            ]
        ),
        Some(1.0),
        "{m}"
    );
}

/// The internet-facing ingress has JetStream rights only for its own
/// batch stream and buckets, and none to delete: not the cache bucket,
/// not the batch stream, not even its own buckets.
#[tokio::test]
async fn the_ingress_cannot_delete_streams_or_buckets() {
    let nats = NatsServer::start_with_accounts();
    let cfg = test_config(&nats.url());
    // The router's user makes the cache bucket; the ingress's the batch stream and buckets.
    let router_js = async_nats::jetstream::new(client(&as_user(&nats, &cfg, "router"), "r").await);
    router_js
        .create_key_value(async_nats::jetstream::kv::Config {
            bucket: "optiroute-cache".into(),
            max_bytes: 1 << 20,
            ..Default::default()
        })
        .await
        .unwrap();
    let ingress = client(&as_user(&nats, &cfg, "ingress"), "ingress").await;
    BatchClient::open(ingress.clone(), &cfg).await.unwrap();

    let mut js = async_nats::jetstream::new(ingress);
    // A refused request gets no answer: do not wait the default 5 s for it.
    js.set_timeout(Duration::from_millis(500));
    assert!(js.delete_key_value("optiroute-cache").await.is_err());
    assert!(js.delete_stream("OPTIROUTE_BATCH").await.is_err());
    assert!(js.delete_key_value("optiroute-batches").await.is_err());
    assert!(js
        .delete_key_value("optiroute-batch-results")
        .await
        .is_err());
    assert!(js.delete_stream("KV_optiroute-cache").await.is_err());

    // All still there, seen by the roles that own them.
    assert!(router_js.get_key_value("optiroute-cache").await.is_ok());
    let batch_js = async_nats::jetstream::new(client(&as_user(&nats, &cfg, "batch"), "b").await);
    for stream in [
        "OPTIROUTE_BATCH",
        "KV_optiroute-batches",
        "KV_optiroute-batch-results",
    ] {
        assert!(
            batch_js.get_stream(stream).await.is_ok(),
            "{stream} was deleted"
        );
    }
}

/// Cancelling needs no purge: the ingress marks the batch cancelled and
/// the workers turn its queued jobs into `cancelled` results without
/// generating. The internet-facing ingress may not purge the job stream
/// (a purge's subject filter is in its body, so the right to purge one
/// batch's jobs was the right to purge every batch's).
#[tokio::test]
async fn the_ingress_cancels_a_batch_but_cannot_purge_the_queue() {
    let nats = NatsServer::start_with_accounts();
    let cfg = test_config(&nats.url());
    let stack = stack_as_roles(&nats, &cfg).await;
    let file: String = (1..=5)
        .map(|i| format!("{{\"prompt\": \"cancel me {i}\", \"provider\": \"local\"}}\n"))
        .collect();
    let (status, submitted) = stack.post_raw("/v1/batches?id=to-cancel", file).await;
    assert_eq!(status, 200, "{submitted}");
    let (status, cancelled) = stack
        .post_raw("/v1/batches/to-cancel/cancel", String::new())
        .await;
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");

    // The jobs stay queued until a worker ends each as `cancelled`, unrun.
    let batch_cfg = as_user(&nats, &cfg, "batch");
    let worker = optiroute_batch::run(
        client(&batch_cfg, "batch").await,
        &batch_cfg,
        stack.shutdown.clone(),
    )
    .await
    .unwrap();
    let b = BatchClient::open(client(&as_user(&nats, &cfg, "ingress"), "b").await, &cfg)
        .await
        .unwrap();
    wait_until(
        "the queued jobs to end",
        Duration::from_secs(20),
        || async { b.status("to-cancel").await.unwrap().pending == 0 },
    )
    .await;
    let s = b.status("to-cancel").await.unwrap();
    assert_eq!(
        (s.status.as_str(), s.cancelled, s.done),
        ("cancelled", 5, 0)
    );
    assert_eq!(
        worker.metrics.jobs.with_label_values(&["cancelled"]).get(),
        5,
        "each queued job was ended by the worker"
    );
    let local = &stack.local.as_ref().unwrap().metrics.provider_latency;
    assert_eq!(local.with_label_values(&["local"]).get_sample_count(), 0);

    // Another batch's queued job survives the ingress's attempt to purge.
    worker.abort();
    let (status, _) = stack
        .post_raw(
            "/v1/batches?id=bystander",
            "{\"prompt\": \"keep me\"}\n".into(),
        )
        .await;
    assert_eq!(status, 200);
    let mut js = async_nats::jetstream::new(client(&as_user(&nats, &cfg, "ingress"), "i").await);
    js.set_timeout(Duration::from_millis(500));
    let mut stream = js.get_stream("OPTIROUTE_BATCH").await.unwrap();
    assert!(
        stream.purge().await.is_err(),
        "the ingress purged the job stream"
    );
    assert_eq!(stream.info().await.unwrap().state.messages, 1);
}

/// With `auth.mode = "required"` under `nats/accounts.conf`: the admin API
/// writes keys as the ingress's user, the router follows them, keeps a
/// budget in the ledger and appends spend records as its own, and the
/// ingress reads usage back.
#[tokio::test]
async fn users_keys_and_budgets_work_with_only_the_roles_permissions() {
    let nats = NatsServer::start_with_accounts();
    let mut cfg = test_config(&nats.url());
    cfg.auth.mode = optiroute_common::config::AuthMode::Required;
    cfg.auth.admin_key = Some("permissions-admin-key-0123".into());
    let stack = stack_as_roles(&nats, &cfg).await;
    let http = reqwest::Client::new();
    let admin = |path: &str| {
        http.post(stack.url(path))
            .bearer_auth("permissions-admin-key-0123")
    };
    let r = admin("/admin/teams")
        .json(&json!({"name": "ops", "budget_usd": 10.0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201, "{}", r.text().await.unwrap());
    let r = admin("/admin/keys")
        .json(&json!({"name": "perm", "team": "ops", "budget_usd": 1.0, "rpm": 100}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let created: Value = r.json().await.unwrap();
    let key = created["key"].as_str().unwrap().to_string();
    // The key reaches the ingress's and the router's watches; a request is served and charged.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let answer: Value = loop {
        let r = http
            .post(stack.url("/generate"))
            .bearer_auth(&key)
            .json(&json!({"prompt": "permissions with a key", "provider": "local", "cache": "off"}))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        if status == 200 {
            break body;
        }
        assert!(std::time::Instant::now() < deadline, "{status}: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let cost = answer["cost"].as_f64().unwrap();
    assert!(cost > 0.0, "{answer}");
    // A batch with the key: its jobs carry the batch's token, which the
    // router checks against the batch's description as its own user.
    let bcfg = as_user(&nats, &cfg, "batch");
    let _worker = optiroute_batch::run(client(&bcfg, "batch").await, &bcfg, stack.shutdown.clone())
        .await
        .unwrap();
    let r = http
        .post(stack.url("/v1/batches?id=perm"))
        .bearer_auth(&key)
        .body(json!({"prompt": "a batch line", "provider": "local"}).to_string() + "\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
    wait_until("the batch done", Duration::from_secs(15), || {
        let (http, url, key) = (http.clone(), stack.url("/v1/batches/perm"), key.clone());
        async move {
            let r = http.get(url).bearer_auth(key).send().await.unwrap();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            v["done"] == 1
        }
    })
    .await;
    // Usage, read back from the spend records as the ingress's user.
    wait_until("usage recorded", Duration::from_secs(10), || {
        let (http, url, key) = (http.clone(), stack.url("/v1/usage"), key.clone());
        async move {
            let r = http.get(url).bearer_auth(key).send().await.unwrap();
            if r.status().as_u16() != 200 {
                return false;
            }
            let v: Value = r.json().await.unwrap();
            v["requests"] == 2
        }
    })
    .await;
}
