//! A real nats-server for one test: free port, JetStream store in a temp
//! dir, killed on drop. The binary comes from `NATS_SERVER_BIN`, the
//! project's `.tools/nats` (where `scripts/setup.sh` puts it) or `PATH`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct NatsServer {
    /// The client port: chosen by nats-server at the first start (no other
    /// process can hold it), kept across restarts.
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

/// Waits until `child` has bound its client port and returns it. Proof is
/// the ports file nats-server writes into `dir` (`ports_file_dir`) once it
/// listens, named after its own pid: a port that merely answers may belong
/// to another test's server that took it first. `None` when the child
/// exited instead (its port was taken).
pub(crate) fn wait_listening(child: &mut Child, dir: &Path, what: &str) -> Option<u16> {
    let suffix = format!("_{}.ports", child.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(port) = ports_file_port(dir, &suffix) {
            return Some(port);
        }
        if child.try_wait().unwrap().is_some() {
            return None;
        }
        if Instant::now() >= deadline {
            // A dropped Child keeps running: stop it before failing.
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not start in 10 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The client port in the ports file ending in `suffix`, once written whole.
fn ports_file_port(dir: &Path, suffix: &str) -> Option<u16> {
    let entry = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().ends_with(suffix))?;
    let text = std::fs::read_to_string(entry.path()).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let url = v["nats"][0].as_str()?;
    url.rsplit(':').next()?.parse().ok()
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
            port: 0,
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

    /// Starts the server: on a port of its own choosing the first time
    /// (`-1`), on the same port after that.
    fn spawn(&mut self) {
        let conf = self.dir.path().join("nats.conf");
        let store = self.dir.path().join("store");
        let ports = self.dir.path().join("ports");
        let _ = std::fs::remove_dir_all(&ports);
        std::fs::create_dir_all(&ports).unwrap();
        let js = if self.jetstream {
            format!("jetstream {{\n  store_dir: {:?}\n  max_memory_store: 64MB\n  max_file_store: 256MB\n}}\n", store)
        } else {
            String::new()
        };
        let listen = if self.port == 0 {
            -1
        } else {
            i32::from(self.port)
        };
        let log_path = self.dir.path().join("nats.log");
        let log = std::fs::File::create(&log_path).unwrap();
        std::fs::write(
            &conf,
            format!(
                "listen: 127.0.0.1:{listen}\nports_file_dir: {ports:?}\n{js}{}",
                self.extra
            ),
        )
        .unwrap();
        let mut child = Command::new(binary())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start nats-server ({:?}): {e}; run scripts/setup.sh or set NATS_SERVER_BIN", binary()));
        match wait_listening(&mut child, &ports, "nats-server") {
            Some(port) => self.port = port,
            None => panic!(
                "nats-server exited at start (listen 127.0.0.1:{listen}): {}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            ),
        }
        self.child = Some(child);
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
