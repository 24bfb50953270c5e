//! The shared `main` of every binary: parse flags, load config, init logs,
//! connect to NATS, start the process's `run`, wait for a signal.

use std::future::Future;

use async_nats::Client;
use tokio_util::sync::CancellationToken;

use crate::config::{CliArgs, Config, USAGE};
use crate::Error;

/// Runs a process: `start` gets the NATS client, the config and the shutdown
/// token, and resolves when the process has stopped. Returns the exit code.
pub async fn main<F, Fut>(process: &str, about: &str, start: F) -> std::process::ExitCode
where
    F: FnOnce(Client, Config, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), Error>>,
{
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
