//! Two deployments on one NATS system, told apart by `nats.prefix`: each
//! one's probes find only its own services, and each serves only its own
//! requests.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use async_nats::client::RequestErrorKind;
use optiroute_common::protocol::{Discovery, Subjects};
use optiroute_testkit::stack::{client, Parts};
use optiroute_testkit::{metric, scrape, test_config, wait_until, NatsServer, Stack};
use serde_json::{json, Value};

/// `/ready` once the ingress's NATS connection is up: the status and the body.
async fn ready(stack: &Stack) -> (u16, Value) {
    let get = || async {
        let r = reqwest::get(stack.url("/ready")).await.unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    wait_until(
        "the ingress to connect to NATS",
        Duration::from_secs(10),
        || async {
            let (_, body) = get().await;
            !body["reason"]
                .as_str()
                .unwrap_or("")
                .starts_with("nats_unavailable")
        },
    )
    .await;
    get().await
}

#[tokio::test]
async fn a_second_prefix_pings_and_serves_only_its_own() {
    let nats = NatsServer::start();
    let default = Stack::start(test_config(&nats.url())).await;
    assert_eq!(ready(&default).await.0, 200);

    let mut blue_cfg = test_config(&nats.url());
    blue_cfg.nats.prefix = "blue".into();
    blue_cfg.cache.bucket = "blue-cache".into();
    // Only blue's ingress: the default deployment's router must not make it ready.
    let blue_ingress = Stack::start_parts(
        blue_cfg.clone(),
        Parts {
            ingress: true,
            router: false,
            local: false,
            cloud: false,
        },
    )
    .await;
    let (status, body) = ready(&blue_ingress).await;
    assert_eq!(
        status, 503,
        "a blue ingress with no blue router is ready: {body}"
    );
    let (status, body) = blue_ingress.generate(&json!({"prompt": "hello"})).await;
    assert_eq!(status, 503, "{body}");
    // Blue's service names are blue's own: nobody answers them yet.
    let blue_names = Subjects::new("blue");
    let probe = client(&default.cfg, "probe").await;
    for name in [
        &blue_names.router_service,
        &blue_names.local_service,
        &blue_names.cloud_service,
    ] {
        let err = probe
            .request(Discovery::Ping.subject(name), "".into())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), RequestErrorKind::NoResponders, "{name}");
    }

    // Blue's workers: now blue is ready and serves with its own pools.
    let blue = Stack::start_parts(
        blue_cfg,
        Parts {
            ingress: false,
            router: true,
            local: true,
            cloud: true,
        },
    )
    .await;
    assert_eq!(ready(&blue_ingress).await.0, 200);
    assert_eq!(ready(&default).await.0, 200);
    // Each name reaches its own deployment's service, serving its own subject.
    let default_names = Subjects::default();
    for (names, prefix) in [(&blue_names, "blue"), (&default_names, "optiroute")] {
        for (name, subject) in [
            (&names.router_service, &names.generate),
            (&names.local_service, &names.provider_local),
            (&names.cloud_service, &names.provider_cloud),
        ] {
            assert!(subject.starts_with(&format!("{prefix}.")), "{subject}");
            let info = probe
                .request(Discovery::Info.subject(name), "".into())
                .await
                .unwrap();
            let info: Value = serde_json::from_slice(&info.payload).unwrap();
            assert_eq!(info["endpoints"][0]["subject"], subject.as_str(), "{info}");
        }
    }
    let (status, body) = blue_ingress
        .generate(&json!({"prompt": "hello from blue"}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["provider"], "local");
    let (status, _) = default
        .generate(&json!({"prompt": "hello from default"}))
        .await;
    assert_eq!(status, 200);
    // Each deployment's local pool served exactly its own request.
    for s in [&blue, &default] {
        let text = scrape(s.local.as_ref().unwrap().admin_addr).await;
        assert_eq!(
            metric(&text, "optiroute_requests_total", &[("outcome", "ok")]),
            Some(1.0),
            "{text}"
        );
    }
}
