//! The router worker.

fn main() -> std::process::ExitCode {
    optiroute_common::cli::main(
        "optiroute-router",
        "router worker: cache, routing, fallback",
        optiroute_router::process,
    )
}
