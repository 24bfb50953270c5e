//! Tests of `optiroute loadtest`: options, bodies, answers, and runs
//! against a real local server.

use super::*;

fn opts(s: &str) -> Result<Options, String> {
    let mut a = Args::new(s.split_whitespace().map(String::from));
    let o = Options::parse(&mut a)?;
    a.finish()?;
    Ok(o)
}

#[test]
fn defaults_are_the_original_scenario() {
    let o = opts("").unwrap();
    assert_eq!(o.mode, Mode::Original);
    assert_eq!(o.users, 50);
    assert_eq!(o.spawn_rate, 5.0);
    assert_eq!(o.duration, Duration::from_secs(60));
    assert_eq!((o.think_min, o.think_max), (1.0, 4.0));
    assert_eq!(o.url, "http://127.0.0.1:8000/generate");
    let c = opts("--mode closed --concurrency 32 --url http://127.0.0.1:9/ --cache-off").unwrap();
    assert_eq!(c.users, 32);
    assert_eq!((c.think_min, c.think_max, c.spawn_rate), (0.0, 0.0, 0.0));
    assert_eq!(c.url, "http://127.0.0.1:9/generate");
    assert!(c.cache_off);
    let o = opts("--api openai --url http://127.0.0.1:9").unwrap();
    assert_eq!(o.url, "http://127.0.0.1:9/v1/chat/completions");
    assert!(opts("--mode sideways").is_err());
    assert!(opts("--think-min 3 --think-max 2").is_err());
    assert!(opts("--duration 0").is_err());
    assert!(opts("--url ftp://x").is_err());
}

/// A server that answers every third request with a 503 and says
/// every other answer was cached; counts what reached it.
async fn counting_server() -> (String, Arc<AtomicU64>) {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    let seen = Arc::new(AtomicU64::new(0));
    let counter = seen.clone();
    let app = axum::Router::new().route(
        "/generate",
        axum::routing::post(move |body: String| {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                assert!(v["prompt"].is_string(), "body was {body}");
                if n % 3 == 2 {
                    return (
                        StatusCode::SERVICE_UNAVAILABLE,
                        r#"{"error":{"code":"no_responders"}}"#,
                    )
                        .into_response();
                }
                let cached = n & 1 == 0;
                axum::Json(
                    serde_json::json!({"text": "x", "cached": cached, "cost": 0.0,
                    "routed_to": "local", "provider": "local"}),
                )
                .into_response()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drives_a_server_and_counts_what_it_answers() {
    let (url, seen) = counting_server().await;
    let o = opts(&format!(
        "--url {url} --mode closed --concurrency 4 --duration 0.5 --workload unique --quiet"
    ))
    .unwrap();
    let r = run(o).await.unwrap();
    let served = seen.load(Ordering::SeqCst);
    assert!(r.requests > 10, "only {} requests", r.requests);
    assert_eq!(r.requests, served, "every request reached the server once");
    let refused = (0..served).filter(|n| n % 3 == 2).count() as u64;
    let hits = (0..served).filter(|n| n % 3 != 2 && n & 1 == 0).count() as u64;
    assert_eq!(r.failures, refused);
    assert_eq!(
        r.failures_by_kind.get("HTTP 503 no_responders"),
        Some(&refused)
    );
    assert_eq!(r.cache_hits, hits);
    assert_eq!(r.answers_with_cache_flag, served - refused);
}

#[tokio::test]
async fn a_closed_port_is_a_connect_error() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let o = opts(&format!(
        "--url http://127.0.0.1:{port} --mode closed --concurrency 2 --duration 0.2 --quiet"
    ))
    .unwrap();
    let r = run(o).await.unwrap();
    assert!(r.requests > 0);
    assert_eq!(r.failures, r.requests);
    assert_eq!(r.failures_by_kind.get("connect error"), Some(&r.requests));
}

#[test]
fn bodies_and_answers() {
    let o = opts("--cache-off --max-tokens 7").unwrap();
    let d = workload::Drawn {
        item: None,
        prompt: "hi \"there\"".into(),
        provider: Some("cloud"),
        max_tokens: None,
    };
    let v: serde_json::Value = serde_json::from_str(&body(&o, &d)).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"prompt": "hi \"there\"", "provider": "cloud", "max_tokens": 7, "cache": "off"})
    );
    let a = parse_answer(
        200,
        br#"{"text":"x","usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7},"cost":0.5,"latency":0.1,"model":"m","routed_to":"cloud","provider":"local","cached":false,"fallback_reason":"circuit_open"}"#,
    )
    .unwrap();
    assert_eq!(a.routed_to.as_deref(), Some("cloud"));
    assert!(a.fallback);
    assert_eq!((a.prompt_tokens, a.completion_tokens), (Some(3), Some(4)));
    let e = parse_answer(
        503,
        br#"{"error":{"message":"m","type":"t","code":"no_responders","param":null}}"#,
    );
    assert_eq!(e.unwrap_err(), "HTTP 503 no_responders");
    assert_eq!(parse_answer(502, b"bad gateway").unwrap_err(), "HTTP 502");
    assert!(parse_answer(200, b"nope").is_err());
}
