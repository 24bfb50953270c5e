//! The router worker.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    optiroute_common::cli::main(
        "optiroute-router",
        "router worker: cache, routing, fallback",
        |client, cfg, shutdown| async move {
            optiroute_router::run(client, &cfg, shutdown)
                .await?
                .wait()
                .await
        },
    )
    .await
}
