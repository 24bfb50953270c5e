//! A real nats-server for one test: free port, JetStream store in a temp
//! dir, killed on drop. The binary comes from `NATS_SERVER_BIN`, the
//! project's `.tools/nats` (where `scripts/setup.sh` puts it) or `PATH`.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct NatsServer {
    pub port: u16,
    jetstream: bool,
    /// Extra configuration appended to the generated file.
    extra: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

/// The nats-server binary tests run.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN") {
        return PathBuf::from(p);
    }
    let local = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.tools/nats/bin/nats-server");
    if local.exists() {
        return local;
    }
    PathBuf::from("nats-server")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl NatsServer {
    /// A server with JetStream enabled.
    pub fn start() -> Self {
        Self::start_with(true)
    }

    /// A server without JetStream (the cache must fail open).
    pub fn start_without_jetstream() -> Self {
        Self::start_with(false)
    }

    /// A server with JetStream and the project's `nats/accounts.conf`
    /// included: every connection needs one of its users.
    pub fn start_with_accounts() -> Self {
        let accounts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../nats/accounts.conf");
        Self::start_with_extra(true, Some(accounts))
    }

    fn start_with(jetstream: bool) -> Self {
        Self::start_with_extra(jetstream, None)
    }

    fn start_with_extra(jetstream: bool, accounts: Option<PathBuf>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // nats-server resolves `include` next to the config file.
        let extra = match accounts {
            Some(file) => {
                std::fs::copy(&file, dir.path().join("accounts.conf"))
                    .unwrap_or_else(|e| panic!("cannot copy {file:?}: {e}"));
                "include \"accounts.conf\"\n".to_string()
            }
            None => String::new(),
        };
        let mut s = NatsServer {
            port: free_port(),
            jetstream,
            extra,
            dir,
            child: None,
        };
        s.spawn();
        s
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The URL for one of `nats/accounts.conf`'s users (its placeholder password).
    pub fn url_as(&self, user: &str) -> String {
        format!("nats://{user}:change-me-{user}@127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let conf = self.dir.path().join("nats.conf");
        let store = self.dir.path().join("store");
        let js = if self.jetstream {
            format!("jetstream {{\n  store_dir: {:?}\n  max_memory_store: 64MB\n  max_file_store: 256MB\n}}\n", store)
        } else {
            String::new()
        };
        std::fs::write(
            &conf,
            format!("listen: 127.0.0.1:{}\n{js}{}", self.port, self.extra),
        )
        .unwrap();
        let child = Command::new(binary())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start nats-server ({:?}): {e}; run scripts/setup.sh or set NATS_SERVER_BIN", binary()));
        self.child = Some(child);
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not start on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the server (clients see a disconnect).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port with the same store.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}
