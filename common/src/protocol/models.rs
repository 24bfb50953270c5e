//! The model catalogue: which model names each pool answers with.

use crate::config::{CloudConfig, Config, LocalEngineKind};

/// The name the simulated local engine answers with, so nobody mistakes
/// its text for a real model's.
pub const SIMULATED_MODEL: &str = "simulated";
/// The name the embedded local engine answers with (the local-model crate's
/// `MODEL_NAME`; a provider-workers test keeps the two equal).
pub const EMBEDDED_MODEL: &str = "SmolLM2-135M-Instruct";

/// Model names the local pool may answer with under `cfg`.
pub fn local_models(cfg: &Config) -> Vec<String> {
    match cfg.local.engine {
        LocalEngineKind::Simulated => vec![SIMULATED_MODEL.to_string()],
        LocalEngineKind::Openai => vec![cfg.local.openai.model.clone()],
        LocalEngineKind::Embedded => vec![EMBEDDED_MODEL.to_string()],
        // Which one runs is decided by the local worker at startup.
        LocalEngineKind::Auto => vec![EMBEDDED_MODEL.to_string(), SIMULATED_MODEL.to_string()],
    }
}

impl CloudConfig {
    /// Models a caller may name for the cloud pool: the configured one
    /// first, then those with prices. Anything else is refused, which also
    /// keeps metric labels bounded.
    pub fn models(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.upstream.model.as_str()).chain(self.prices.keys().map(String::as_str))
    }

    /// Whether `model` is one of [`Self::models`].
    pub fn allows_model(&self, model: &str) -> bool {
        model == self.upstream.model || self.prices.contains_key(model)
    }
}
