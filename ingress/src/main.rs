//! The HTTP ingress.

fn main() -> std::process::ExitCode {
    optiroute_common::cli::main(
        "optiroute-ingress",
        "HTTP ingress",
        optiroute_ingress::process,
    )
}
