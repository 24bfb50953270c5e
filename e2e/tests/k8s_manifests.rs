//! The Kubernetes manifests (`deploy/kubernetes/`): `scripts/validate-k8s.sh`
//! renders every overlay with kustomize and validates it against the
//! Kubernetes schemas and the KEDA ScaledObject schema kept in the repo;
//! then each role's pod settings (the ConfigMap's config file plus the
//! environment the Deployment gives it) go through the real config loader,
//! and the ports, KEDA capacities and JetStream names the manifests use are
//! checked against the settings the processes will run with. A manifest with
//! a typo must fail the validation.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use optiroute_common::config::Config;
use serde_json::Value;

fn root() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/..")
}

/// Runs `scripts/validate-k8s.sh` with `args` (the first run installs
/// kubectl and a venv into .tools/k8s, hence the long bound).
async fn validate(args: &[&str]) -> Output {
    let run = tokio::process::Command::new("bash")
        .arg(format!("{}/scripts/validate-k8s.sh", root()))
        .args(args)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .expect("scripts/validate-k8s.sh ran over 10 minutes")
        .unwrap()
}

fn port(listen: &str) -> u64 {
    listen.rsplit(':').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn every_overlay_renders_validates_and_configures_each_role() {
    let facts = tempfile::tempdir().unwrap();
    let out = validate(&["--facts", facts.path().to_str().unwrap()]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("all manifests valid"), "{stdout}");

    let roles: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(facts.path().join("roles.json")).unwrap())
            .unwrap();
    let dockerfile = std::fs::read_to_string(format!("{}/Dockerfile", root())).unwrap();
    let accounts = std::fs::read_to_string(format!("{}/nats/accounts.conf", root())).unwrap();
    let mut seen = BTreeSet::new();
    for r in &roles {
        let overlay = r["overlay"].as_str().unwrap();
        let role = r["role"].as_str().unwrap();
        let what = format!("overlay {overlay}, role {role}");
        seen.insert((overlay.to_string(), role.to_string()));

        // The pod's settings, through the loader the process runs.
        let file = facts.path().join(format!("{overlay}-{role}.toml"));
        std::fs::write(&file, r["config_toml"].as_str().unwrap()).unwrap();
        let env: Vec<(String, String)> = r["env"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        let cfg = Config::from_parts(Some(&file), &env, &[])
            .unwrap_or_else(|e| panic!("{what}: the config does not load: {}", e.message));

        // The binary the pod starts is one the image builds.
        let binary = format!("optiroute-{role}");
        assert_eq!(
            r["command"],
            serde_json::json!([format!("/usr/local/bin/{binary}")]),
            "{what}"
        );
        assert!(
            dockerfile.contains(&format!("--bin {binary}")),
            "{what}: the Dockerfile does not build {binary}"
        );

        // Probes and Prometheus use the port the role's admin server binds.
        let admin = match role {
            "ingress" => &cfg.ingress.admin_listen,
            "router" => &cfg.router.admin_listen,
            "local" => &cfg.local.admin_listen,
            "cloud" => &cfg.cloud.admin_listen,
            "batch" => &cfg.batch.admin_listen,
            other => panic!("unknown role {other}"),
        };
        assert!(admin.starts_with("0.0.0.0:"), "{what}: {admin}");
        assert_eq!(r["admin_port"], port(admin), "{what}: admin port");
        if role == "ingress" {
            assert!(cfg.ingress.listen.starts_with("0.0.0.0:"), "{what}");
            assert_eq!(r["http_port"], port(&cfg.ingress.listen), "{what}");
        }

        // KEDA's saturation query divides by one replica's capacity.
        let capacity = match role {
            "router" => Some(cfg.router.max_in_flight),
            "local" => Some(cfg.local.max_in_flight),
            "cloud" => Some(cfg.cloud.max_in_flight),
            _ => None,
        };
        assert_eq!(
            r["saturation_divisor"].as_u64(),
            capacity.map(|c| c as u64),
            "{what}: the KEDA query's capacity differs from max_in_flight"
        );
        if role == "batch" {
            let js = &r["jetstream"];
            assert_eq!(js["stream"], cfg.batch.stream.as_str(), "{what}");
            assert_eq!(js["consumer"], cfg.batch.consumer.as_str(), "{what}");
            // The account of nats/accounts.conf that holds the stream.
            let account = js["account"].as_str().unwrap();
            assert!(
                accounts.contains(&format!("  {account} {{"))
                    && accounts.contains("jetstream: enabled"),
                "{what}: nats/accounts.conf has no JetStream account {account}"
            );
        } else {
            assert!(r["jetstream"].is_null(), "{what}");
        }

        // Each role connects as its own NATS user and reads replies on that
        // user's inbox (nats/accounts.conf).
        let user = cfg
            .nats
            .url
            .strip_prefix("nats://")
            .and_then(|u| u.split(':').next())
            .unwrap();
        assert_eq!(cfg.nats.inbox_prefix, format!("_INBOX_{user}"), "{what}");
        let expected_user = match role {
            "local" | "cloud" => "provider",
            other => other,
        };
        assert_eq!(user, expected_user, "{what}");
        if role == "local" {
            assert!(
                dockerfile.contains(&cfg.local.embedded.model_path),
                "{what}: the image does not put the model at {}",
                cfg.local.embedded.model_path
            );
        }
        if role == "cloud" {
            assert!(
                cfg.cloud.upstream.api_key.is_some(),
                "{what}: no cloud token"
            );
        }
        if overlay == "production" {
            // JetStream state is replicated on the 3-node cluster.
            assert_eq!(cfg.nats.replicas, 3, "{what}");
        }
    }
    for overlay in ["dev", "production"] {
        for role in ["ingress", "router", "local", "cloud", "batch"] {
            assert!(
                seen.contains(&(overlay.to_string(), role.to_string())),
                "overlay {overlay} has no {role} Deployment"
            );
        }
    }
}

#[tokio::test]
async fn a_manifest_with_a_typo_fails_validation() {
    // An overlay on the real base with two typos: a misspelt container field
    // (Kubernetes schema) and a misspelt KEDA trigger parameter (KEDA schema).
    let dir = tempfile::tempdir().unwrap();
    let base = Path::new(root())
        .join("deploy/kubernetes/base")
        .canonicalize()
        .unwrap();
    // kustomize takes a base only by a relative path.
    let up = "../".repeat(dir.path().canonicalize().unwrap().components().count() - 1);
    let base = format!("{up}{}", base.strip_prefix("/").unwrap().display());
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - {base}
patches:
  - target: {{kind: Deployment, name: optiroute-router}}
    patch: |-
      - op: move
        from: /spec/template/spec/containers/0/readinessProbe
        path: /spec/template/spec/containers/0/readinesProbe
  - target: {{kind: ScaledObject, name: optiroute-batch}}
    patch: |-
      - op: move
        from: /spec/triggers/0/metadata/lagThreshold
        path: /spec/triggers/0/metadata/lagTreshold
"
        ),
    )
    .unwrap();
    let out = validate(&[dir.path().to_str().unwrap()]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a broken manifest passed:\n{stderr}");
    assert!(
        stderr.contains("Deployment/optiroute-router")
            && stderr.contains("'readinesProbe' was unexpected"),
        "{stderr}"
    );
    assert!(
        stderr.contains("ScaledObject/optiroute-batch")
            && stderr.contains("'lagTreshold' was unexpected"),
        "{stderr}"
    );
    // The router has lost its readiness probe, which every role must have.
    assert!(
        stderr.contains("optiroute-router: readinessProbe must GET /ready"),
        "{stderr}"
    );
    // Nothing else in the base is reported (the fourth line: the KEDA
    // trigger now lacks lagThreshold).
    let problems = stderr.lines().filter(|l| l.starts_with("INVALID")).count();
    assert_eq!(problems, 4, "{stderr}");
}
