//! The real model for the tests, fetched by `scripts/fetch-embed-model.sh`
//! on first use (idempotent, quiet when the files are there). A failed
//! fetch fails the test with the script's output: the tests never pass
//! without having run the model.
#![allow(clippy::unwrap_used, dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use optiroute_embed::{Embedder, DEFAULT_MODEL_DIR};

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn model_dir() -> PathBuf {
    static FETCHED: OnceLock<PathBuf> = OnceLock::new();
    FETCHED
        .get_or_init(|| {
            let out = std::process::Command::new("bash")
                .arg(root().join("scripts/fetch-embed-model.sh"))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "scripts/fetch-embed-model.sh failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            root().join(DEFAULT_MODEL_DIR)
        })
        .clone()
}

pub fn embedder() -> &'static Embedder {
    static MODEL: OnceLock<Embedder> = OnceLock::new();
    MODEL.get_or_init(|| Embedder::load(model_dir()).unwrap())
}
