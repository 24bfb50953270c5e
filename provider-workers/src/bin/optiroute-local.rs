//! The local provider pool worker.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    optiroute_common::cli::main(
        "optiroute-local",
        "local provider worker",
        |client, cfg, shutdown| async move {
            optiroute_providers::run_local(client, &cfg, shutdown)
                .await?
                .wait()
                .await
        },
    )
    .await
}
