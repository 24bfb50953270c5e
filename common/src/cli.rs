//! The shared `main` of every binary: parse flags, load config, init logs,
//! connect to NATS, start the process's `run`, wait for a signal.

use async_nats::Client;
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::config::{CliArgs, Config, USAGE};
use crate::Error;

/// A process's body: gets the NATS client, the config and the shutdown
/// token, and resolves when the process has stopped.
///
/// Each library boxes its own body (`optiroute_router::process` and the
/// like). Boxing there, behind a plain `fn`, compiles the process's whole
/// async call tree once, in its library; a generic `main` would make every
/// binary (and every test binary that starts one) compile it again.
pub type Process = fn(Client, Config, CancellationToken) -> BoxFuture<'static, Result<(), Error>>;

/// Runs a process on a multi-threaded runtime and returns its exit code.
pub fn main(process: &str, about: &str, start: Process) -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{process}: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(process, about, start))
}

async fn run(process: &str, about: &str, start: Process) -> std::process::ExitCode {
    let args = match CliArgs::parse(std::env::args().skip(1)) {
        Ok(Some(a)) => a,
        Ok(None) => {
            println!("{process}: {about}\n{USAGE}");
            return std::process::ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{process}: {}", e.message);
            return std::process::ExitCode::from(2);
        }
    };
    let cfg = match Config::load(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{process}: {}", e.message);
            return std::process::ExitCode::from(2);
        }
    };
    crate::telemetry::init(&cfg.log);
    let shutdown = crate::shutdown::on_signal();
    let client = match crate::nats::connect(&cfg.nats, process).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "startup failed");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = start(client.clone(), cfg, shutdown).await;
    // Flush what is buffered; bounded so a dead server cannot hold the exit.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), client.drain()).await;
    match result {
        Ok(()) => {
            tracing::info!("stopped");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "stopped with an error");
            std::process::ExitCode::FAILURE
        }
    }
}
