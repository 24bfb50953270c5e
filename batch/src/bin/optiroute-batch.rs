//! The batch worker.

fn main() -> std::process::ExitCode {
    optiroute_common::cli::main(
        "optiroute-batch",
        "batch worker: JetStream work queue through the router path",
        optiroute_batch::process,
    )
}
