//! The HTTP ingress.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    optiroute_common::cli::main(
        "optiroute-ingress",
        "HTTP ingress",
        |client, cfg, shutdown| async move {
            optiroute_ingress::run(client, &cfg, shutdown)
                .await?
                .wait()
                .await
        },
    )
    .await
}
