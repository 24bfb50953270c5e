//! The whole pipeline in-process: ingress, router, local and cloud workers,
//! each with its own NATS connection to a real nats-server.

use std::net::SocketAddr;

use optiroute_common::config::Config;
use optiroute_common::subjects::{Discovery, Subjects};
use tokio_util::sync::CancellationToken;

/// A config for tests: free ports, a fast simulated local engine, short timeouts.
pub fn test_config(nats_url: &str) -> Config {
    let mut c = Config::default();
    c.nats.url = nats_url.to_string();
    c.nats.max_reconnect_delay_ms = 100;
    c.ingress.listen = "127.0.0.1:0".into();
    c.ingress.admin_listen = "127.0.0.1:0".into();
    c.ingress.request_timeout_ms = 5_000;
    c.router.admin_listen = "127.0.0.1:0".into();
    // Pipeline tests route with the feature router (no embedding model to
    // load); the learned router has its own tests in router-worker/tests.
    c.router.routing.kind = optiroute_common::config::RouterKind::Features;
    // The test server allows 256 MB of file store; the default bucket is 1 GiB.
    c.cache.max_bytes = 32 << 20;
    c.router.provider_timeout_ms = 3_000;
    c.local.admin_listen = "127.0.0.1:0".into();
    // Pipeline tests use the simulated engine; the embedded model has its own tests.
    c.local.engine = optiroute_common::config::LocalEngineKind::Simulated;
    c.local.simulated.base_ms = 1;
    c.local.simulated.per_token_ms = 0;
    c.cloud.admin_listen = "127.0.0.1:0".into();
    c.cloud.upstream.api_key = Some("test-key".into());
    c.cloud.upstream.base_url = "http://127.0.0.1:9/v1".into();
    c.cloud.upstream.timeout_ms = 2_000;
    c.cloud.breaker.open_ms = 60_000;
    c.batch.admin_listen = "127.0.0.1:0".into();
    c.batch.ack_wait_ms = 2_000;
    c.batch.backoff_ms = vec![100, 200, 400];
    c.batch.request_timeout_ms = 5_000;
    // Within the test server's 256 MB of file store, twice over.
    c.batch.max_queue_bytes = 32 << 20;
    c.batch.max_results_bytes = 32 << 20;
    c.batch.max_meta_bytes = 4 << 20;
    c
}

pub async fn client(cfg: &Config, name: &str) -> async_nats::Client {
    optiroute_common::nats::connect(&cfg.nats, name)
        .await
        .unwrap()
}

/// Which parts of the stack to start.
#[derive(Debug, Clone, Copy)]
pub struct Parts {
    pub ingress: bool,
    pub router: bool,
    pub local: bool,
    pub cloud: bool,
}

impl Parts {
    pub const ALL: Parts = Parts {
        ingress: true,
        router: true,
        local: true,
        cloud: true,
    };
    /// Everything but the ingress: for tests that talk NATS directly.
    pub const WORKERS: Parts = Parts {
        ingress: false,
        ..Parts::ALL
    };
    /// An ingress and a router only: another replica beside a full stack.
    pub const FRONT: Parts = Parts {
        ingress: true,
        router: true,
        local: false,
        cloud: false,
    };
}

pub struct Stack {
    pub cfg: Config,
    pub shutdown: CancellationToken,
    pub ingress: Option<optiroute_ingress::Running>,
    pub router: Option<optiroute_router::Running>,
    pub local: Option<optiroute_providers::Running>,
    pub cloud: Option<optiroute_providers::Running>,
}

impl Stack {
    pub async fn start(cfg: Config) -> Stack {
        Self::start_parts(cfg, Parts::ALL).await
    }

    pub async fn start_parts(cfg: Config, parts: Parts) -> Stack {
        Self::start_parts_as(cfg, parts, |_, _| {}).await
    }

    /// Like `start_parts`, each part's NATS settings adjusted by
    /// `nats_for(part, settings)` (`"ingress"`, `"router"`, `"local"`,
    /// `"cloud"`): a user and an inbox per role. The stack's own probes use
    /// the ingress's.
    pub async fn start_parts_as(
        cfg: Config,
        parts: Parts,
        nats_for: impl Fn(&str, &mut optiroute_common::config::NatsConfig),
    ) -> Stack {
        let as_part = |part: &str| {
            let mut c = cfg.clone();
            nats_for(part, &mut c.nats);
            c
        };
        let client = |part: &'static str| {
            let c = as_part(part);
            async move { client(&c, part).await }
        };
        let shutdown = CancellationToken::new();
        let local = if parts.local {
            Some(
                optiroute_providers::run_local(client("local").await, &cfg, shutdown.clone())
                    .await
                    .unwrap(),
            )
        } else {
            None
        };
        let cloud = if parts.cloud {
            Some(
                optiroute_providers::run_cloud(client("cloud").await, &cfg, shutdown.clone())
                    .await
                    .unwrap(),
            )
        } else {
            None
        };
        let router = if parts.router {
            Some(
                optiroute_router::run(client("router").await, &cfg, shutdown.clone())
                    .await
                    .unwrap(),
            )
        } else {
            None
        };
        let ingress = if parts.ingress {
            Some(
                optiroute_ingress::run(client("ingress").await, &cfg, shutdown.clone())
                    .await
                    .unwrap(),
            )
        } else {
            None
        };
        let stack = Stack {
            cfg: as_part("ingress"),
            shutdown,
            ingress,
            router,
            local,
            cloud,
        };
        stack.wait_serving().await;
        stack
    }

    /// Waits until every started service answers `$SRV.PING`, so tests never
    /// race the subscriptions.
    pub async fn wait_serving(&self) {
        let c = client(&self.cfg, "probe").await;
        let subjects = Subjects::new(&self.cfg.nats.prefix);
        let mut names = Vec::new();
        if self.router.is_some() {
            names.push(subjects.router_service.clone());
        }
        if self.local.is_some() {
            names.push(subjects.local_service.clone());
        }
        if self.cloud.is_some() {
            names.push(subjects.cloud_service.clone());
        }
        for name in names {
            let c = c.clone();
            let ping = Discovery::Ping.subject(&name);
            crate::wait_until(&name, std::time::Duration::from_secs(10), move || {
                let c = c.clone();
                let ping = ping.clone();
                async move { c.request(ping, "".into()).await.is_ok() }
            })
            .await;
        }
        // The ingress's own connection (it connects in the background: a
        // request before that is refused with `nats_unavailable`). Its
        // `/ready` says so; without a router it answers `no_responders`.
        if let Some(i) = &self.ingress {
            let ready = format!("http://{}/ready", i.admin_addr);
            crate::wait_until(
                "the ingress's NATS connection",
                std::time::Duration::from_secs(10),
                move || {
                    let ready = ready.clone();
                    async move {
                        match reqwest::get(&ready).await {
                            Ok(r) => !r
                                .text()
                                .await
                                .unwrap_or_default()
                                .contains("nats_unavailable"),
                            Err(_) => false,
                        }
                    }
                },
            )
            .await;
        }
        // The cache bucket, when the router has JetStream to put it in.
        if let Some(r) = &self.router {
            let cache = r.cache.clone();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async move {
                while !cache.is_connected() {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            })
            .await;
            // The semantic bucket, when the router serves the semantic cache.
            let semantic = r.semantic.clone();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async move {
                while semantic.active() && !semantic.is_connected() {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            })
            .await;
        }
    }

    pub fn ingress_addr(&self) -> SocketAddr {
        self.ingress.as_ref().expect("ingress started").addr
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.ingress_addr())
    }

    /// POSTs a JSON body to `/generate`: the status and the JSON answer.
    pub async fn generate(&self, body: &serde_json::Value) -> (u16, serde_json::Value) {
        self.post_raw("/generate", body.to_string()).await
    }

    /// GETs `path`: the status and the body's text.
    pub async fn get(&self, path: &str) -> (u16, String) {
        let resp = reqwest::get(self.url(path)).await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap())
    }

    /// POSTs `body` (sent as JSON) to `path`: the status and the JSON answer.
    pub async fn post_raw(&self, path: &str, body: String) -> (u16, serde_json::Value) {
        let resp = reqwest::Client::new()
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap())
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
