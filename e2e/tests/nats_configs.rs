//! The nats-server configurations in `nats/`: each one is accepted by
//! `nats-server -t`, and the 3-node cluster, started from its own files
//! (on free ports), takes only authenticated clients over TLS, forms its
//! routes over TLS and replicates JetStream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use optiroute_common::config::Config;
use optiroute_testkit::nats_server::binary;
use optiroute_testkit::{test_config, wait_until};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `*.conf` under `dir`, recursively.
fn confs(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            confs(&p, out);
        } else if p.extension().is_some_and(|x| x == "conf") {
            out.push(p);
        }
    }
}

/// A copy of `nats/` in a temp dir, with certificates made by
/// `scripts/make-certs.sh` where the cluster files expect them (paths
/// relative to the working directory, as from the repository root).
fn copy_with_certs() -> (tempfile::TempDir, Vec<PathBuf>) {
    let tmp = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    confs(&repo().join("nats"), &mut files);
    let mut rel = Vec::new();
    for f in &files {
        let r = f.strip_prefix(repo()).unwrap().to_path_buf();
        let to = tmp.path().join(&r);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(f, &to).unwrap();
        rel.push(r);
    }
    let certs = tmp.path().join("nats/cluster/certs");
    let out = Command::new(repo().join("scripts/make-certs.sh"))
        .arg(&certs)
        .output()
        .unwrap();
    assert!(out.status.success(), "make-certs.sh: {out:?}");
    for f in ["ca.pem", "server.pem", "server-key.pem"] {
        assert!(certs.join(f).is_file(), "{f} not made");
    }
    (tmp, rel)
}

fn check(dir: &Path, conf: &Path) -> std::process::Output {
    Command::new(binary())
        .current_dir(dir)
        .arg("-t")
        .arg("-c")
        .arg(conf)
        .output()
        .unwrap()
}

#[test]
fn nats_server_accepts_every_config_in_nats() {
    let (tmp, files) = copy_with_certs();
    assert!(files.len() >= 5, "{files:?}");
    for f in &files {
        // accounts.conf is a fragment: check it the way it is used, included.
        let conf = if f.file_name().unwrap() == "accounts.conf" {
            let wrapper = f.with_file_name("accounts-check.conf");
            std::fs::write(
                tmp.path().join(&wrapper),
                "listen: 127.0.0.1:-1\njetstream: enabled\ninclude \"accounts.conf\"\n",
            )
            .unwrap();
            wrapper
        } else {
            f.clone()
        };
        let out = check(tmp.path(), &conf);
        assert!(
            out.status.success(),
            "nats-server -t -c {}: {}{}",
            f.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The check is real: a cluster node without its certificates is refused.
    std::fs::remove_dir_all(tmp.path().join("nats/cluster/certs")).unwrap();
    assert!(!check(tmp.path(), Path::new("nats/cluster/node1.conf"))
        .status
        .success());
}

struct Nodes(Vec<Child>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test]
async fn the_cluster_takes_only_authenticated_tls_clients_and_replicates() {
    let (tmp, _) = copy_with_certs();
    // The files' fixed ports, moved to free ones.
    let fixed = [4222, 4223, 4224, 6222, 6223, 6224, 8222, 8223, 8224];
    let ports: Vec<(String, String)> = fixed
        .iter()
        .zip(optiroute_testkit::procs::free_ports(fixed.len()))
        .map(|(p, free)| (format!(":{p}"), format!(":{free}")))
        .collect();
    let mut nodes = Nodes(Vec::new());
    for n in 1..=3 {
        let path = tmp.path().join(format!("nats/cluster/node{n}.conf"));
        let mut text = std::fs::read_to_string(&path).unwrap();
        for (from, to) in &ports {
            text = text.replace(from.as_str(), to);
        }
        std::fs::write(&path, text).unwrap();
        let store = tmp.path().join(format!("store{n}"));
        nodes.0.push(
            Command::new(binary())
                .current_dir(tmp.path())
                .arg("-c")
                .arg(format!("nats/cluster/node{n}.conf"))
                .arg("--store_dir")
                .arg(&store)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    let port = |i: usize| ports[i].1.trim_start_matches(':').to_string();
    let ca = tmp.path().join("nats/cluster/certs/ca.pem");

    // A role's user over TLS, as the processes connect.
    let mut cfg: Config = test_config(&format!(
        "tls://router:change-me-router@127.0.0.1:{},tls://router:change-me-router@127.0.0.1:{}",
        port(0),
        port(1)
    ));
    cfg.nats.inbox_prefix = "_INBOX_router".into();
    cfg.nats.tls_ca_file = Some(ca.to_string_lossy().into_owned());
    let client = optiroute_common::nats::connect(&cfg.nats, "tls-router")
        .await
        .unwrap();
    wait_until("a TLS connection", Duration::from_secs(15), || async {
        optiroute_common::nats::is_connected(&client)
    })
    .await;
    // Three replicas need the routes up between all three nodes.
    let mut js = async_nats::jetstream::new(client.clone());
    // A request sent before the nodes elect a JetStream leader gets no
    // answer: retry soon rather than wait the client's 30 s.
    js.set_timeout(Duration::from_secs(2));
    wait_until("an R3 cache bucket", Duration::from_secs(30), || async {
        js.create_key_value(async_nats::jetstream::kv::Config {
            bucket: "optiroute-cache".into(),
            num_replicas: 3,
            max_bytes: 1 << 20,
            ..Default::default()
        })
        .await
        .is_ok()
    })
    .await;
    let kv = js.get_key_value("optiroute-cache").await.unwrap();
    kv.put("k", "v".into()).await.unwrap();
    let info = js
        .get_stream("KV_optiroute-cache")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    let cluster = info.cluster.expect("clustered stream");
    assert_eq!(cluster.replicas.len(), 2, "{cluster:?}");

    let refused = |url: String, ca: bool, user: bool| {
        let ca = ca.then(|| tmp.path().join("nats/cluster/certs/ca.pem"));
        async move {
            let mut o = if user {
                async_nats::ConnectOptions::with_user_and_password(
                    "router".into(),
                    "change-me-router".into(),
                )
            } else {
                async_nats::ConnectOptions::new()
            };
            if let Some(ca) = ca {
                o = o.add_root_certificates(ca).require_tls(true);
            }
            o.connection_timeout(Duration::from_secs(2))
                .connect(url)
                .await
                .is_err()
        }
    };
    // No user, over TLS: refused.
    assert!(refused(format!("tls://127.0.0.1:{}", port(2)), true, false).await);
    // The right user without TLS: refused (the server requires TLS).
    assert!(refused(format!("nats://127.0.0.1:{}", port(2)), false, true).await);
    // The right user over TLS on the third node: accepted.
    assert!(!refused(format!("tls://127.0.0.1:{}", port(2)), true, true).await);
    drop(nodes);
}
