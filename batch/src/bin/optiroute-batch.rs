//! The batch worker.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    optiroute_common::cli::main(
        "optiroute-batch",
        "batch worker: JetStream work queue through the router path",
        |client, cfg, shutdown| async move {
            optiroute_batch::run(client, &cfg, shutdown)
                .await?
                .wait()
                .await
        },
    )
    .await
}
