#![allow(clippy::unwrap_used)]
//! The deploy files match the code: the Grafana dashboard is well formed and
//! every metric its queries use is exported by some process once traffic has
//! flowed; the Prometheus config scrapes every process `scripts/up.sh` starts.

use std::collections::{BTreeSet, HashSet};

use optiroute_testkit::{scrape, test_config, FakeUpstream, Mode, NatsServer, Stack};
use serde_json::{json, Value};

const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/grafana/optiroute-dashboard.json"
);
const PROMETHEUS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/prometheus/prometheus.yml"
);

fn dashboard() -> Value {
    let text = std::fs::read_to_string(DASHBOARD).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn panels(d: &Value) -> &Vec<Value> {
    d["panels"]
        .as_array()
        .expect("dashboard has a panels array")
}

/// Every `targets[].expr` of a panel.
fn exprs(panel: &Value) -> Vec<&str> {
    panel["targets"]
        .as_array()
        .map(|ts| ts.iter().filter_map(|t| t["expr"].as_str()).collect())
        .unwrap_or_default()
}

/// Identifiers (`[a-zA-Z_:][a-zA-Z0-9_:]*`) of a PromQL expression outside
/// string literals.
fn identifiers(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = expr.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '"' || c == '\'' || c == '`' {
            // Skip the string literal, honouring backslash escapes.
            while let Some(s) = chars.next() {
                if s == '\\' {
                    chars.next();
                } else if s == c {
                    break;
                }
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let mut id = String::from(c);
            while let Some(&n) = chars.peek() {
                if n.is_ascii_alphanumeric() || n == '_' || n == ':' {
                    id.push(n);
                    chars.next();
                } else {
                    break;
                }
            }
            out.push(id);
        } else if c.is_ascii_digit() {
            // Numbers and durations (`5m`, `0.95`, `1e3`) are not identifiers.
            while let Some(&n) = chars.peek() {
                if n.is_ascii_alphanumeric() || n == '.' || n == '_' {
                    chars.next();
                } else {
                    break;
                }
            }
        }
    }
    out
}

/// The base metric names a dashboard queries: OptiRoute's own prefixes, with
/// histogram series suffixes mapped back to the histogram.
fn dashboard_metrics(d: &Value) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for panel in panels(d) {
        for expr in exprs(panel) {
            for id in identifiers(expr) {
                if !["llm_", "optiroute_", "http_"]
                    .iter()
                    .any(|p| id.starts_with(p))
                {
                    continue;
                }
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| id.strip_suffix(s))
                    .unwrap_or(&id);
                names.insert(base.to_string());
            }
        }
    }
    names
}

#[test]
fn identifiers_skip_strings_and_durations() {
    let ids = identifiers(
        r#"histogram_quantile(0.95, sum by (le) (rate(http_request_duration_seconds_bucket{endpoint="/generate",x="llm_no"}[5m])))"#,
    );
    assert_eq!(
        ids,
        [
            "histogram_quantile",
            "sum",
            "by",
            "le",
            "rate",
            "http_request_duration_seconds_bucket",
            "endpoint",
            "x"
        ]
    );
}

#[test]
fn dashboard_is_well_formed() {
    let d = dashboard();
    assert_eq!(d["title"], "OptiRoute");
    assert_eq!(d["uid"], "optiroute");
    assert!(d["schemaVersion"].as_u64().is_some(), "schemaVersion");

    let vars = d["templating"]["list"].as_array().expect("templating.list");
    assert!(
        vars.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "a `datasource` templating variable of type datasource, query prometheus"
    );

    let panels = panels(&d);
    assert!(!panels.is_empty(), "no panels");
    let mut ids = HashSet::new();
    for p in panels {
        let title = p["title"].as_str().unwrap_or("<untitled>");
        let id = p["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("panel {title}: no integer id"));
        assert!(ids.insert(id), "panel {title}: duplicate id {id}");
        let g = &p["gridPos"];
        for k in ["x", "y", "w", "h"] {
            assert!(g[k].as_u64().is_some(), "panel {title}: gridPos.{k}");
        }
        assert_eq!(
            p["datasource"],
            json!({"type": "prometheus", "uid": "${datasource}"}),
            "panel {title}: datasource"
        );
        let ex = exprs(p);
        assert!(
            !ex.is_empty() && ex.iter().all(|e| !e.trim().is_empty()),
            "panel {title}: needs targets with a non-empty expr"
        );
    }
}

#[test]
fn prometheus_config_scrapes_every_process() {
    let text = std::fs::read_to_string(PROMETHEUS).unwrap();
    for port in ["9100", "9101", "9102", "9103"] {
        assert!(
            text.contains(&format!("127.0.0.1:{port}")),
            "prometheus.yml does not scrape port {port}"
        );
    }
    for job in [
        "optiroute-ingress",
        "optiroute-router",
        "optiroute-local",
        "optiroute-cloud",
    ] {
        assert!(text.contains(job), "prometheus.yml has no job {job}");
    }
}

#[tokio::test]
async fn every_dashboard_metric_is_exported() {
    let wanted = dashboard_metrics(&dashboard());
    assert!(!wanted.is_empty(), "no OptiRoute metrics in the dashboard");

    let nats = NatsServer::start();
    let up = FakeUpstream::start(Mode::Ok).await;
    let mut cfg = test_config(&nats.url());
    cfg.cloud.upstream.base_url = up.base_url();
    let stack = Stack::start(cfg).await;
    let http = reqwest::Client::new();

    let ask = |body: Value| {
        let http = http.clone();
        let url = stack.url("/generate");
        async move {
            let resp = http.post(url).json(&body).send().await.unwrap();
            let status = resp.status();
            let v: Value = resp.json().await.unwrap();
            assert_eq!(status, 200, "{body} -> {v}");
            v
        }
    };
    // A miss then a hit, a cloud answer, then a cloud failure that falls back
    // to local (so the fallback counter has a series to export).
    ask(json!({"prompt": "Hello"})).await;
    let hit = ask(json!({"prompt": "Hello"})).await;
    assert_eq!(hit["cached"], true, "{hit}");
    ask(json!({"prompt": "hi", "provider": "cloud"})).await;
    up.set_mode(Mode::Status(500));
    let fb = ask(json!({"prompt": "fall back please", "provider": "cloud"})).await;
    assert_eq!(fb["provider"], "local", "{fb}");

    let texts = [
        ("ingress", scrape(stack.ingress_addr()).await),
        (
            "router",
            scrape(stack.router.as_ref().unwrap().admin_addr).await,
        ),
        (
            "local",
            scrape(stack.local.as_ref().unwrap().admin_addr).await,
        ),
        (
            "cloud",
            scrape(stack.cloud.as_ref().unwrap().admin_addr).await,
        ),
    ];
    let missing: Vec<&String> = wanted
        .iter()
        .filter(|name| {
            let line = format!("# TYPE {name} ");
            !texts
                .iter()
                .any(|(_, t)| t.lines().any(|l| l.starts_with(&line)))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "dashboard metrics no process exports: {missing:?} (checked {wanted:?} against {:?})",
        texts.iter().map(|(p, _)| *p).collect::<Vec<_>>()
    );
}
