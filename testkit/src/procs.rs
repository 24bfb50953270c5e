//! The stack's real binaries as separate processes, for tests that start,
//! stop and kill them.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The stack's binaries, from the same build as the running test (what
/// `scripts/build.sh`, run by `up.sh` and `test.sh`, makes): the folder the
/// test binary's `deps/` sits in. Brought up to date once per run (a no-op
/// after `scripts/test.sh`), so a test never runs stale ones.
pub fn bin_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        // <target>/<profile>/deps/processes-<hash>
        let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
        let target = profile_dir.parent().unwrap();
        let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--workspace", "--quiet", "--target-dir"])
            .arg(target)
            .current_dir(&root);
        for bin in STACK_BINS.iter().chain(&["optiroute"]) {
            cmd.args(["--bin", bin]);
        }
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().unwrap();
        assert!(status.success(), "building the stack's binaries failed");
        profile_dir
    })
    .clone()
}

/// What `scripts/build.sh` builds (and `scripts/up.sh` starts); the tests
/// also run the `optiroute` CLI.
pub const STACK_BINS: [&str; 5] = [
    "optiroute-ingress",
    "optiroute-router",
    "optiroute-local",
    "optiroute-cloud",
    "optiroute-batch",
];

pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `n` distinct ports free a moment ago (held together while chosen, so
/// no two are the same). Another process may still take one before it is
/// bound: a nats-server of this harness cannot (it picks its own), and a
/// test that starts processes on these runs alone in its binary.
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// One of the stack's binaries, running; SIGKILLed on drop.
pub struct Proc {
    pub name: &'static str,
    pub child: Child,
}

impl Proc {
    /// Starts `name` with `--config config`, logs to stderr at `warn`, in
    /// the repository's root as `scripts/up.sh` runs it (relative paths in
    /// the config, such as the models', resolve there).
    pub fn start(name: &'static str, config: &std::path::Path) -> Proc {
        let child = Command::new(bin_dir().join(name))
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .arg("--config")
            .arg(config)
            .env_remove("HF_API_TOKEN")
            .env_remove("OPTIROUTE_CLOUD_API_KEY")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Proc { name, child }
    }

    /// SIGTERM, then the exit status within `within`.
    pub fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not stop within {within:?} of SIGTERM",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no drain, no goodbye.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}
