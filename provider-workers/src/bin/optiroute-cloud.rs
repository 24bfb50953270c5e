//! The cloud provider pool worker.

fn main() -> std::process::ExitCode {
    optiroute_common::cli::main(
        "optiroute-cloud",
        "cloud provider worker",
        optiroute_providers::cloud_process,
    )
}
