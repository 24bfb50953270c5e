//! A cluster of real nats-servers for one test: each node with its own
//! client port, route port and JetStream store (in one temp dir), routes to
//! every other node, killed on drop. A node can be SIGKILLed and started
//! again on the same ports with the same store, as an operator would.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::nats_server::{binary, wait_listening};
use crate::procs::free_ports;

struct Node {
    name: String,
    port: u16,
    conf: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

pub struct NatsCluster {
    nodes: Vec<Node>,
    /// Where each node writes its ports file once it listens.
    ports_dir: PathBuf,
    _dir: tempfile::TempDir,
}

impl NatsCluster {
    /// `n` nodes named `n1`..`n<n>`, JetStream on each, every write synced
    /// to disk before it is acknowledged, as `nats/cluster/` configures.
    pub fn start(n: usize) -> Self {
        Self::start_with_sync(n, "always")
    }

    /// The same with JetStream's `sync_interval` set to `sync` (`"2m"` is
    /// nats-server's default: acknowledged writes reach the disk later).
    pub fn start_with_sync(n: usize, sync: &str) -> Self {
        // Ports are chosen free a moment before the nodes bind them; when
        // another process took one meanwhile, start again on fresh ports.
        for _ in 0..5 {
            let mut cluster = Self::configure(n, sync);
            if (0..n).all(|i| cluster.try_spawn(i)) {
                return cluster;
            }
        }
        panic!("could not start a {n}-node nats-server cluster on free ports in 5 tries");
    }

    fn configure(n: usize, sync: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ports = free_ports(2 * n);
        let (client_ports, route_ports) = ports.split_at(n);
        let routes: Vec<String> = route_ports
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect();
        let ports_dir = dir.path().join("ports");
        // A name of its own, so a node can never join another test's cluster.
        let cluster = format!(
            "optiroute-test-{}",
            dir.path()
                .file_name()
                .map(|n| n.to_string_lossy().replace('.', ""))
                .unwrap_or_default()
        );
        std::fs::create_dir_all(&ports_dir).unwrap();
        let nodes = (0..n)
            .map(|i| {
                let name = format!("n{}", i + 1);
                let store = dir.path().join(format!("{name}-store"));
                let conf = dir.path().join(format!("{name}.conf"));
                std::fs::write(
                    &conf,
                    format!(
                        "server_name: {name}\nlisten: 127.0.0.1:{}\nports_file_dir: {ports_dir:?}\n\
                         jetstream {{\n  store_dir: {store:?}\n  max_memory_store: 64MB\n  max_file_store: 512MB\n  sync_interval: {sync}\n}}\n\
                         cluster {{\n  name: {cluster}\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
                        client_ports[i],
                        route_ports[i],
                        routes.join(", ")
                    ),
                )
                .unwrap();
                Node {
                    log: dir.path().join(format!("{name}.log")),
                    name,
                    port: client_ports[i],
                    conf,
                    child: None,
                }
            })
            .collect();
        NatsCluster {
            nodes,
            ports_dir,
            _dir: dir,
        }
    }

    /// Every node's URL, comma-separated (what `nats.url` takes).
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node whose `server_name` is `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// Starts node `i`; false when it exited instead of listening (its
    /// port was taken).
    fn try_spawn(&mut self, i: usize) -> bool {
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .unwrap();
        let mut child = Command::new(binary())
            .arg("-c")
            .arg(&node.conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start nats-server ({:?}): {e}", binary()));
        let what = format!("nats-server {}", node.name);
        let up = wait_listening(&mut child, &self.ports_dir, &what) == Some(node.port);
        node.child = Some(child);
        up
    }

    fn spawn(&mut self, i: usize) {
        assert!(
            self.try_spawn(i),
            "nats-server {} exited on restart (port {} taken?): {}",
            self.nodes[i].name,
            self.nodes[i].port,
            std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
        );
    }

    /// SIGKILLs node `i`: no shutdown, no flush.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts node `i` again on its ports with its store.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
    }
}

/// Waits until the cluster's JetStream answers (its meta leader is
/// elected) through `js`. A request sent before that gets no answer at all,
/// so each probe is bounded.
pub async fn wait_for_jetstream(js: &async_nats::jetstream::Context) {
    crate::wait_until("JetStream on the cluster", Duration::from_secs(30), || {
        let js = js.clone();
        async move {
            matches!(
                tokio::time::timeout(Duration::from_millis(500), js.query_account()).await,
                Ok(Ok(_))
            )
        }
    })
    .await;
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}
