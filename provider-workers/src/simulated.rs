//! The original OptiRoute's "local GPU": a fixed delay plus a delay per
//! generated token, with a deterministic text. Replies say
//! `model: "simulated"` so nobody mistakes them for a real answer.

use std::time::Duration;

use optiroute_common::config::SimulatedConfig;
use optiroute_common::cost::estimate_tokens;
use optiroute_common::nats::RequestMeta;
use optiroute_common::wire::{ProviderRequest, Usage};
use optiroute_common::{Error, ErrorKind};
use sha2::{Digest, Sha256};

use crate::engine::{ChunkSink, Engine, Generation};

pub use optiroute_common::protocol::models::SIMULATED_MODEL;

const WORDS: &[&str] = &[
    "answer", "local", "model", "cheap", "fast", "route", "token", "reply", "simple", "short",
    "clear", "helpful", "brief", "plain", "ready", "done",
];

pub struct SimulatedEngine {
    cfg: SimulatedConfig,
}

impl SimulatedEngine {
    pub fn new(cfg: SimulatedConfig) -> Self {
        SimulatedEngine { cfg }
    }

    /// How many tokens the simulated model "generates" for a request.
    pub fn completion_tokens(max_tokens: u32) -> u32 {
        max_tokens.min(16)
    }

    /// The delay the latency model gives for `tokens` generated tokens.
    pub fn latency(&self, tokens: u32) -> Duration {
        let ms = self.cfg.base_ms + self.cfg.per_token_ms * u64::from(tokens);
        Duration::from_millis(ms.min(self.cfg.max_ms))
    }

    /// A deterministic text of `tokens` words derived from the prompt.
    pub fn text(prompt: &str, tokens: u32) -> String {
        let digest = Sha256::digest(prompt.trim().as_bytes());
        let mut out = String::from("[simulated]");
        for i in 0..tokens as usize {
            out.push(' ');
            out.push_str(WORDS[usize::from(digest[i % digest.len()]) % WORDS.len()]);
        }
        out
    }
}

impl SimulatedEngine {
    fn generation(req: &ProviderRequest, tokens: u32) -> Generation {
        Generation {
            text: Self::text(req.last_user_text(), tokens),
            usage: Usage::new(
                estimate_tokens(
                    &req.conversation()
                        .iter()
                        .map(|m| m.content.as_str())
                        .collect::<String>(),
                ),
                tokens,
                true,
            ),
            model: SIMULATED_MODEL.to_string(),
            finish_reason: Some(
                if tokens < req.max_tokens {
                    "stop"
                } else {
                    "length"
                }
                .to_string(),
            ),
            compute_seconds: None,
        }
    }
}

impl Engine for SimulatedEngine {
    /// The latency model; when streaming, paid token by token: the fixed
    /// part before the first token, then one word per token.
    async fn generate(
        &self,
        meta: &RequestMeta,
        req: &ProviderRequest,
        sink: Option<&mut ChunkSink>,
    ) -> Result<Generation, Error> {
        let tokens = Self::completion_tokens(req.max_tokens);
        let delay = self.latency(tokens);
        if delay > meta.remaining() {
            tokio::time::sleep(meta.remaining()).await;
            return Err(Error::new(
                ErrorKind::Timeout,
                "the deadline passed during generation",
            ));
        }
        let g = Self::generation(req, tokens);
        let Some(sink) = sink else {
            // tokio rounds a zero sleep up to its next millisecond tick.
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            return Ok(g);
        };
        let first = self.latency(0);
        let per_token = delay.saturating_sub(first) / tokens.max(1);
        tokio::time::sleep(first).await;
        for (i, word) in g.text.split(' ').enumerate() {
            if i > 0 {
                tokio::time::sleep(per_token).await;
            }
            let piece = if i == 0 {
                word.to_string()
            } else {
                format!(" {word}")
            };
            sink.send(&piece).await?;
        }
        Ok(g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_model_is_the_originals_and_capped() {
        let e = SimulatedEngine::new(SimulatedConfig::default());
        assert_eq!(e.latency(10), Duration::from_millis(700));
        assert_eq!(e.latency(1000), Duration::from_millis(5000));
    }

    #[test]
    fn text_is_deterministic_and_sized() {
        let a = SimulatedEngine::text("hi", 5);
        assert_eq!(a, SimulatedEngine::text("  hi ", 5));
        assert_eq!(a.split(' ').count(), 6);
        assert_ne!(a, SimulatedEngine::text("bye", 5));
    }

    #[tokio::test(start_paused = true)]
    async fn generation_takes_the_modelled_time() {
        let e = SimulatedEngine::new(SimulatedConfig::default());
        let meta = RequestMeta::new("t".into(), Duration::from_secs(10));
        let mut req = ProviderRequest::new("hello");
        req.max_tokens = 4;
        let start = tokio::time::Instant::now();
        let g = e.generate(&meta, &req, None).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(580));
        assert_eq!(g.usage.completion_tokens, 4);
        assert_eq!(g.model, "simulated");
        assert_eq!(g.finish_reason.as_deref(), Some("length"));
    }
}
