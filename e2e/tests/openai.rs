//! The OpenAI-compatible API: completions, streaming over NATS, error
//! shapes, models, disconnects, and the official `openai` Python client.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures::StreamExt;
use optiroute_testkit::{
    metric, scrape, test_config, wait_until, FakeUpstream, Mode, NatsServer, Stack,
};
use serde_json::{json, Value};

fn chat(model: &str, content: Value) -> Value {
    json!({"model": model, "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": content}], "max_tokens": 3, "user": "u-1", "unknown_field": true})
}

#[tokio::test]
async fn chat_completion_objects_and_headers() {
    let nats = NatsServer::start();
    let stack = Stack::start(test_config(&nats.url())).await;
    let http = reqwest::Client::new();
    let resp = http
        .post(stack.url("/v1/chat/completions"))
        .json(&chat("local", json!("Hello there")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    assert_eq!(h["x-optiroute-provider"], "local");
    assert_eq!(h["x-optiroute-routed-to"], "local");
    assert_eq!(h["x-optiroute-cache"], "miss");
    assert!(
        h["x-optiroute-cost-usd"]
            .to_str()
            .unwrap()
            .parse::<f64>()
            .unwrap()
            > 0.0
    );
    let id = h["x-request-id"].to_str().unwrap().to_string();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["id"], format!("chatcmpl-{id}"));
    assert!(v["created"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(v["model"], "simulated");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(text.split(' ').count(), 4, "[simulated] + 3 tokens: {text}");
    assert_eq!(v["usage"]["completion_tokens"], 3);

    // The array-of-parts form is the same conversation: a cache hit.
    let parts = json!([{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]);
    let resp = http
        .post(stack.url("/v1/chat/completions"))
        .json(&chat("local", parts))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-optiroute-cache"], "hit");
    assert_eq!(
        resp.headers()["x-optiroute-cost-usd"]
            .to_str()
            .unwrap()
            .parse::<f64>()
            .unwrap(),
        0.0
    );
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], text.as_str());

    let models: Value = http
        .get(stack.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    for want in [
        "auto",
        "local",
        "cloud",
        "simulated",
        stack.cfg.cloud.upstream.model.as_str(),
    ] {
        assert!(ids.contains(&want), "{want} missing from {ids:?}");
    }
}

#[tokio::test]
async fn errors_have_openai_shape() {
    let nats = NatsServer::start();
    let stack = Stack::start(test_config(&nats.url())).await;
    let http = reqwest::Client::new();
    let cases = [
        (json!({"messages": []}), "messages"),
        (
            json!({"messages": [{"role": "tool", "content": "x"}]}),
            "role",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            "content",
        ),
        (
            json!({"model": "gpt-17", "messages": [{"role": "user", "content": "hi"}]}),
            "model",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}),
            "max_tokens",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}),
            "temperature",
        ),
        (json!({"messages": "hi"}), "messages"),
    ];
    for (body, word) in cases {
        let resp = http
            .post(stack.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{body}");
        let v: Value = resp.json().await.unwrap();
        let e = &v["error"];
        assert!(
            e["message"].as_str().unwrap().contains(word),
            "{body} -> {v}"
        );
        assert_eq!(e["type"], "invalid_request_error");
        assert_eq!(e["code"], "bad_request");
        assert!(e.get("param").is_some());
    }
    let resp = http
        .post(stack.url("/v1/chat/completions"))
        .body("{oops")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
}

/// The whole SSE body of a streamed request.
async fn stream_body(
    stack: &Stack,
    body: Value,
    request_id: &str,
) -> (reqwest::StatusCode, String) {
    let resp = reqwest::Client::new()
        .post(stack.url("/v1/chat/completions"))
        .header("x-request-id", request_id)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    (status, resp.text().await.unwrap())
}

#[tokio::test]
async fn sse_framing_byte_for_byte() {
    let nats = NatsServer::start();
    let stack = Stack::start(test_config(&nats.url())).await;
    let mut body = chat("local", json!("stream me"));
    body["max_tokens"] = json!(2);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (status, text) = stream_body(&stack, body, "sse-1").await;
    assert_eq!(status, 200);
    let created = text
        .split("\"created\":")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .to_string();
    let words: Vec<&str> = optiroute_providers::simulated::SimulatedEngine::text("stream me", 2)
        .leak()
        .split(' ')
        .collect();
    let head = |delta: &str| {
        format!(
            r#"data: {{"choices":[{{"delta":{delta},"finish_reason":null,"index":0,"logprobs":null}}],"created":{created},"id":"chatcmpl-sse-1","model":"local","object":"chat.completion.chunk"}}"#
        )
    };
    let mut expected = String::new();
    expected.push_str(&head(&format!(
        r#"{{"content":"{}","role":"assistant"}}"#,
        words[0]
    )));
    expected.push_str("\n\n");
    for w in &words[1..] {
        expected.push_str(&head(&format!(r#"{{"content":" {w}"}}"#)));
        expected.push_str("\n\n");
    }
    expected.push_str(&format!(r#"data: {{"choices":[{{"delta":{{}},"finish_reason":"length","index":0,"logprobs":null}}],"created":{created},"id":"chatcmpl-sse-1","model":"local","object":"chat.completion.chunk","optiroute":OPTIROUTE}}"#));
    expected.push_str("\n\n");
    let prompt_tokens = optiroute_common::cost::estimate_tokens("be briefstream me");
    expected.push_str(&format!(
        r#"data: {{"choices":[],"created":{created},"id":"chatcmpl-sse-1","model":"local","object":"chat.completion.chunk","usage":{{"completion_tokens":2,"prompt_tokens":{prompt_tokens},"total_tokens":{}}}}}"#,
        prompt_tokens + 2
    ));
    expected.push_str("\n\ndata: [DONE]\n\n");
    // The finish chunk says how the request was served; its figures vary, so
    // check them apart and compare the rest byte for byte.
    let finish: Value = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|v| v.get("optiroute").is_some())
        .unwrap();
    let served = &finish["optiroute"];
    assert_eq!(served["provider"], "local");
    assert_eq!(served["routed_to"], "local");
    assert_eq!(served["cached"], false);
    assert!(served["cost"].as_f64().unwrap() > 0.0);
    assert!(served["route_reason"]
        .as_str()
        .unwrap()
        .contains("provider local requested"));
    // Cut the object out of the raw bytes (re-serialising the parsed value
    // could print a float differently); it holds no nested braces.
    let start = text.find("\"optiroute\":{").unwrap() + "\"optiroute\":".len();
    let end = start + text[start..].find('}').unwrap() + 1;
    let text = format!("{}OPTIROUTE{}", &text[..start], &text[end..]);
    assert_eq!(text, expected);
    let ingress = scrape(stack.ingress_addr()).await;
    assert_eq!(
        metric(&ingress, "llm_time_to_first_token_seconds_count", &[]),
        Some(1.0)
    );

    // A cache hit streams the cached text.
    let mut again = chat("local", json!("stream me"));
    again["max_tokens"] = json!(2);
    again["stream"] = json!(true);
    let (_, text) = stream_body(&stack, again, "sse-2").await;
    let content: String = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(content, words.join(" "));
    assert!(text.ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn cloud_streams_tokens_and_breaks_cleanly() {
    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::Ok).await;
    let mut cfg = test_config(&nats.url());
    cfg.cloud.upstream.base_url = up.base_url();
    let stack = Stack::start(cfg).await;
    let mut body = chat("cloud", json!("tell me"));
    body["stream"] = json!(true);
    body["max_tokens"] = json!(50);
    let (status, text) = stream_body(&stack, body.clone(), "c-1").await;
    assert_eq!(status, 200);
    let chunks = text.matches("chat.completion.chunk").count();
    assert!(
        chunks >= 6,
        "one chunk per upstream word plus the finish: {text}"
    );
    assert!(text.contains("\"finish_reason\":\"stop\""));
    assert!(text.ends_with("data: [DONE]\n\n"));

    // A failure after the first token ends the stream with an error event.
    up.set_mode(Mode::StreamBreaksAfter(2));
    body["messages"][1]["content"] = json!("tell me again");
    let (status, text) = stream_body(&stack, body.clone(), "c-2").await;
    assert_eq!(status, 200);
    assert!(text.contains("\"code\":\"stream_interrupted\""), "{text}");
    assert!(!text.contains("[DONE]"));

    // A failure before the first token falls back like a plain request.
    up.set_mode(Mode::Status(500));
    body["messages"][1]["content"] = json!("tell me a third time");
    let (status, text) = stream_body(&stack, body, "c-3").await;
    assert_eq!(status, 200);
    assert!(text.contains("[simulated]"), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn a_client_that_disconnects_stops_the_provider() {
    let nats = NatsServer::start();
    let mut cfg = test_config(&nats.url());
    cfg.local.simulated.base_ms = 0;
    cfg.local.simulated.per_token_ms = 300;
    cfg.local.simulated.max_ms = 60_000;
    cfg.ingress.request_timeout_ms = 30_000;
    cfg.router.provider_timeout_ms = 30_000;
    let stack = Stack::start(cfg).await;
    let mut body = chat("local", json!("a long story please"));
    body["stream"] = json!(true);
    body["max_tokens"] = json!(16);
    let resp = reqwest::Client::new()
        .post(stack.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).starts_with("data: "));
    drop(stream);
    let local = stack.local.as_ref().unwrap().admin_addr;
    wait_until(
        "the local worker to stop generating",
        Duration::from_secs(3),
        || async move {
            metric(
                &scrape(local).await,
                "optiroute_requests_total",
                &[("outcome", "cancelled")],
            ) == Some(1.0)
        },
    )
    .await;
}

/// The official `openai` Python package against OptiRoute.
#[tokio::test]
async fn the_official_openai_python_client_works() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let status = std::process::Command::new("bash")
        .arg(format!("{root}/scripts/py-deps.sh"))
        .status()
        .unwrap();
    assert!(status.success(), "scripts/py-deps.sh failed");
    let nats = NatsServer::start();
    let stack = Stack::start(test_config(&nats.url())).await;
    let base = stack.url("/v1");
    let out = tokio::process::Command::new(format!("{root}/.tools/venv/bin/python"))
        .arg(format!("{root}/e2e/py/openai_client.py"))
        .arg(&base)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("completion ok")
            && stdout.contains("stream ok")
            && stdout.contains("error ok"),
        "{stdout}"
    );
}

#[tokio::test]
async fn a_client_that_leaves_before_the_first_token_stops_the_provider_too() {
    let nats = NatsServer::start();
    let mut cfg = test_config(&nats.url());
    cfg.local.simulated.base_ms = 3_000;
    cfg.local.simulated.max_ms = 60_000;
    cfg.ingress.request_timeout_ms = 30_000;
    cfg.router.provider_timeout_ms = 30_000;
    let stack = Stack::start(cfg).await;
    let mut body = chat("local", json!("think first"));
    body["stream"] = json!(true);
    let gave_up = reqwest::Client::new()
        .post(stack.url("/v1/chat/completions"))
        .timeout(Duration::from_millis(300))
        .json(&body)
        .send()
        .await;
    assert!(gave_up.is_err(), "the client times out before any token");
    let local = stack.local.as_ref().unwrap().admin_addr;
    wait_until(
        "the local worker to stop generating",
        Duration::from_secs(2),
        || async move {
            metric(
                &scrape(local).await,
                "optiroute_requests_total",
                &[("outcome", "cancelled")],
            ) == Some(1.0)
        },
    )
    .await;
}
