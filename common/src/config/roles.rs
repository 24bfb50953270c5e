//! The settings of the NATS service roles: router, local pool and cloud
//! pool. What all three share is declared once (the `service_role!` macro) and read
//! as one [`ServiceSettings`].

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::RoutingConfig;

/// What every NATS service role is configured with, under the same keys in
/// each role's section (`router.max_in_flight`, `local.max_in_flight`...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSettings {
    pub admin_listen: String,
    pub max_in_flight: usize,
    pub max_prompt_bytes: usize,
    pub default_deadline: Duration,
    pub drain_timeout: Duration,
}

/// A role's config struct with the shared fields declared here once, flat
/// beside its own (so the keys stay `section.key` and unknown keys are still
/// refused by name), and [`ServiceSettings`] read from them.
macro_rules! service_role {
    (
        $(#[$attr:meta])*
        pub struct $name:ident {
            $($(#[$fattr:meta])* pub $field:ident : $ty:ty,)*
        }
    ) => {
        $(#[$attr])*
        pub struct $name {
            /// Address of `/metrics`, `/health`, `/ready` (port 0 picks a free one).
            pub admin_listen: String,
            /// Requests served at once by one worker.
            pub max_in_flight: usize,
            /// Largest prompt (or conversation) accepted, in bytes.
            pub max_prompt_bytes: usize,
            /// Deadline used when a direct NATS publisher sends none.
            pub default_deadline_ms: u64,
            /// How long shutdown waits for the requests in flight.
            pub drain_timeout_ms: u64,
            $($(#[$fattr])* pub $field: $ty,)*
        }

        impl $name {
            /// The settings every service role shares.
            pub fn service(&self) -> ServiceSettings {
                ServiceSettings {
                    admin_listen: self.admin_listen.clone(),
                    max_in_flight: self.max_in_flight,
                    max_prompt_bytes: self.max_prompt_bytes,
                    default_deadline: Duration::from_millis(self.default_deadline_ms),
                    drain_timeout: Duration::from_millis(self.drain_timeout_ms),
                }
            }
        }
    };
}

service_role! {
    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct RouterConfig {
        /// Longest a single provider attempt may take; the request deadline still wins.
        pub provider_timeout_ms: u64,
        /// Longest a request may hold a router slot: a later deadline is
        /// clamped to this (the request is served, and ends with 504 if it
        /// needs longer).
        pub max_deadline_ms: u64,
        pub routing: RoutingConfig,
        pub embedding: EmbeddingConfig,
    }
}

/// `[router.embedding]`: the sentence-embedding model the router loads
/// when a feature needs it (the semantic cache, the learned router); one
/// embedding per request serves both.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddingConfig {
    /// all-MiniLM-L6-v2's directory (`scripts/fetch-embed-model.sh`).
    pub model_dir: String,
    /// Embeddings computed at once (each uses one core).
    pub max_concurrent: usize,
}

impl Default for EmbeddingConfig {
    fn default() -> Self {
        EmbeddingConfig {
            model_dir: "models/all-MiniLM-L6-v2".into(),
            max_concurrent: 2,
        }
    }
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            admin_listen: "127.0.0.1:9101".into(),
            max_in_flight: 4096,
            max_prompt_bytes: 32 * 1024,
            provider_timeout_ms: 20_000,
            default_deadline_ms: 30_000,
            max_deadline_ms: 120_000,
            drain_timeout_ms: 10_000,
            routing: RoutingConfig::default(),
            embedding: EmbeddingConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LocalEngineKind {
    /// The original's latency model with a deterministic text.
    #[default]
    Simulated,
    /// Any OpenAI-compatible local server (llama.cpp, vLLM, Ollama, LM Studio).
    Openai,
    /// SmolLM2-135M-Instruct in-process on CPU (`local.embedded`).
    Embedded,
    /// `embedded` when `local.embedded.model_path` exists, else `simulated`.
    Auto,
}

service_role! {
    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct LocalConfig {
        pub engine: LocalEngineKind,
        /// USD per second of compute.
        pub price_per_second: f64,
        pub simulated: SimulatedConfig,
        pub openai: UpstreamConfig,
        pub embedded: EmbeddedConfig,
    }
}

impl LocalConfig {
    /// The engine `auto` stands for here: `embedded` when the model file
    /// exists (relative paths from the working directory), else `simulated`.
    pub fn resolved_engine(&self) -> LocalEngineKind {
        match self.engine {
            LocalEngineKind::Auto if Path::new(&self.embedded.model_path).is_file() => {
                LocalEngineKind::Embedded
            }
            LocalEngineKind::Auto => LocalEngineKind::Simulated,
            other => other,
        }
    }
}

/// The embedded model (`local.engine = "embedded"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedConfig {
    /// GGUF file, relative to the working directory; `scripts/fetch-model.sh` fetches it.
    pub model_path: String,
    /// Sequences decoded together in one batch (continuous batching);
    /// more wait in line until their deadline. 0 = 16.
    pub max_concurrent: usize,
    /// Sequences waiting to join the batch (a sequence that can join at
    /// once never waits); past it requests are refused as overloaded.
    /// 0: no waiting line.
    pub max_queue: usize,
    /// KV cache memory the active sequences may reserve, in MiB (each
    /// reserves its prompt plus `max_tokens` when it joins).
    pub max_kv_cache_mib: usize,
    /// Prompt tokens processed per step (a long prompt is read in chunks
    /// so it never stalls the other sequences for long).
    pub prefill_chunk: usize,
    /// Threads the engine uses for each step; 0 = one per available core.
    pub threads: usize,
    /// 1.0 turns it off.
    pub repeat_penalty: f32,
    /// How many recent tokens the repeat penalty looks at.
    pub repeat_last_n: usize,
    /// Seed for sampled (temperature > 0) answers.
    pub seed: u64,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        EmbeddedConfig {
            model_path: "models/SmolLM2-135M-Instruct.Q4_1.gguf".into(),
            max_concurrent: 0,
            max_queue: 256,
            max_kv_cache_mib: 512,
            prefill_chunk: 64,
            threads: 0,
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            seed: 299_792_458,
        }
    }
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            admin_listen: "127.0.0.1:9102".into(),
            // The embedded model when its file is there, else the simulated engine.
            engine: LocalEngineKind::Auto,
            price_per_second: 0.000005,
            max_in_flight: 256,
            max_prompt_bytes: 32 * 1024,
            default_deadline_ms: 30_000,
            drain_timeout_ms: 10_000,
            simulated: SimulatedConfig::default(),
            openai: UpstreamConfig {
                base_url: "http://127.0.0.1:8080/v1".into(),
                model: "local".into(),
                ..UpstreamConfig::default()
            },
            embedded: EmbeddedConfig::default(),
        }
    }
}

/// The original OptiRoute's "local GPU": a fixed cost plus a cost per token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimulatedConfig {
    pub base_ms: u64,
    pub per_token_ms: u64,
    pub max_ms: u64,
}

impl Default for SimulatedConfig {
    fn default() -> Self {
        SimulatedConfig {
            base_ms: 500,
            per_token_ms: 20,
            max_ms: 5000,
        }
    }
}

/// An OpenAI-compatible chat completions endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    pub base_url: String,
    pub model: String,
    /// API key; for the cloud pool `HF_API_TOKEN` or `OPTIROUTE_CLOUD_API_KEY` fill it.
    pub api_key: Option<String>,
    pub connect_timeout_ms: u64,
    pub timeout_ms: u64,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            base_url: "https://router.huggingface.co/v1".into(),
            model: "meta-llama/Llama-3.1-8B-Instruct".into(),
            api_key: None,
            connect_timeout_ms: 3_000,
            timeout_ms: 20_000,
        }
    }
}

service_role! {
    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct CloudConfig {
        pub upstream: UpstreamConfig,
        /// USD per 1k prompt tokens, for models without an entry in `prices`.
        pub input_price_per_1k: f64,
        /// USD per 1k completion tokens, for models without an entry in `prices`.
        pub output_price_per_1k: f64,
        /// Per-model prices.
        pub prices: BTreeMap<String, ModelPrice>,
        pub breaker: BreakerConfig,
    }
}

impl Default for CloudConfig {
    fn default() -> Self {
        CloudConfig {
            admin_listen: "127.0.0.1:9103".into(),
            upstream: UpstreamConfig::default(),
            input_price_per_1k: 0.0002,
            output_price_per_1k: 0.0002,
            prices: BTreeMap::new(),
            breaker: BreakerConfig::default(),
            max_in_flight: 1024,
            max_prompt_bytes: 32 * 1024,
            default_deadline_ms: 30_000,
            drain_timeout_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    pub input_per_1k: f64,
    pub output_per_1k: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker.
    pub failure_threshold: u32,
    /// How long the breaker stays open before one probe is let through.
    pub open_ms: u64,
    /// Longest the breaker stays open, whatever an upstream's `Retry-After` asks.
    pub max_open_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: 3,
            open_ms: 30_000,
            max_open_ms: 600_000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::*;

    #[test]
    fn every_service_role_reads_its_shared_keys() {
        let set = |k: &str, v: &str| (k.to_string(), v.to_string());
        let c = Config::from_parts(
            None,
            &[],
            &[
                set("router.max_in_flight", "7"),
                set("local.default_deadline_ms", "1500"),
                set("cloud.drain_timeout_ms", "250"),
                set("cloud.admin_listen", "127.0.0.1:0"),
            ],
        )
        .unwrap();
        assert_eq!(c.router.service().max_in_flight, 7);
        assert_eq!(
            c.local.service().default_deadline,
            Duration::from_millis(1500)
        );
        let cloud = c.cloud.service();
        assert_eq!(cloud.drain_timeout, Duration::from_millis(250));
        assert_eq!(cloud.admin_listen, "127.0.0.1:0");
        assert_eq!(cloud.max_prompt_bytes, 32 * 1024);
        // A misspelt shared key is still refused by name.
        let e = Config::from_parts(None, &[], &[set("local.max_inflight", "7")]).unwrap_err();
        assert!(e.message.contains("max_inflight"), "{}", e.message);
    }
}
