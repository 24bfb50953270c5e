//! [`GenParams`]: what to generate and how, the part every generate request
//! and every provider request share, with its one validation.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::Error;

/// Limits every entry point enforces on a generate request.
pub const MAX_TOKENS_LIMIT: u32 = 4096;
pub const DEFAULT_MAX_TOKENS: u32 = 100;
pub const MAX_MODEL_ID_BYTES: usize = 256;
/// Most stop sequences a request may carry (OpenAI's limit).
pub const MAX_STOP_SEQUENCES: usize = 4;
pub const MAX_MESSAGES: usize = 256;

/// A chat turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

impl ChatMessage {
    pub fn user(content: impl Into<String>) -> Self {
        ChatMessage {
            role: Role::User,
            content: content.into(),
        }
    }
}

/// The prompt (or conversation) and the sampling parameters: the body of a
/// request on a provider subject, and the same fields of a generate
/// request. Unknown fields are ignored, as the original Python service did.
///
/// Its fields sit beside those of the request that holds it (serde's
/// `flatten` layout). Decoding reads them from the holder's own map with
/// [`GenParams::read_field`] rather than through `flatten`, which would
/// buffer the whole body first and lose the name of a bad field.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenParams {
    pub prompt: String,
    /// A conversation, instead of `prompt`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<ChatMessage>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    pub max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
}

impl GenParams {
    /// How many fields [`GenParams::serialize_fields`] writes (the derived
    /// `Serialize` skips the same ones).
    pub(crate) fn field_count(&self) -> usize {
        2 + usize::from(!self.messages.is_empty())
            + usize::from(!self.stop.is_empty())
            + usize::from(self.model_id.is_some())
            + usize::from(self.temperature.is_some())
            + usize::from(self.top_p.is_some())
    }

    /// Writes the fields into a struct another type is serializing, so that
    /// type has a known length (a flattened struct makes MessagePack buffer
    /// the whole map and copy it).
    pub(crate) fn serialize_fields<S: serde::ser::SerializeStruct>(
        &self,
        s: &mut S,
    ) -> Result<(), S::Error> {
        s.serialize_field("prompt", &self.prompt)?;
        if !self.messages.is_empty() {
            s.serialize_field("messages", &self.messages)?;
        }
        if !self.stop.is_empty() {
            s.serialize_field("stop", &self.stop)?;
        }
        s.serialize_field("max_tokens", &self.max_tokens)?;
        if let Some(v) = &self.model_id {
            s.serialize_field("model_id", v)?;
        }
        if let Some(v) = &self.temperature {
            s.serialize_field("temperature", v)?;
        }
        if let Some(v) = &self.top_p {
            s.serialize_field("top_p", v)?;
        }
        Ok(())
    }
}

impl Default for GenParams {
    fn default() -> Self {
        GenParams {
            prompt: String::new(),
            messages: Vec::new(),
            stop: Vec::new(),
            max_tokens: DEFAULT_MAX_TOKENS,
            model_id: None,
            temperature: None,
            top_p: None,
        }
    }
}

/// Which of a struct's fields a map has given already, so a repeated one is
/// refused as serde's derive refuses it.
#[derive(Default)]
pub(crate) struct Seen(u32);

impl Seen {
    /// Marks field number `bit` (below 32); an error if it came before.
    pub(crate) fn mark<E: de::Error>(&mut self, bit: u32, name: &'static str) -> Result<(), E> {
        if self.0 & (1 << bit) != 0 {
            return Err(E::duplicate_field(name));
        }
        self.0 |= 1 << bit;
        Ok(())
    }
}

/// A map key, borrowed from the body when it can be.
pub(crate) struct Key<'de>(pub Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
            fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<Key<'de>, E> {
                Ok(Key(String::from_utf8_lossy(v)))
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(String::from_utf8_lossy(v).into_owned())))
            }
            // A number is no field name of ours: its value is skipped.
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed("")))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed("")))
            }
        }
        d.deserialize_identifier(V)
    }
}

/// Field numbers 0..7 of [`Seen`] belong to [`GenParams`]; a holder numbers its own from here.
pub(crate) const FIRST_HOLDER_FIELD: u32 = 7;

impl GenParams {
    pub fn new(prompt: impl Into<String>) -> Self {
        GenParams {
            prompt: prompt.into(),
            ..GenParams::default()
        }
    }

    /// Reads the value of `key` from `map` when `key` names one of these
    /// fields (and says so); leaves it unread otherwise.
    pub(crate) fn read_field<'de, A: MapAccess<'de>>(
        &mut self,
        key: &str,
        seen: &mut Seen,
        map: &mut A,
    ) -> Result<bool, A::Error> {
        match key {
            "prompt" => {
                seen.mark(0, "prompt")?;
                self.prompt = map.next_value()?;
            }
            "messages" => {
                seen.mark(1, "messages")?;
                self.messages = map.next_value()?;
            }
            "stop" => {
                seen.mark(2, "stop")?;
                self.stop = map.next_value()?;
            }
            "max_tokens" => {
                seen.mark(3, "max_tokens")?;
                self.max_tokens = map.next_value()?;
            }
            "model_id" => {
                seen.mark(4, "model_id")?;
                self.model_id = map.next_value()?;
            }
            "temperature" => {
                seen.mark(5, "temperature")?;
                self.temperature = map.next_value()?;
            }
            "top_p" => {
                seen.mark(6, "top_p")?;
                self.top_p = map.next_value()?;
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The text that routing and the simulated engine look at: the prompt,
    /// or the conversation's contents joined by newlines.
    pub fn text(&self) -> Cow<'_, str> {
        if self.messages.is_empty() {
            Cow::Borrowed(&self.prompt)
        } else {
            Cow::Owned(
                self.messages
                    .iter()
                    .map(|m| m.content.as_str())
                    .collect::<Vec<_>>()
                    .join("\n"),
            )
        }
    }

    /// The conversation to send to a chat model.
    pub fn conversation(&self) -> Cow<'_, [ChatMessage]> {
        if self.messages.is_empty() {
            Cow::Owned(vec![ChatMessage::user(self.prompt.clone())])
        } else {
            Cow::Borrowed(&self.messages)
        }
    }

    /// The last user turn (what a model without chat history answers).
    pub fn last_user_text(&self) -> &str {
        self.messages
            .iter()
            .rev()
            .find(|m| m.role == Role::User)
            .map_or(self.prompt.as_str(), |m| m.content.as_str())
    }

    /// Checks every field; the error names the field.
    pub fn validate(&self, max_prompt_bytes: usize) -> Result<(), Error> {
        validate_input(&self.prompt, &self.messages, max_prompt_bytes)?;
        validate_stop(&self.stop)?;
        validate_max_tokens(self.max_tokens)?;
        validate_sampling(self.temperature, self.top_p)?;
        if let Some(m) = &self.model_id {
            validate_model_id(m)?;
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for GenParams {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = GenParams;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("struct GenParams")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<GenParams, A::Error> {
                let mut params = GenParams::default();
                let mut seen = Seen::default();
                while let Some(Key(key)) = map.next_key()? {
                    if !params.read_field(&key, &mut seen, &mut map)? {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(params)
            }
        }
        d.deserialize_map(V)
    }
}

/// Exactly one of `prompt` and `messages`, within the size limit.
pub fn validate_input(
    prompt: &str,
    messages: &[ChatMessage],
    max_prompt_bytes: usize,
) -> Result<(), Error> {
    if messages.is_empty() {
        return validate_prompt(prompt, max_prompt_bytes);
    }
    if !prompt.is_empty() {
        return Err(Error::bad_param(
            "messages",
            "give either prompt or messages, not both",
        ));
    }
    if messages.len() > MAX_MESSAGES {
        return Err(Error::bad_param(
            "messages",
            format!(
                "messages has {} entries, over the limit of {MAX_MESSAGES}",
                messages.len()
            ),
        ));
    }
    if !messages
        .iter()
        .any(|m| m.role == Role::User && !m.content.trim().is_empty())
    {
        return Err(Error::bad_param(
            "messages",
            "messages must contain a user message with non-empty content",
        ));
    }
    let total: usize = messages.iter().map(|m| m.content.len()).sum();
    if total > max_prompt_bytes {
        return Err(Error::bad_param(
            "messages",
            format!("messages total {total} bytes, over the limit of {max_prompt_bytes} bytes"),
        ));
    }
    Ok(())
}

pub fn validate_stop(stop: &[String]) -> Result<(), Error> {
    if stop.len() > MAX_STOP_SEQUENCES {
        return Err(Error::bad_param(
            "stop",
            format!("stop takes at most {MAX_STOP_SEQUENCES} sequences"),
        ));
    }
    if stop.iter().any(|s| s.is_empty() || s.len() > 256) {
        return Err(Error::bad_param(
            "stop",
            "stop sequences must be 1 to 256 bytes",
        ));
    }
    Ok(())
}

pub fn validate_prompt(prompt: &str, max_prompt_bytes: usize) -> Result<(), Error> {
    if prompt.trim().is_empty() {
        return Err(Error::bad_param(
            "prompt",
            "prompt must not be empty or whitespace",
        ));
    }
    if prompt.len() > max_prompt_bytes {
        return Err(Error::bad_param(
            "prompt",
            format!(
                "prompt is {} bytes, over the limit of {max_prompt_bytes} bytes",
                prompt.len()
            ),
        ));
    }
    Ok(())
}

pub fn validate_max_tokens(max_tokens: u32) -> Result<(), Error> {
    if !(1..=MAX_TOKENS_LIMIT).contains(&max_tokens) {
        return Err(Error::bad_param(
            "max_tokens",
            format!("max_tokens must be between 1 and {MAX_TOKENS_LIMIT}, got {max_tokens}"),
        ));
    }
    Ok(())
}

pub fn validate_sampling(temperature: Option<f32>, top_p: Option<f32>) -> Result<(), Error> {
    if let Some(t) = temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(Error::bad_param(
                "temperature",
                format!("temperature must be between 0 and 2, got {t}"),
            ));
        }
    }
    if let Some(p) = top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(Error::bad_param(
                "top_p",
                format!("top_p must be in (0, 1], got {p}"),
            ));
        }
    }
    Ok(())
}

pub fn validate_model_id(model_id: &str) -> Result<(), Error> {
    if model_id.is_empty() || model_id.len() > MAX_MODEL_ID_BYTES {
        return Err(Error::bad_param(
            "model_id",
            format!("model_id must be 1 to {MAX_MODEL_ID_BYTES} bytes"),
        ));
    }
    if model_id
        .chars()
        .any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(Error::bad_param(
            "model_id",
            "model_id must not contain whitespace or control characters",
        ));
    }
    Ok(())
}
