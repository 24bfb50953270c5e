//! A client for any OpenAI-compatible chat completions API (the Hugging Face
//! router, OpenAI, Together, vLLM, llama.cpp, Ollama...). One shared reqwest
//! client per worker, so connections are pooled.

use std::time::{Duration, Instant};

use optiroute_common::config::UpstreamConfig;
use optiroute_common::cost::estimate_tokens;
use optiroute_common::wire::{ChatMessage, ProviderRequest, Usage};
use optiroute_common::{Error, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::engine::{ChunkSink, Generation};
use crate::sse::SseDecoder;

/// Why a call failed, and whether that says the upstream is unhealthy.
#[derive(Debug)]
pub struct CallFailure {
    pub error: Error,
    /// True for connection errors, timeouts, 5xx and 429: the breaker counts these.
    pub upstream_fault: bool,
    pub retry_after: Option<Duration>,
}

impl CallFailure {
    fn fault(kind: ErrorKind, message: String) -> Self {
        CallFailure {
            error: Error::new(kind, message),
            upstream_fault: true,
            retry_after: None,
        }
    }
}

pub struct OpenAiClient {
    http: reqwest::Client,
    url: String,
    pub model: String,
    api_key: Option<String>,
    timeout: Duration,
    pub upstream_duration: Option<prometheus::Histogram>,
}

#[derive(Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: &'a [ChatMessage],
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

/// One `data:` event of a streamed chat completion.
#[derive(Deserialize)]
struct StreamEvent {
    #[serde(default)]
    choices: Vec<StreamChoice>,
    #[serde(default)]
    usage: Option<UpstreamUsage>,
}

#[derive(Deserialize)]
struct StreamChoice {
    #[serde(default)]
    delta: StreamDelta,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
struct StreamDelta {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct ChatResponse {
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<UpstreamUsage>,
}

#[derive(Deserialize)]
struct Choice {
    message: ResponseMessage,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ResponseMessage {
    #[serde(default)]
    content: Option<String>,
}

/// Token counts as the upstream reports them. Any JSON number is read and
/// saturated into u32 (a count beyond u64 or written as a float included),
/// so a broken or hostile upstream cannot overflow a sum downstream nor
/// turn a served answer into an "unreadable" error.
#[derive(Deserialize)]
struct UpstreamUsage {
    #[serde(deserialize_with = "saturating_count")]
    prompt_tokens: u32,
    #[serde(deserialize_with = "saturating_count")]
    completion_tokens: u32,
}

fn saturating_count<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = serde_json::Number::deserialize(d)?;
    if let Some(u) = n.as_u64() {
        return Ok(u32::try_from(u).unwrap_or(u32::MAX));
    }
    match n.as_f64() {
        // `as` saturates a float into the integer range.
        Some(f) if f >= 0.0 => Ok(f as u32),
        _ => Err(serde::de::Error::custom(format!(
            "token count must be 0 or more, got {n}"
        ))),
    }
}

/// `Retry-After` in seconds (the HTTP-date form is ignored). A number too
/// large for u64 still means "a long time": the breaker clamps it.
fn retry_after_secs(v: &str) -> Option<Duration> {
    let v = v.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(Duration::from_secs(v.parse::<u64>().unwrap_or(u64::MAX)))
}

impl OpenAiClient {
    pub fn new(cfg: &UpstreamConfig) -> Result<Self, Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(cfg.connect_timeout_ms))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| Error::internal(format!("http client: {e}")))?;
        let base = cfg.base_url.trim_end_matches('/');
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(Error::bad_request(format!(
                "base_url must start with http:// or https://, got `{}`",
                cfg.base_url
            )));
        }
        Ok(OpenAiClient {
            http,
            url: format!("{base}/chat/completions"),
            model: cfg.model.clone(),
            api_key: cfg.api_key.clone().filter(|k| !k.is_empty()),
            timeout: Duration::from_millis(cfg.timeout_ms),
            upstream_duration: None,
        })
    }

    pub fn has_key(&self) -> bool {
        self.api_key.is_some()
    }

    /// Sends one chat completion request; returns the response once its
    /// status is a success, else the failure it stands for.
    async fn send(
        &self,
        req: &ProviderRequest,
        model: &str,
        remaining: Duration,
        stream: bool,
    ) -> Result<reqwest::Response, CallFailure> {
        let timeout = self.timeout.min(remaining);
        if timeout.is_zero() {
            return Err(CallFailure {
                error: Error::new(
                    ErrorKind::Timeout,
                    "deadline passed before the upstream call",
                ),
                upstream_fault: false,
                retry_after: None,
            });
        }
        let conversation = req.conversation();
        let body = ChatRequest {
            model,
            messages: &conversation,
            max_tokens: req.max_tokens,
            temperature: req.temperature,
            top_p: req.top_p,
            stop: &req.stop,
            stream,
            stream_options: stream.then_some(StreamOptions {
                include_usage: true,
            }),
        };
        let mut builder = self.http.post(&self.url).json(&body).timeout(timeout);
        if let Some(key) = &self.api_key {
            builder = builder.bearer_auth(key);
        }
        let started = Instant::now();
        let result = builder.send().await;
        if let Some(h) = &self.upstream_duration {
            h.observe(started.elapsed().as_secs_f64());
        }
        let resp = result.map_err(|e| transport_failure(&e, timeout, remaining < self.timeout))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(retry_after_secs);
        let detail: String = resp
            .text()
            .await
            .unwrap_or_default()
            .chars()
            .take(300)
            .collect();
        Err(match status.as_u16() {
            400 | 404 | 413 | 422 => CallFailure {
                error: Error::new(
                    ErrorKind::UpstreamClientError,
                    format!("upstream rejected the request ({status}): {detail}"),
                ),
                upstream_fault: false,
                retry_after: None,
            },
            401 | 403 => CallFailure::fault(
                ErrorKind::NotConfigured,
                format!("upstream refused the credentials ({status})"),
            ),
            429 => CallFailure {
                error: Error::new(
                    ErrorKind::RateLimited,
                    format!("upstream rate limit ({status})"),
                ),
                upstream_fault: true,
                retry_after,
            },
            _ => CallFailure::fault(
                ErrorKind::UpstreamError,
                format!("upstream failed ({status})"),
            ),
        })
    }

    /// A chat completion, streamed to `sink` when there is one.
    pub async fn complete(
        &self,
        req: &ProviderRequest,
        model: &str,
        remaining: Duration,
        sink: Option<&mut ChunkSink>,
    ) -> Result<Generation, CallFailure> {
        match sink {
            Some(sink) => self.chat_stream(req, model, remaining, sink).await,
            None => self.chat(req, model, remaining).await,
        }
    }

    /// One chat completion, bounded by the configured timeout and `remaining`.
    pub async fn chat(
        &self,
        req: &ProviderRequest,
        model: &str,
        remaining: Duration,
    ) -> Result<Generation, CallFailure> {
        let resp = self.send(req, model, remaining, false).await?;
        let parsed: ChatResponse = resp.json().await.map_err(|e| {
            if e.is_timeout() {
                transport_failure(&e, self.timeout.min(remaining), remaining < self.timeout)
            } else {
                CallFailure::fault(
                    ErrorKind::UpstreamError,
                    format!("upstream answer unreadable: {}", without_url(&e)),
                )
            }
        })?;
        let choice = parsed.choices.into_iter().next().ok_or_else(|| {
            CallFailure::fault(
                ErrorKind::UpstreamError,
                "upstream answer has no choices".into(),
            )
        })?;
        let text = choice.message.content.unwrap_or_default();
        let usage = match parsed.usage {
            Some(u) => Usage::new(u.prompt_tokens, u.completion_tokens, false),
            None => estimate(req, &text),
        };
        Ok(Generation {
            text,
            usage,
            model: model.to_string(),
            finish_reason: choice.finish_reason,
            compute_seconds: None,
        })
    }

    /// A streamed chat completion: each content delta goes to `sink` as it
    /// arrives; the whole text and usage come back at the end.
    pub async fn chat_stream(
        &self,
        req: &ProviderRequest,
        model: &str,
        remaining: Duration,
        sink: &mut ChunkSink,
    ) -> Result<Generation, CallFailure> {
        use futures::StreamExt;
        let resp = self.send(req, model, remaining, true).await?;
        let mut body = resp.bytes_stream();
        let mut sse = SseDecoder::new();
        let (mut text, mut usage, mut finish_reason) = (String::new(), None, None);
        'read: while let Some(piece) = body.next().await {
            let piece = piece.map_err(|e| {
                transport_failure(&e, self.timeout.min(remaining), remaining < self.timeout)
            })?;
            sse.push(&piece);
            while let Some(data) = sse
                .next_data()
                .map_err(|e| CallFailure::fault(ErrorKind::UpstreamError, e))?
            {
                if data == "[DONE]" {
                    break 'read;
                }
                let event: StreamEvent = serde_json::from_str(&data).map_err(|e| {
                    CallFailure::fault(
                        ErrorKind::UpstreamError,
                        format!("upstream stream event unreadable: {e}"),
                    )
                })?;
                if let Some(u) = event.usage {
                    usage = Some(Usage::new(u.prompt_tokens, u.completion_tokens, false));
                }
                if let Some(choice) = event.choices.into_iter().next() {
                    if let Some(delta) = choice.delta.content.filter(|d| !d.is_empty()) {
                        sink.send(&delta).await.map_err(|error| CallFailure {
                            error,
                            upstream_fault: false,
                            retry_after: None,
                        })?;
                        text.push_str(&delta);
                    }
                    if choice.finish_reason.is_some() {
                        finish_reason = choice.finish_reason;
                    }
                }
            }
        }
        let usage = usage.unwrap_or_else(|| estimate(req, &text));
        Ok(Generation {
            text,
            usage,
            model: model.to_string(),
            finish_reason,
            compute_seconds: None,
        })
    }
}

fn estimate(req: &ProviderRequest, text: &str) -> Usage {
    let prompt: usize = req.conversation().iter().map(|m| m.content.len()).sum();
    Usage::new(
        u32::try_from(prompt.div_ceil(4)).unwrap_or(u32::MAX),
        estimate_tokens(text),
        true,
    )
}

/// A timeout counts against the upstream only when our configured timeout
/// was the limit; when the caller's own deadline was shorter, the upstream
/// may be healthy and the breaker must not count it.
fn transport_failure(e: &reqwest::Error, timeout: Duration, caller_bound: bool) -> CallFailure {
    if e.is_timeout() {
        let mut f = CallFailure::fault(
            ErrorKind::Timeout,
            format!("upstream did not answer within {timeout:?}"),
        );
        f.upstream_fault = !caller_bound;
        f
    } else {
        CallFailure::fault(
            ErrorKind::UpstreamError,
            format!("upstream unreachable: {}", without_url(e)),
        )
    }
}

/// reqwest errors print the URL; keep tokens in query strings out of replies.
fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(url) = e.url() {
        s = s.replace(url.as_str(), "<upstream>");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_of_any_size_parses() {
        assert_eq!(retry_after_secs(" 30 "), Some(Duration::from_secs(30)));
        assert_eq!(
            retry_after_secs("18446744073709551615"),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(
            retry_after_secs("99999999999999999999999"),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(retry_after_secs("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(retry_after_secs("-1"), None);
        assert_eq!(retry_after_secs(""), None);
    }

    #[test]
    fn usage_counts_saturate() {
        let u: UpstreamUsage =
            serde_json::from_str(r#"{"prompt_tokens": 4294967296, "completion_tokens": 1e30}"#)
                .unwrap();
        assert_eq!((u.prompt_tokens, u.completion_tokens), (u32::MAX, u32::MAX));
        let u: UpstreamUsage = serde_json::from_str(
            r#"{"prompt_tokens": 18446744073709551616, "completion_tokens": 7}"#,
        )
        .unwrap();
        assert_eq!((u.prompt_tokens, u.completion_tokens), (u32::MAX, 7));
        let usage = Usage::new(u.prompt_tokens, u.prompt_tokens, false);
        assert_eq!(usage.total_tokens, u32::MAX);
        assert!(serde_json::from_str::<UpstreamUsage>(
            r#"{"prompt_tokens": -1, "completion_tokens": 7}"#
        )
        .is_err());
    }
}
