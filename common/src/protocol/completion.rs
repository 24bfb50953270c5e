//! [`Completion`]: one generated answer (text, usage, model, finish reason),
//! carried unchanged from the provider's reply through the cache entry to
//! the answer a caller reads.

use serde::de::{self, MapAccess};
use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize};

use super::params::Seen;

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

/// A [`Completion`] read one field at a time from the map of the message
/// that carries it, as [`super::params::GenParams`] is: no buffering of the
/// body (the hot path decodes every answer), and the field's name in errors.
#[derive(Default)]
pub(crate) struct CompletionFields {
    text: Option<String>,
    usage: Option<Usage>,
    model: Option<String>,
    finish_reason: Option<String>,
}

/// Field numbers 0..4 of [`Seen`] belong to [`Completion`]; a holder numbers its own from here.
pub(crate) const FIRST_HOLDER_FIELD: u32 = 4;

impl CompletionFields {
    /// Reads the value of `key` when it is one of a completion's fields.
    pub(crate) fn read_field<'de, A: MapAccess<'de>>(
        &mut self,
        key: &str,
        seen: &mut Seen,
        map: &mut A,
    ) -> Result<bool, A::Error> {
        match key {
            "text" => {
                seen.mark(0, "text")?;
                self.text = Some(map.next_value()?);
            }
            "usage" => {
                seen.mark(1, "usage")?;
                self.usage = Some(map.next_value()?);
            }
            "model" => {
                seen.mark(2, "model")?;
                self.model = Some(map.next_value()?);
            }
            "finish_reason" => {
                seen.mark(3, "finish_reason")?;
                self.finish_reason = map.next_value()?;
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    pub(crate) fn finish<E: de::Error>(self) -> Result<Completion, E> {
        Ok(Completion {
            text: self.text.ok_or_else(|| E::missing_field("text"))?,
            usage: self.usage.ok_or_else(|| E::missing_field("usage"))?,
            model: self.model.ok_or_else(|| E::missing_field("model"))?,
            finish_reason: self.finish_reason,
        })
    }
}

impl Completion {
    /// How many fields [`Self::serialize_fields`] writes.
    pub(crate) fn field_count(&self) -> usize {
        3 + usize::from(self.finish_reason.is_some())
    }

    /// Writes the fields into the struct that carries the completion.
    pub(crate) fn serialize_fields<S: SerializeStruct>(&self, s: &mut S) -> Result<(), S::Error> {
        s.serialize_field("text", &self.text)?;
        s.serialize_field("usage", &self.usage)?;
        s.serialize_field("model", &self.model)?;
        if let Some(f) = &self.finish_reason {
            s.serialize_field("finish_reason", f)?;
        }
        Ok(())
    }
}
