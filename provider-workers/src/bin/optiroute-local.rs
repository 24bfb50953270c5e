//! The local provider pool worker.

fn main() -> std::process::ExitCode {
    optiroute_common::cli::main(
        "optiroute-local",
        "local provider worker",
        optiroute_providers::local_process,
    )
}
