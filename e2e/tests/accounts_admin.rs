//! The admin API (`/admin/keys`, `/admin/teams`, `/admin/spend`) and
//! `GET /v1/usage` against a real nats-server: keys stored hashed, PATCH
//! semantics, the admin key's guard, precise 400s and 404s, and spend
//! totals that equal the spend records published.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use optiroute_accounts::model::{rfc3339, Period};
use optiroute_accounts::spend::SpendRecord;
use optiroute_accounts::store::{hash_secret, now_ms};
use optiroute_accounts::to_nanos;
use optiroute_common::config::{AuthMode, Config};
use optiroute_common::protocol::JetStreamNames;
use optiroute_common::wire::Pool;
use optiroute_testkit::{test_config, wait_until, NatsServer};
use reqwest::Method;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

mod spend_support;
use spend_support::{figures, publish, record, sums};

const ADMIN: &str = "admin-key-0123456789abcdef";

struct Ingress {
    base: String,
    http: reqwest::Client,
    cfg: Config,
    _shutdown: tokio_util::sync::DropGuard,
}

async fn ingress(cfg: Config) -> Ingress {
    let shutdown = CancellationToken::new();
    let client = optiroute_common::nats::connect(&cfg.nats, "ingress")
        .await
        .unwrap();
    let running = optiroute_ingress::run(client, &cfg, shutdown.clone())
        .await
        .unwrap();
    Ingress {
        base: format!("http://{}", running.addr),
        http: reqwest::Client::new(),
        cfg,
        _shutdown: shutdown.drop_guard(),
    }
}

impl Ingress {
    /// `method path` with `Authorization: Bearer key` and a JSON body: the
    /// status and the JSON answer.
    async fn call(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.raw(method, path, key, body.map(|b| b.to_string()))
            .await
    }

    async fn raw(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<String>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call(method, path, Some(ADMIN), body).await
    }
}

fn admin_config(nats: &NatsServer) -> Config {
    let mut cfg = test_config(&nats.url());
    cfg.auth.admin_key = Some(ADMIN.into());
    cfg
}

/// Asserts a 400 whose error names `field`.
fn assert_bad(status: u16, body: &Value, field: &str) {
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "bad_request", "{body}");
    assert_eq!(body["error"]["param"], field, "{body}");
}

#[tokio::test]
async fn admin_keys_and_teams_end_to_end() {
    let nats = NatsServer::start();
    let api = ingress(admin_config(&nats)).await;

    // The guard: no key, a wrong key (the same length or not) → 401.
    for key in [None, Some("wrong"), Some("admin-key-0123456789abcdeX")] {
        let (s, b) = api.call(Method::GET, "/admin/keys", key, None).await;
        assert_eq!(s, 401, "{key:?}: {b}");
        assert_eq!(b["error"]["code"], "invalid_api_key");
        let (s, _) = api
            .call(
                Method::POST,
                "/admin/teams",
                key,
                Some(json!({"name": "x"})),
            )
            .await;
        assert_eq!(s, 401);
    }

    let (s, team) = api
        .admin(
            Method::POST,
            "/admin/teams",
            Some(json!({"name": "red", "budget_usd": 10.0, "budget_period": "day"})),
        )
        .await;
    assert_eq!(s, 201, "{team}");
    assert_eq!(team["name"], "red");
    assert_eq!(team["budget_period"], "day");
    let (s, b) = api
        .admin(Method::POST, "/admin/teams", Some(json!({"name": "red"})))
        .await;
    assert_bad(s, &b, "name");

    let (s, created) = api
        .admin(
            Method::POST,
            "/admin/keys",
            Some(json!({"name": "alice", "team": "red", "budget_usd": 1.5, "rpm": 60, "providers": ["local"]})),
        )
        .await;
    assert_eq!(s, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    let secret = created["key"].as_str().unwrap().to_string();
    assert!(
        secret.starts_with("sk-or-") && secret.len() > 40,
        "{secret}"
    );
    assert_eq!(created["name"], "alice");
    assert_eq!(created["team"], "red");
    assert_eq!(created["rpm"], 60);
    assert_eq!(created["budget_period"], "month");
    assert!(created.get("hash").is_none(), "the hash is never returned");

    // The KV entry holds the hash, never the secret.
    let js = async_nats::jetstream::new(optiroute_testkit::stack::client(&api.cfg, "kv").await);
    let names = JetStreamNames::for_prefix(&api.cfg.nats.prefix);
    let kv = js.get_key_value(&names.accounts_bucket).await.unwrap();
    let stored = kv.get(format!("key.{id}")).await.unwrap().unwrap();
    let stored_text = String::from_utf8(stored.to_vec()).unwrap();
    assert!(!stored_text.contains(&secret), "{stored_text}");
    assert!(!stored_text.contains(&secret["sk-or-".len()..]));
    let stored: Value = serde_json::from_slice(&stored).unwrap();
    assert_eq!(stored["hash"], hash_secret(&secret));

    // List and show: the record, without the secret or its hash.
    let (s, list) = api.admin(Method::GET, "/admin/keys", None).await;
    assert_eq!(s, 200);
    let keys = list["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["id"], id.as_str());
    let (s, shown) = api
        .admin(Method::GET, &format!("/admin/keys/{id}"), None)
        .await;
    assert_eq!(s, 200);
    for k in [&keys[0], &shown] {
        assert!(k.get("key").is_none() && k.get("hash").is_none(), "{k}");
        assert!(!k.to_string().contains(&secret));
    }
    assert_eq!(shown["budget_usd"], 1.5);

    // PATCH: what is given changes, `null` clears a limit, the rest stays.
    let (s, patched) = api
        .admin(
            Method::PATCH,
            &format!("/admin/keys/{id}"),
            Some(json!({"rpm": null, "budget_usd": 2.25, "tpm": 1000})),
        )
        .await;
    assert_eq!(s, 200, "{patched}");
    assert!(patched.get("rpm").is_none(), "{patched}");
    assert_eq!(patched["budget_usd"], 2.25);
    assert_eq!(patched["tpm"], 1000);
    assert_eq!(patched["providers"], json!(["local"]));
    let (_, shown) = api
        .admin(Method::GET, &format!("/admin/keys/{id}"), None)
        .await;
    assert_eq!(shown, patched);

    // Validation: 400s that name the field.
    let key_path = format!("/admin/keys/{id}");
    let cases: Vec<(Method, &str, Value, &str)> = vec![
        (
            Method::POST,
            "/admin/keys",
            json!({"name": "x", "bogus": 1}),
            "bogus",
        ),
        (Method::POST, "/admin/keys", json!({"team": "red"}), "name"),
        (
            Method::POST,
            "/admin/keys",
            json!({"name": "x", "budget_usd": -1}),
            "budget_usd",
        ),
        (
            Method::POST,
            "/admin/keys",
            json!({"name": "x", "budget_period": "week"}),
            "budget_period",
        ),
        (
            Method::POST,
            "/admin/keys",
            json!({"name": "x", "rpm": "fast"}),
            "rpm",
        ),
        (
            Method::POST,
            "/admin/keys",
            json!({"name": "x", "providers": ["mars"]}),
            "providers[0]",
        ),
        (
            Method::POST,
            "/admin/keys",
            json!({"name": "x", "providers": []}),
            "providers",
        ),
        (
            Method::POST,
            "/admin/keys",
            json!({"name": "x", "team": "no such"}),
            "team",
        ),
        (Method::PATCH, key_path.as_str(), json!({"rpm": 0}), "rpm"),
        (
            Method::PATCH,
            key_path.as_str(),
            json!({"team": "blue"}),
            "team",
        ),
        (Method::POST, "/admin/teams", json!({"name": "a b"}), "name"),
        (
            Method::POST,
            "/admin/teams",
            json!({"name": "t", "budget_usd": 1e12}),
            "budget_usd",
        ),
        (
            Method::PATCH,
            "/admin/teams/red",
            json!({"budget_usd": "lots"}),
            "budget_usd",
        ),
    ];
    for (method, path, body, field) in cases {
        let (s, b) = api.admin(method.clone(), path, Some(body.clone())).await;
        assert_bad(s, &b, field);
    }
    let (s, b) = api
        .raw(
            Method::POST,
            "/admin/keys",
            Some(ADMIN),
            Some("{not json".into()),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    let (s, _) = api
        .raw(Method::POST, "/admin/keys", Some(ADMIN), None)
        .await;
    assert_eq!(s, 400);
    // A team that does not exist: 404, naming the field.
    let (s, b) = api
        .admin(
            Method::POST,
            "/admin/keys",
            Some(json!({"name": "x", "team": "green"})),
        )
        .await;
    assert_eq!(s, 404, "{b}");
    assert_eq!(b["error"]["param"], "team");
    // curl -d sends no JSON content type: the body is JSON all the same.
    let resp = api
        .http
        .post(format!("{}/admin/teams", api.base))
        .bearer_auth(ADMIN)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(r#"{"name": "plain"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let (s, _) = api.admin(Method::DELETE, "/admin/teams/plain", None).await;
    assert_eq!(s, 200);
    let (s, b) = api.admin(Method::GET, "/admin/keys/bad.id", None).await;
    assert_bad(s, &b, "id");

    // Unknown ids and names: 404.
    for (method, path) in [
        (Method::GET, "/admin/keys/key_nope"),
        (Method::PATCH, "/admin/keys/key_nope"),
        (Method::DELETE, "/admin/keys/key_nope"),
        (Method::GET, "/admin/teams/nope"),
        (Method::PATCH, "/admin/teams/nope"),
        (Method::DELETE, "/admin/teams/nope"),
    ] {
        let (s, b) = api.admin(method.clone(), path, Some(json!({}))).await;
        assert_eq!(s, 404, "{method} {path}: {b}");
        assert_eq!(b["error"]["code"], "not_found");
    }

    // Teams: list, PATCH (null clears the budget), no delete while a live key is in it.
    let (s, b) = api
        .admin(Method::POST, "/admin/teams", Some(json!({"name": "blue"})))
        .await;
    assert_eq!(s, 201, "{b}");
    let (_, teams) = api.admin(Method::GET, "/admin/teams", None).await;
    let names: Vec<&str> = teams["teams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["blue", "red"]);
    let (s, red) = api
        .admin(
            Method::PATCH,
            "/admin/teams/red",
            Some(json!({"budget_usd": null, "budget_period": "month"})),
        )
        .await;
    assert_eq!(s, 200, "{red}");
    assert!(red.get("budget_usd").is_none(), "{red}");
    assert_eq!(red["budget_period"], "month");
    let (s, b) = api.admin(Method::DELETE, "/admin/teams/red", None).await;
    assert_eq!(s, 400, "a team with a live key stays: {b}");

    // Revoke: the record stays, marked revoked; then the team can go.
    let (s, revoked) = api.admin(Method::DELETE, &key_path, None).await;
    assert_eq!(s, 200, "{revoked}");
    assert_eq!(revoked["revoked"], true);
    let (s, shown) = api.admin(Method::GET, &key_path, None).await;
    assert_eq!(s, 200);
    assert_eq!(shown["revoked"], true);
    assert_eq!(shown["name"], "alice");
    let (s, _) = api.admin(Method::DELETE, "/admin/teams/red", None).await;
    assert_eq!(s, 200);
    let (s, _) = api.admin(Method::GET, "/admin/teams/red", None).await;
    assert_eq!(s, 404);
    // A deleted name can be used again.
    let (s, b) = api
        .admin(Method::POST, "/admin/teams", Some(json!({"name": "red"})))
        .await;
    assert_eq!(s, 201, "{b}");

    // With auth off there is no key to count usage for.
    let (s, b) = api
        .call(Method::GET, "/v1/usage", Some(&secret), None)
        .await;
    assert_eq!(s, 400, "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("auth.mode"),
        "{b}"
    );
}

#[tokio::test]
async fn admin_api_without_an_admin_key_says_how_to_set_one() {
    let nats = NatsServer::start();
    let mut cfg = test_config(&nats.url());
    cfg.auth.admin_key = None;
    let api = ingress(cfg).await;
    for key in [None, Some(ADMIN)] {
        let (s, b) = api.call(Method::GET, "/admin/keys", key, None).await;
        assert_eq!(s, 401, "{b}");
        let message = b["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("OPTIROUTE_ADMIN_KEY") && message.contains("auth.admin_key"),
            "{message}"
        );
    }
}

/// PATCHes of one key at once, each changing another field: every one
/// lands (compare-and-set, retried), none is lost to another's write.
#[tokio::test]
async fn concurrent_patches_all_land() {
    let nats = NatsServer::start();
    let api = ingress(admin_config(&nats)).await;
    let (s, k) = api
        .admin(Method::POST, "/admin/keys", Some(json!({"name": "shared"})))
        .await;
    assert_eq!(s, 201);
    let path = format!("/admin/keys/{}", k["id"].as_str().unwrap());
    let changes = [
        json!({"rpm": 11}),
        json!({"tpm": 22}),
        json!({"budget_usd": 3.5}),
        json!({"end_user_budget_usd": 0.25}),
        json!({"models": ["m1"]}),
        json!({"budget_period": "day"}),
    ];
    let answers = futures::future::join_all(
        changes
            .iter()
            .map(|c| api.admin(Method::PATCH, &path, Some(c.clone()))),
    )
    .await;
    for (s, b) in &answers {
        assert_eq!(*s, 200, "{b}");
    }
    let (_, k) = api.admin(Method::GET, &path, None).await;
    for c in changes {
        for (field, v) in c.as_object().unwrap() {
            assert_eq!(&k[field], v, "{field} lost: {k}");
        }
    }
}

#[tokio::test]
async fn admin_api_without_jetstream_answers_503() {
    let nats = NatsServer::start_without_jetstream();
    let api = ingress(admin_config(&nats)).await;
    let started = std::time::Instant::now();
    for (method, path, body) in [
        (Method::POST, "/admin/keys", Some(json!({"name": "x"}))),
        (Method::GET, "/admin/teams", None),
        (Method::GET, "/admin/spend", None),
    ] {
        let (s, b) = api.admin(method, path, body).await;
        assert_eq!(s, 503, "{path}: {b}");
        assert_eq!(b["error"]["code"], "nats_unavailable", "{b}");
    }
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[tokio::test]
async fn spend_and_usage_equal_the_records() {
    let nats = NatsServer::start();
    let mut cfg = admin_config(&nats);
    cfg.auth.mode = AuthMode::Required;
    let api = ingress(cfg).await;
    for (name, period) in [("red", "month"), ("blue", "day")] {
        let (s, b) = api
            .admin(
                Method::POST,
                "/admin/teams",
                Some(json!({"name": name, "budget_usd": 5.0, "budget_period": period})),
            )
            .await;
        assert_eq!(s, 201, "{b}");
    }
    let (_, a) = api
        .admin(
            Method::POST,
            "/admin/keys",
            Some(json!({"name": "a", "team": "red", "budget_usd": 1.0})),
        )
        .await;
    let (_, b) = api
        .admin(
            Method::POST,
            "/admin/keys",
            Some(json!({"name": "b", "team": "blue", "budget_period": "day"})),
        )
        .await;
    let (a_id, a_key) = (a["id"].as_str().unwrap(), a["key"].as_str().unwrap());
    let (b_id, b_key) = (b["id"].as_str().unwrap(), b["key"].as_str().unwrap());

    let now = now_ms();
    // Before this month (and day) began: stored now, but not this period's spend.
    let old = Period::Month.window(now).start_ms - 3_600_000;
    let records = vec![
        record(
            a_id,
            Some("red"),
            Some("u1"),
            Pool::Cloud,
            0.000_123_456,
            now,
            1,
        ),
        record(
            a_id,
            Some("red"),
            Some("u2"),
            Pool::Cloud,
            0.010_000_001,
            now,
            2,
        ),
        record(
            a_id,
            Some("red"),
            Some("u1"),
            Pool::Local,
            0.000_002,
            now,
            3,
        ),
        record(a_id, Some("red"), None, Pool::Cloud, 0.0, now, 4),
        record(a_id, Some("red"), Some("u1"), Pool::Cloud, 0.5, old, 5),
        record(
            b_id,
            Some("blue"),
            Some("u1"),
            Pool::Local,
            0.000_001_5,
            now,
            1,
        ),
        record(b_id, Some("blue"), None, Pool::Cloud, 0.020_5, now, 2),
    ];
    publish(&api.cfg, &records).await;
    let current: Vec<&SpendRecord> = records.iter().filter(|r| r.ts_ms == now).collect();
    let of = |f: &dyn Fn(&SpendRecord) -> bool| sums(current.iter().copied().filter(|r| f(r)));

    // By team, this month.
    let (s, by_team) = api
        .admin(Method::GET, "/admin/spend?group_by=team&period=month", None)
        .await;
    assert_eq!(s, 200, "{by_team}");
    let w = Period::Month.window(now);
    assert_eq!(by_team["period"], "month");
    assert_eq!(by_team["start"], rfc3339(w.start_ms));
    assert_eq!(by_team["resets_at"], rfc3339(w.end_ms.unwrap()));
    assert_eq!(figures(&by_team["total"]), figures(&of(&|_| true)));
    let groups = by_team["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 2, "{by_team}");
    for g in groups {
        let team = g["team"].as_str().unwrap().to_string();
        assert_eq!(
            figures(g),
            figures(&of(&|r| r.team.as_deref() == Some(&team))),
            "{team}"
        );
    }
    // Biggest first: blue spent $0.0205015, red $0.010125457.
    assert_eq!(groups[0]["team"], "blue");

    // By key, with names; by user, per key.
    let (_, by_key) = api
        .admin(Method::GET, "/admin/spend?group_by=key", None)
        .await;
    let groups = by_key["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 2);
    for g in groups {
        let id = g["key_id"].as_str().unwrap().to_string();
        assert_eq!(g["name"], if id == a_id { "a" } else { "b" });
        assert_eq!(figures(g), figures(&of(&|r| r.key_id == id)));
    }
    let (_, by_user) = api
        .admin(Method::GET, "/admin/spend?group_by=user&period=day", None)
        .await;
    let groups = by_user["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 5, "a/u1, a/u2, a/-, b/u1, b/-: {by_user}");
    for g in groups {
        let (id, user) = (
            g["key_id"].as_str().unwrap().to_string(),
            g["user"].as_str().map(str::to_string),
        );
        assert_eq!(
            figures(g),
            figures(&of(&|r| r.key_id == id && r.user == user))
        );
    }
    // Everything ever: the old record too.
    let (_, total) = api
        .admin(Method::GET, "/admin/spend?period=total", None)
        .await;
    assert_eq!(figures(&total["total"]), figures(&sums(&records)));
    assert_eq!(total["resets_at"], Value::Null);

    for (q, field) in [
        ("group_by=pool", "group_by"),
        ("period=week", "period"),
        ("since=1", "since"),
    ] {
        let (s, b) = api
            .admin(Method::GET, &format!("/admin/spend?{q}"), None)
            .await;
        assert_bad(s, &b, field);
    }
    let (s, _) = api
        .call(Method::GET, "/admin/spend", Some(a_key), None)
        .await;
    assert_eq!(s, 401, "a user key is not the admin key");

    // /v1/usage: the key's own window, budget and what remains; its team's.
    wait_until(
        "the keys loaded by the ingress",
        Duration::from_secs(10),
        || {
            let call = api.call(Method::GET, "/v1/usage", Some(a_key), None);
            async { call.await.0 == 200 }
        },
    )
    .await;
    let (_, usage) = api.call(Method::GET, "/v1/usage", Some(a_key), None).await;
    let spent_a = of(&|r| r.key_id == a_id);
    assert_eq!(figures(&usage), figures(&spent_a), "{usage}");
    assert_eq!(usage["key"]["id"], a_id);
    assert_eq!(usage["period"], "month");
    assert_eq!(usage["resets_at"], rfc3339(w.end_ms.unwrap()));
    assert_eq!(usage["budget_usd"], 1.0);
    let remaining = (1_000_000_000 - spent_a["cost_nanos"].as_u64().unwrap()) as f64 / 1e9;
    assert_eq!(usage["remaining_usd"], remaining);
    assert_eq!(usage["team"]["name"], "red");
    assert_eq!(usage["team"]["budget_usd"], 5.0);
    assert_eq!(
        figures(&usage["team"]),
        figures(&of(&|r| r.team.as_deref() == Some("red")))
    );

    let (s, usage_b) = api.call(Method::GET, "/v1/usage", Some(b_key), None).await;
    assert_eq!(s, 200);
    let day = Period::Day.window(now);
    assert_eq!(usage_b["period"], "day");
    assert_eq!(usage_b["start"], rfc3339(day.start_ms));
    assert_eq!(usage_b["budget_usd"], Value::Null);
    assert_eq!(usage_b["remaining_usd"], Value::Null);
    assert_eq!(figures(&usage_b), figures(&of(&|r| r.key_id == b_id)));
    assert_eq!(usage_b["team"]["period"], "day");

    // No key, a wrong one, a revoked one: 401.
    for key in [None, Some("sk-or-nope")] {
        let (s, b) = api.call(Method::GET, "/v1/usage", key, None).await;
        assert_eq!(s, 401, "{b}");
        assert_eq!(b["error"]["code"], "invalid_api_key");
    }
    let (s, _) = api
        .admin(Method::DELETE, &format!("/admin/keys/{b_id}"), None)
        .await;
    assert_eq!(s, 200);
    wait_until("the revoked key refused", Duration::from_secs(5), || {
        let call = api.call(Method::GET, "/v1/usage", Some(b_key), None);
        async { call.await.0 == 401 }
    })
    .await;
}

/// Through the whole pipeline (routers writing the records): `/v1/usage`
/// and `/admin/spend` equal the sum of the costs the replies carried.
#[tokio::test]
async fn usage_and_admin_spend_equal_the_reply_costs() {
    use optiroute_testkit::{FakeUpstream, Mode, Stack};
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::Usage(
        json!({"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}),
    ))
    .await;
    let mut cfg = admin_config(&nats);
    cfg.auth.mode = AuthMode::Required;
    cfg.cloud.upstream.base_url = up.base_url();
    let stack = Stack::start(cfg.clone()).await;
    let api = Ingress {
        base: stack.url(""),
        http: reqwest::Client::new(),
        cfg,
        _shutdown: CancellationToken::new().drop_guard(),
    };
    let (s, _) = api
        .admin(Method::POST, "/admin/teams", Some(json!({"name": "ops"})))
        .await;
    assert_eq!(s, 201);
    let (_, k) = api
        .admin(
            Method::POST,
            "/admin/keys",
            Some(json!({"name": "svc", "team": "ops", "budget_usd": 1.0})),
        )
        .await;
    let secret = k["key"].as_str().unwrap();
    wait_until(
        "the key known to the ingress",
        Duration::from_secs(10),
        || {
            let call = api.call(Method::GET, "/v1/usage", Some(secret), None);
            async { call.await.0 == 200 }
        },
    )
    .await;
    let mut costs = Vec::new();
    for (i, provider) in ["cloud", "cloud", "local", "cloud"].iter().enumerate() {
        let body = json!({"prompt": format!("question {i}"), "provider": provider, "max_tokens": 5, "user": "u7"});
        let (s, b) = api
            .call(Method::POST, "/generate", Some(secret), Some(body))
            .await;
        assert_eq!(s, 200, "{b}");
        costs.push(b["cost"].as_f64().unwrap());
    }
    let want: u64 = costs.iter().map(|c| to_nanos(*c)).sum();
    assert!(want > 0);
    wait_until("4 spend records", Duration::from_secs(10), || {
        let call = api.call(Method::GET, "/v1/usage", Some(secret), None);
        async { call.await.1["requests"] == 4 }
    })
    .await;
    let (_, usage) = api.call(Method::GET, "/v1/usage", Some(secret), None).await;
    assert_eq!(usage["cost_nanos"], want, "{usage}");
    assert_eq!(usage["by_pool"]["cloud"]["requests"], 3);
    assert_eq!(usage["by_pool"]["local"]["requests"], 1);
    assert_eq!(usage["by_pool"]["cloud"]["prompt_tokens"], 30);
    assert_eq!(usage["team"]["cost_nanos"], want);
    assert_eq!(usage["remaining_usd"], (1_000_000_000 - want) as f64 / 1e9);
    let (_, by_user) = api
        .admin(Method::GET, "/admin/spend?group_by=user", None)
        .await;
    assert_eq!(by_user["groups"][0]["user"], "u7", "{by_user}");
    assert_eq!(by_user["groups"][0]["cost_nanos"], want);
    assert_eq!(by_user["total"]["cost_nanos"], want);
}
