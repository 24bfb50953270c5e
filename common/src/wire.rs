//! Wire types and their codec.
//!
//! MessagePack with named fields (so fields can be added later) is the default
//! body; a message whose `Content-Type` header is `application/json` is read as
//! JSON and answered in JSON, so any NATS client can publish directly.

use async_nats::HeaderMap;
use bytes::Bytes;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::error::Error;

/// Header carrying the request id made at the ingress (`x-request-id` on HTTP).
pub const REQUEST_ID_HEADER: &str = "Optiroute-Request-Id";
/// Header carrying the request's absolute deadline, in Unix epoch milliseconds.
pub const DEADLINE_HEADER: &str = "Optiroute-Deadline";
/// Header naming the subject where the provider publishes [`StreamChunk`]s as
/// tokens are generated; the final reply still carries the whole answer.
/// The requester publishes anything on `<inbox>.cancel` to stop generation.
pub const STREAM_INBOX_HEADER: &str = "Optiroute-Stream-Inbox";
pub const CONTENT_TYPE_HEADER: &str = "Content-Type";
pub const JSON_CONTENT_TYPE: &str = "application/json";
pub const MSGPACK_CONTENT_TYPE: &str = "application/msgpack";

/// Limits every entry point enforces on a generate request.
pub const MAX_TOKENS_LIMIT: u32 = 4096;
pub const DEFAULT_MAX_TOKENS: u32 = 100;
pub const MAX_MODEL_ID_BYTES: usize = 256;

/// A provider pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    Local,
    Cloud,
}

impl Pool {
    pub fn as_str(self) -> &'static str {
        match self {
            Pool::Local => "local",
            Pool::Cloud => "cloud",
        }
    }

    pub fn other(self) -> Pool {
        match self {
            Pool::Local => Pool::Cloud,
            Pool::Cloud => Pool::Local,
        }
    }
}

/// The provider a caller asks for. `huggingface` is the original OptiRoute's
/// name for the cloud pool and is accepted as an alias.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderChoice {
    #[default]
    Auto,
    Local,
    #[serde(alias = "huggingface")]
    Cloud,
}

impl ProviderChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderChoice::Auto => "auto",
            ProviderChoice::Local => "local",
            ProviderChoice::Cloud => "cloud",
        }
    }
}

/// Per-request cache control.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheMode {
    #[default]
    On,
    Off,
    ReadOnly,
    WriteOnly,
}

impl CacheMode {
    pub fn reads(self) -> bool {
        matches!(self, CacheMode::On | CacheMode::ReadOnly)
    }
    pub fn writes(self) -> bool {
        matches!(self, CacheMode::On | CacheMode::WriteOnly)
    }
}

fn default_max_tokens() -> u32 {
    DEFAULT_MAX_TOKENS
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

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

/// Most stop sequences a request may carry (OpenAI's limit).
pub const MAX_STOP_SEQUENCES: usize = 4;
pub const MAX_MESSAGES: usize = 256;

/// The body of `POST /generate` and of a request on `optiroute.generate`:
/// either `prompt` or `messages`. Unknown fields are ignored, as the
/// original Python service did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    #[serde(default)]
    pub prompt: String,
    /// A conversation, instead of `prompt`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<ChatMessage>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
    #[serde(default)]
    pub provider: ProviderChoice,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub cache: CacheMode,
    /// Shifts the routing threshold: -1 prefers cheaper, +1 prefers better.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_bias: Option<f32>,
}

impl GenerateRequest {
    pub fn new(prompt: impl Into<String>) -> Self {
        GenerateRequest {
            prompt: prompt.into(),
            messages: Vec::new(),
            stop: Vec::new(),
            max_tokens: DEFAULT_MAX_TOKENS,
            provider: ProviderChoice::Auto,
            model_id: None,
            temperature: None,
            top_p: None,
            cache: CacheMode::On,
            route_bias: None,
        }
    }

    /// The text that routing and the simulated engine look at: the prompt,
    /// or the conversation's contents joined by newlines.
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        if self.messages.is_empty() {
            std::borrow::Cow::Borrowed(&self.prompt)
        } else {
            std::borrow::Cow::Owned(
                self.messages
                    .iter()
                    .map(|m| m.content.as_str())
                    .collect::<Vec<_>>()
                    .join("\n"),
            )
        }
    }

    /// Checks every user-settable field; the message names the field.
    pub fn validate(&self, max_prompt_bytes: usize) -> Result<(), Error> {
        validate_input(&self.prompt, &self.messages, max_prompt_bytes)?;
        validate_stop(&self.stop)?;
        validate_max_tokens(self.max_tokens)?;
        validate_sampling(self.temperature, self.top_p)?;
        if let Some(m) = &self.model_id {
            validate_model_id(m)?;
        }
        if let Some(b) = self.route_bias {
            if !(-1.0..=1.0).contains(&b) {
                return Err(Error::bad_request(format!(
                    "route_bias must be between -1 and 1, got {b}"
                )));
            }
        }
        Ok(())
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
        return Err(Error::bad_request(
            "give either prompt or messages, not both",
        ));
    }
    if messages.len() > MAX_MESSAGES {
        return Err(Error::bad_request(format!(
            "messages has {} entries, over the limit of {MAX_MESSAGES}",
            messages.len()
        )));
    }
    if !messages
        .iter()
        .any(|m| m.role == Role::User && !m.content.trim().is_empty())
    {
        return Err(Error::bad_request(
            "messages must contain a user message with non-empty content",
        ));
    }
    let total: usize = messages.iter().map(|m| m.content.len()).sum();
    if total > max_prompt_bytes {
        return Err(Error::bad_request(format!(
            "messages total {total} bytes, over the limit of {max_prompt_bytes} bytes"
        )));
    }
    Ok(())
}

pub fn validate_stop(stop: &[String]) -> Result<(), Error> {
    if stop.len() > MAX_STOP_SEQUENCES {
        return Err(Error::bad_request(format!(
            "stop takes at most {MAX_STOP_SEQUENCES} sequences"
        )));
    }
    if stop.iter().any(|s| s.is_empty() || s.len() > 256) {
        return Err(Error::bad_request("stop sequences must be 1 to 256 bytes"));
    }
    Ok(())
}

pub fn validate_prompt(prompt: &str, max_prompt_bytes: usize) -> Result<(), Error> {
    if prompt.trim().is_empty() {
        return Err(Error::bad_request("prompt must not be empty or whitespace"));
    }
    if prompt.len() > max_prompt_bytes {
        return Err(Error::bad_request(format!(
            "prompt is {} bytes, over the limit of {max_prompt_bytes} bytes",
            prompt.len()
        )));
    }
    Ok(())
}

pub fn validate_max_tokens(max_tokens: u32) -> Result<(), Error> {
    if !(1..=MAX_TOKENS_LIMIT).contains(&max_tokens) {
        return Err(Error::bad_request(format!(
            "max_tokens must be between 1 and {MAX_TOKENS_LIMIT}, got {max_tokens}"
        )));
    }
    Ok(())
}

pub fn validate_sampling(temperature: Option<f32>, top_p: Option<f32>) -> Result<(), Error> {
    if let Some(t) = temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(Error::bad_request(format!(
                "temperature must be between 0 and 2, got {t}"
            )));
        }
    }
    if let Some(p) = top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(Error::bad_request(format!(
                "top_p must be in (0, 1], got {p}"
            )));
        }
    }
    Ok(())
}

pub fn validate_model_id(model_id: &str) -> Result<(), Error> {
    if model_id.is_empty() || model_id.len() > MAX_MODEL_ID_BYTES {
        return Err(Error::bad_request(format!(
            "model_id must be 1 to {MAX_MODEL_ID_BYTES} bytes"
        )));
    }
    if model_id
        .chars()
        .any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(Error::bad_request(
            "model_id must not contain whitespace or control characters",
        ));
    }
    Ok(())
}

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

/// The answer to a generate request (also the body of `POST /generate`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateResponse {
    pub text: String,
    pub usage: Usage,
    /// Cost of this request in USD (0 for a cache hit).
    pub cost: f64,
    /// Seconds from the router receiving the request to its reply.
    pub latency: f64,
    pub model: String,
    /// The pool the routing decision picked.
    pub routed_to: Pool,
    /// The pool that actually answered.
    pub provider: Pool,
    pub cached: bool,
    /// Why the answer came from the other pool, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_reason: Option<crate::ErrorKind>,
    /// Short explanation of the routing decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// `stop` or `length`, as OpenAI reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
}

/// A request on a provider subject: `prompt` or `messages`, as for generate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProviderRequest {
    #[serde(default)]
    pub prompt: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<ChatMessage>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
}

impl ProviderRequest {
    pub fn new(prompt: impl Into<String>) -> Self {
        ProviderRequest::from(&GenerateRequest::new(prompt))
    }

    /// The conversation to send to a chat model.
    pub fn conversation(&self) -> std::borrow::Cow<'_, [ChatMessage]> {
        if self.messages.is_empty() {
            std::borrow::Cow::Owned(vec![ChatMessage::user(self.prompt.clone())])
        } else {
            std::borrow::Cow::Borrowed(&self.messages)
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

impl From<&GenerateRequest> for ProviderRequest {
    fn from(r: &GenerateRequest) -> Self {
        ProviderRequest {
            prompt: r.prompt.clone(),
            messages: r.messages.clone(),
            stop: r.stop.clone(),
            max_tokens: r.max_tokens,
            model_id: r.model_id.clone(),
            temperature: r.temperature,
            top_p: r.top_p,
        }
    }
}

/// A provider worker's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProviderReply {
    pub text: String,
    pub usage: Usage,
    pub model: String,
    pub cost_usd: f64,
    /// Seconds the provider spent on the request.
    pub latency: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
}

/// One piece of a streamed answer, published on the stream inbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamChunk {
    /// 0, 1, 2... so the receiver can spot gaps.
    pub index: u32,
    pub delta: String,
}

/// Body format of a NATS message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    MsgPack,
    Json,
}

impl Format {
    /// JSON when the message says `Content-Type: application/json`, else MessagePack.
    pub fn from_headers(headers: Option<&HeaderMap>) -> Format {
        let is_json = headers
            .and_then(|h| h.get(CONTENT_TYPE_HEADER))
            .map(|v| {
                let v = v.as_str();
                v.split(';')
                    .next()
                    .is_some_and(|t| t.trim().eq_ignore_ascii_case(JSON_CONTENT_TYPE))
            })
            .unwrap_or(false);
        if is_json {
            Format::Json
        } else {
            Format::MsgPack
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::MsgPack => MSGPACK_CONTENT_TYPE,
            Format::Json => JSON_CONTENT_TYPE,
        }
    }
}

pub fn encode<T: Serialize>(format: Format, value: &T) -> Result<Bytes, Error> {
    let bytes = match format {
        Format::MsgPack => rmp_serde::to_vec_named(value)
            .map_err(|e| Error::internal(format!("msgpack encode: {e}")))?,
        Format::Json => {
            serde_json::to_vec(value).map_err(|e| Error::internal(format!("json encode: {e}")))?
        }
    };
    Ok(Bytes::from(bytes))
}

/// Decodes a body; the error names the offending field where there is one.
pub fn decode<T: DeserializeOwned>(format: Format, body: &[u8]) -> Result<T, Error> {
    // The plain decoders first: they borrow from the slice and track no
    // field path (the tracking decoder was 6 % of the ingress's time on
    // cache hits). Only a body that fails is decoded again, to say where.
    let plain = match format {
        Format::Json => serde_json::from_slice(body).ok(),
        Format::MsgPack => rmp_serde::from_slice(body).ok(),
    };
    match plain {
        Some(value) => Ok(value),
        None => Err(decode_error::<T>(format, body)),
    }
}

/// Why `body` does not decode as `T`, with the field's path.
fn decode_error<T: DeserializeOwned>(format: Format, body: &[u8]) -> Error {
    match format {
        Format::Json => {
            let mut de = serde_json::Deserializer::from_slice(body);
            match serde_path_to_error::deserialize::<_, T>(&mut de) {
                Err(e) => describe("JSON", e.path().to_string(), e.inner()),
                Ok(_) => match de.end() {
                    Err(e) => Error::bad_request(format!("invalid JSON body: {e}")),
                    Ok(()) => Error::bad_request("invalid JSON body"),
                },
            }
        }
        Format::MsgPack => {
            let mut de = rmp_serde::Deserializer::from_read_ref(body);
            match serde_path_to_error::deserialize::<_, T>(&mut de) {
                Err(e) => describe("MessagePack", e.path().to_string(), e.inner()),
                Ok(_) => Error::bad_request("invalid MessagePack body"),
            }
        }
    }
}

fn describe(what: &str, path: String, inner: &dyn std::fmt::Display) -> Error {
    if path.is_empty() || path == "." {
        Error::bad_request(format!("invalid {what} body: {inner}"))
    } else {
        Error::bad_request(format!("invalid {what} body: field `{path}`: {inner}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_body_with_defaults_and_alias() {
        let r: GenerateRequest = decode(
            Format::Json,
            br#"{"prompt":"hi","provider":"huggingface","extra":1}"#,
        )
        .unwrap();
        assert_eq!(r.provider, ProviderChoice::Cloud);
        assert_eq!(r.max_tokens, 100);
        assert_eq!(r.cache, CacheMode::On);
    }

    #[test]
    fn msgpack_round_trip_uses_named_fields() {
        let mut r = GenerateRequest::new("hello");
        r.max_tokens = 7;
        let bytes = encode(Format::MsgPack, &r).unwrap();
        // Named fields: the key appears in the encoding.
        assert!(bytes.windows(6).any(|w| w == b"prompt"));
        let back: GenerateRequest = decode(Format::MsgPack, &bytes).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn errors_name_the_field() {
        let e = decode::<GenerateRequest>(Format::Json, br#"{"prompt":"x","max_tokens":"many"}"#)
            .unwrap_err();
        assert_eq!(e.kind, crate::ErrorKind::BadRequest);
        assert!(e.message.contains("max_tokens"), "{}", e.message);
        let e = decode::<GenerateRequest>(Format::Json, br#"{"prompt":"x","provider":"mars"}"#)
            .unwrap_err();
        assert!(e.message.contains("provider"), "{}", e.message);
        let e = decode::<GenerateRequest>(Format::MsgPack, b"\xc1garbage").unwrap_err();
        assert_eq!(e.kind, crate::ErrorKind::BadRequest);
        let e = decode::<GenerateRequest>(Format::Json, br#"{"prompt":"x"} trailing"#).unwrap_err();
        assert_eq!(e.kind, crate::ErrorKind::BadRequest);
    }

    #[test]
    fn validation_names_the_field() {
        let mut r = GenerateRequest::new("   ");
        assert!(r.validate(100).unwrap_err().message.contains("prompt"));
        r.prompt = "x".repeat(101);
        assert!(r.validate(100).unwrap_err().message.contains("prompt"));
        r.prompt = "ok".into();
        r.max_tokens = 0;
        assert!(r.validate(100).unwrap_err().message.contains("max_tokens"));
        r.max_tokens = 4097;
        assert!(r.validate(100).unwrap_err().message.contains("max_tokens"));
        r.max_tokens = 4096;
        r.route_bias = Some(1.5);
        assert!(r.validate(100).unwrap_err().message.contains("route_bias"));
        r.route_bias = None;
        r.temperature = Some(3.0);
        assert!(r.validate(100).unwrap_err().message.contains("temperature"));
        r.temperature = Some(0.5);
        assert!(r.validate(100).is_ok());
    }

    #[test]
    fn json_content_type_selects_json() {
        let mut h = HeaderMap::new();
        assert_eq!(Format::from_headers(Some(&h)), Format::MsgPack);
        h.insert(CONTENT_TYPE_HEADER, "Application/JSON; charset=utf-8");
        assert_eq!(Format::from_headers(Some(&h)), Format::Json);
        assert_eq!(Format::from_headers(None), Format::MsgPack);
    }
}
