//! `optiroute`: the project's command-line tool. Each subcommand lives in
//! its own module; this file only dispatches.

mod accounts;
mod args;
mod batch;
mod fake_upstream;
mod floor;
mod loadtest;
mod spend;

const USAGE: &str = "usage: optiroute <command> [options]
commands:
  loadtest        drive POST /generate and report latency, throughput, cache, routing and cost
  batch           submit a JSONL batch, watch it, fetch its results, cancel it
  fake-upstream   a fast fixed-answer OpenAI-compatible server for benchmarks
  keys            API keys through the admin API: create, list, show, update, revoke
  teams           teams through the admin API: create, list, show, update, delete
  spend           export the spend records (one JSON line each) from NATS
  floor           the bare HTTP → NATS → reply path without OptiRoute (bench/floor.sh)
  help            this help (`optiroute <command> --help` for a command's options)";

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let mut argv = std::env::args().skip(1);
    let command = argv.next();
    let rest: Vec<String> = argv.collect();
    match command.as_deref() {
        Some("loadtest") => loadtest::main(rest).await,
        Some("batch") => batch::main(rest).await,
        Some("fake-upstream") => fake_upstream::main(rest).await,
        Some("floor") => floor::main(rest).await,
        Some("keys") => accounts::keys(rest).await,
        Some("teams") => accounts::teams(rest).await,
        Some("spend") => spend::main(rest).await,
        None | Some("help" | "-h" | "--help") => {
            println!("{USAGE}");
            std::process::ExitCode::SUCCESS
        }
        Some(other) => {
            eprintln!("optiroute: unknown command `{other}`\n{USAGE}");
            std::process::ExitCode::from(2)
        }
    }
}
