//! Replicas lost under load, as separate processes: SIGKILL one of two
//! routers, then one of two local pools, while a closed loop of new prompts
//! runs through the ingress. Only the requests in flight in the killed
//! process may fail (with 502, 503 or 504, within their deadline); every
//! request sent after a kill is answered, and answered right.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use optiroute_providers::simulated::SimulatedEngine;
use optiroute_testkit::load::{self, Load, Sample, Workload};
use optiroute_testkit::procs::{free_port, Proc};
use optiroute_testkit::{instances, wait_until, NatsServer};
use serde_json::{json, Value};

const CONCURRENCY: usize = 16;

/// A new prompt each time, from the local pool, cache off: every request
/// goes through a router and a provider.
struct NewPrompts;

impl Workload for NewPrompts {
    fn body(&self, n: u64) -> Value {
        json!({"prompt": format!("replicas: question {n}"), "provider": "local", "cache": "off"})
    }

    fn is_right(&self, body: &Value, answer: &Value) -> bool {
        let prompt = body["prompt"].as_str().unwrap();
        answer["provider"] == "local"
            && answer["text"].as_str()
                == Some(&SimulatedEngine::text(
                    prompt,
                    SimulatedEngine::completion_tokens(u32::MAX),
                ))
    }
}

/// Was `s` in flight in a process killed at `at`: sent before the kill
/// (give the kill 50 ms to be seen) and answered after it?
fn in_flight_at(s: &Sample, at: Duration) -> bool {
    s.sent <= at + Duration::from_millis(50) && s.done() >= at
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_a_router_then_a_provider_replica_fails_only_their_requests() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let deadline = Duration::from_millis(4_000);
    let config = dir.path().join("optiroute.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[nats]
url = "{url}"
max_reconnect_delay_ms = 200
[ingress]
listen = "127.0.0.1:{http}"
admin_listen = "127.0.0.1:0"
request_timeout_ms = {deadline}
[router]
admin_listen = "127.0.0.1:0"
provider_timeout_ms = 2000
# Every request names its pool: no routing model to load.
[router.routing]
kind = "features"
[cache]
max_bytes = 33554432
[local]
admin_listen = "127.0.0.1:0"
engine = "simulated"
[local.simulated]
base_ms = 20
per_token_ms = 0
"#,
            url = nats.url(),
            deadline = deadline.as_millis()
        ),
    )
    .unwrap();
    let mut local = [
        Proc::start("optiroute-local", &config),
        Proc::start("optiroute-local", &config),
    ];
    let mut routers = [
        Proc::start("optiroute-router", &config),
        Proc::start("optiroute-router", &config),
    ];
    let _ingress = Proc::start("optiroute-ingress", &config);
    let nc = async_nats::connect(nats.url()).await.unwrap();
    for service in ["optiroute-local", "optiroute-router"] {
        wait_until(service, Duration::from_secs(30), || {
            let nc = nc.clone();
            async move { instances(&nc, service).await == 2 }
        })
        .await;
    }
    let base = format!("http://127.0.0.1:{http}");
    wait_until("the ingress to be ready", Duration::from_secs(30), || {
        let url = format!("{base}/ready");
        async move { matches!(reqwest::get(url).await, Ok(r) if r.status() == 200) }
    })
    .await;

    let load = Load::start(
        vec![base.clone()],
        CONCURRENCY,
        deadline + Duration::from_secs(2),
        NewPrompts,
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let router_killed = load.t0.elapsed();
    routers[0].kill();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let local_killed = load.t0.elapsed();
    local[0].kill();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let samples = load.stop().await;

    let rate = load::rate_before(&samples, router_killed);
    // The router kill's recovery, up to the pool kill.
    let until_pool_kill: Vec<Sample> = samples
        .iter()
        .filter(|s| s.done() < local_killed)
        .cloned()
        .collect();
    println!(
        "replicas: {} requests, failed by status {:?}; {rate:.0} req/s before; \
         after the router kill full throughput again in {:.2?}, after the pool kill in {:.2?}; \
         longest gap without a success {:.2?}",
        samples.len(),
        load::failures_by_status(&samples),
        load::recovery(&until_pool_kill, router_killed, rate),
        load::recovery(&samples, local_killed, rate),
        load::longest_gap(&samples),
    );
    assert!(samples.iter().all(|s| s.right), "a wrong answer");
    for s in samples.iter().filter(|s| s.status != 200) {
        assert!(
            matches!(s.status, 502..=504),
            "a request failed with {} (0: no answer by its deadline + 2 s): {s:?}",
            s.status
        );
        assert!(
            in_flight_at(s, router_killed) || in_flight_at(s, local_killed),
            "a request not in flight at a kill failed: {s:?} (kills at {router_killed:?}, {local_killed:?})"
        );
    }
    // The router's requests failed when its heartbeat stopped (~1 s), not
    // at their deadline (4 s): the closed loop's users were not held.
    for s in samples
        .iter()
        .filter(|s| s.status != 200 && in_flight_at(s, router_killed))
    {
        assert!(
            s.done() < router_killed + Duration::from_millis(2_000),
            "a request of the killed router failed only {:?} after the kill: {s:?}",
            s.done().saturating_sub(router_killed)
        );
    }
    // The same one level down: the router fails (or falls back from) an
    // attempt on the killed pool replica when its heartbeat stops, not at
    // `provider_timeout_ms` (2 s).
    for s in samples
        .iter()
        .filter(|s| s.status != 200 && in_flight_at(s, local_killed))
    {
        assert!(
            s.done() < local_killed + Duration::from_millis(1_800),
            "a request of the killed pool replica failed only {:?} after the kill: {s:?}",
            s.done().saturating_sub(local_killed)
        );
    }
    let failed = samples.iter().filter(|s| s.status != 200).count();
    assert!(failed <= 2 * CONCURRENCY, "{failed} failed");
    let after = samples.iter().filter(|s| s.sent > local_killed).count();
    assert!(after > 100, "load kept running after the kills: {after}");
    // The survivors still serve.
    assert_eq!(instances(&nc, "optiroute-router").await, 1);
    assert_eq!(instances(&nc, "optiroute-local").await, 1);
}
