//! The cloud provider pool worker.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    optiroute_common::cli::main(
        "optiroute-cloud",
        "cloud provider worker",
        |client, cfg, shutdown| async move {
            optiroute_providers::run_cloud(client, &cfg, shutdown)
                .await?
                .wait()
                .await
        },
    )
    .await
}
