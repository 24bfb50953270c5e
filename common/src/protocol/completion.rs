//! [`Completion`]: one generated answer (text, usage, model, finish reason),
//! carried unchanged from the provider's reply through the cache entry to
//! the answer a caller reads.

use serde::{Deserialize, Serialize};

/// Token counts, as OpenAI reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    /// True when the counts are estimated rather than reported by the model.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub estimated: bool,
}

impl Usage {
    /// The total saturates: counts come from outside (an upstream's reply).
    pub fn new(prompt_tokens: u32, completion_tokens: u32, estimated: bool) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
            estimated,
        }
    }
}

/// What a model generated. Its fields sit beside those of the message that
/// carries it (`#[serde(flatten)]`), so every reply keeps the field names
/// it always had.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    pub text: String,
    pub usage: Usage,
    pub model: String,
    /// `stop` or `length`, as OpenAI reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
}
