//! The OpenAI-compatible API: `POST /v1/chat/completions` (plain and
//! streamed as Server-Sent Events) and `GET /v1/models`, so programs written
//! for OpenAI point at OptiRoute with a one-line change.
//!
//! Streaming across NATS: the ingress subscribes to a fresh inbox and names
//! it in the `Optiroute-Stream-Inbox` header; the provider publishes tokens
//! there as they are generated, while the router still gets the whole
//! answer (for the cache and the cost) and replies as usual. When the HTTP
//! client goes away, the ingress publishes on `<inbox>.cancel` and the
//! provider stops generating.

use std::convert::Infallible;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::StreamExt;
use optiroute_common::http::CloseConnection;
use optiroute_common::nats::RequestMeta;
use optiroute_common::protocol::{headers, Subjects};
use optiroute_common::wire::{
    self, ChatMessage, Format, GenerateRequest, GenerateResponse, ProviderChoice, Role, StreamChunk,
};
use optiroute_common::{Error, ErrorKind};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::{ApiError, AppState};

#[derive(Deserialize)]
struct ChatCompletionRequest {
    messages: Vec<InMessage>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    /// Accepted for compatibility; never logged or used as a label.
    #[serde(default)]
    user: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
struct InMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

fn param_error(param: &str, message: String) -> Error {
    Error::bad_param(param, format!("{param}: {message}"))
}

/// Maps OpenAI's `model` to a provider choice and model id.
fn resolve_model(
    state: &AppState,
    model: Option<&str>,
) -> Result<(ProviderChoice, Option<String>), Error> {
    let s = &state.inner;
    match model {
        None | Some("auto") | Some("optiroute") => Ok((ProviderChoice::Auto, None)),
        Some("local") => Ok((ProviderChoice::Local, None)),
        Some("cloud") => Ok((ProviderChoice::Cloud, None)),
        Some(m) if s.local_models.iter().any(|x| x == m) => Ok((ProviderChoice::Local, None)),
        Some(m) if s.cloud_models.iter().any(|x| x == m) => {
            Ok((ProviderChoice::Cloud, Some(m.to_string())))
        }
        Some(m) => Err(Error::new(
            ErrorKind::BadRequest,
            format!("model: `{m}` is not available; GET /v1/models lists the models"),
        )),
    }
}

impl ChatCompletionRequest {
    fn into_generate(self, state: &AppState) -> Result<(GenerateRequest, bool, bool), Error> {
        if self.messages.is_empty() {
            return Err(param_error(
                "messages",
                "must contain at least one message".into(),
            ));
        }
        let mut messages = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.into_iter().enumerate() {
            let role = match m.role.as_str() {
                "system" | "developer" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                other => {
                    return Err(param_error(
                        &format!("messages[{i}].role"),
                        format!("`{other}` is not supported (system, user, assistant)"),
                    ))
                }
            };
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.into_iter().enumerate() {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            (kind, _) => {
                                return Err(param_error(
                                    &format!("messages[{i}].content[{j}]"),
                                    format!("only text parts are supported, got `{kind}`"),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            messages.push(ChatMessage { role, content });
        }
        let (provider, model_id) = resolve_model(state, self.model.as_deref())?;
        let mut req = GenerateRequest::new("");
        req.params.messages = messages;
        req.provider = provider;
        req.params.model_id = model_id;
        req.params.max_tokens = self
            .max_completion_tokens
            .or(self.max_tokens)
            .unwrap_or(wire::DEFAULT_MAX_TOKENS);
        req.params.temperature = self.temperature;
        req.params.top_p = self.top_p;
        req.user = self.user;
        req.params.stop = match self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        };
        let include_usage = self.stream_options.unwrap_or_default().include_usage;
        Ok((req, self.stream.unwrap_or(false), include_usage))
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn usage_json(a: &GenerateResponse) -> Value {
    json!({
        "prompt_tokens": a.completion.usage.prompt_tokens,
        "completion_tokens": a.completion.usage.completion_tokens,
        "total_tokens": a.completion.usage.total_tokens,
    })
}

/// The `x-optiroute-*` headers of an answer.
fn answer_headers(headers: &mut HeaderMap, a: &GenerateResponse, request_id: &str) {
    let mut put = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    };
    put(headers::HTTP_PROVIDER, a.provider.as_str().to_string());
    put(headers::HTTP_ROUTED_TO, a.routed_to.as_str().to_string());
    put(
        headers::HTTP_CACHE,
        if a.cached { "hit" } else { "miss" }.to_string(),
    );
    put(headers::HTTP_COST_USD, format!("{:.10}", a.cost));
    if let Some(m) = a.cache_match {
        put(headers::HTTP_CACHE_MATCH, m.as_str().to_string());
    }
    if let Some(s) = a.similarity {
        put(headers::HTTP_SIMILARITY, format!("{s:.4}"));
    }
    put(headers::HTTP_REQUEST_ID, request_id.to_string());
}

pub(crate) async fn chat_completions(
    State(state): State<AppState>,
    closer: Option<Extension<CloseConnection>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let id = crate::request_id(&headers);
    let fail = |e: Error| ApiError::new(e, Some(&id));
    let api_key = crate::authorize(&state, &headers).map_err(fail)?;
    let body = body.map_err(|rej| ApiError {
        error: Error::bad_request(format!("cannot read the body: {}", rej.body_text())),
        request_id: Some(id.clone()),
        status: Some(rej.status()),
    })?;
    let parsed: ChatCompletionRequest = wire::decode(Format::Json, &body).map_err(fail)?;
    let model = parsed.model.clone().unwrap_or_else(|| "auto".to_string());
    let (mut req, stream, include_usage) = parsed.into_generate(&state).map_err(fail)?;
    req.validate(state.inner.max_prompt_bytes).map_err(fail)?;
    req.cache = crate::cache_mode_from_headers(&headers, req.cache);
    req.cache_namespace = crate::namespace_from_headers(&headers).map_err(fail)?;
    req.semantic = crate::semantic_from_headers(&headers).map_err(fail)?;
    req.validate(state.inner.max_prompt_bytes).map_err(fail)?;
    if stream {
        let closer = closer.map(|Extension(c)| c);
        let s = Streaming {
            id,
            include_usage,
            model,
            closer,
            api_key,
        };
        return stream_completion(state, req, s).await;
    }
    let mut meta = RequestMeta::new(id.clone(), state.inner.request_timeout);
    meta.api_key = api_key;
    let answer = crate::relay(&state, &meta, &req).await.map_err(fail)?;
    let body = json!({
        "id": format!("chatcmpl-{id}"),
        "object": "chat.completion",
        "created": unix_now(),
        "model": answer.completion.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": answer.completion.text},
            "finish_reason": answer.completion.finish_reason.as_deref().unwrap_or("stop"),
            "logprobs": null,
        }],
        "usage": usage_json(&answer),
    });
    let mut resp = Json(body).into_response();
    answer_headers(resp.headers_mut(), &answer, &id);
    Ok(resp)
}

/// What the relay task hands to the HTTP response.
enum Event {
    Delta(String),
    Done(Result<GenerateResponse, Error>),
}

/// How long a stream that broke after its first token waits for tokens
/// still on their way: they come straight from the worker, the error
/// through the router, so the error can be first to arrive.
const LATE_TOKEN_GRACE: Duration = Duration::from_millis(200);

/// A stream's events in the order the client must see them: tokens before
/// the final answer or error (`biased`: tokens already here go first), and
/// after an error that says tokens went out (`StreamInterrupted`), the
/// tokens that arrive within [`LATE_TOKEN_GRACE`] of each other before it.
struct Events {
    tokens: mpsc::Receiver<String>,
    events: mpsc::Receiver<Event>,
    /// An interruption held back until the tokens before it are out.
    held: Option<Event>,
}

impl Events {
    /// The next event (`None`: both sides closed). Cancel-safe: dropped
    /// while waiting, it loses nothing (a held interruption stays held).
    async fn next(&mut self) -> Option<Event> {
        loop {
            if self.held.is_some() {
                return match tokio::time::timeout(LATE_TOKEN_GRACE, self.tokens.recv()).await {
                    Ok(Some(t)) => Some(Event::Delta(t)),
                    _ => self.held.take(),
                };
            }
            let event = tokio::select! {
                biased;
                Some(t) = self.tokens.recv() => Event::Delta(t),
                e = self.events.recv() => e?,
            };
            match event {
                Event::Done(Err(e)) if e.kind == ErrorKind::StreamInterrupted => {
                    self.held = Some(Event::Done(Err(e)));
                }
                other => return Some(other),
            }
        }
    }
}

/// Streams a completion. The first event (a token, or the final answer or
/// error) is awaited before the response starts, so a request that fails
/// before any token gets a proper HTTP error status.
///
/// A client that stops reading is given `ingress.stream_send_timeout_ms`
/// per event; then the provider is told to stop and the connection closed
/// (`closer`), since the response can neither finish nor be abandoned.
/// How one streamed completion is answered.
struct Streaming {
    id: String,
    include_usage: bool,
    model: String,
    closer: Option<CloseConnection>,
    api_key: Option<String>,
}

async fn stream_completion(
    state: AppState,
    req: GenerateRequest,
    st: Streaming,
) -> Result<Response, ApiError> {
    let Streaming {
        id,
        include_usage,
        model,
        closer,
        api_key,
    } = st;
    let s = state.inner.clone();
    let slot = s.limits.stream_slot().map_err(|e| {
        s.metrics.limited.with_label_values(&["streams"]).inc();
        ApiError::new(e, Some(&id))
    })?;
    let inbox = s.client.new_inbox();
    let mut chunks = s.client.subscribe(inbox.clone()).await.map_err(|e| {
        ApiError::new(
            Error::new(
                ErrorKind::NatsUnavailable,
                format!("cannot open a stream inbox: {e}"),
            ),
            Some(&id),
        )
    })?;
    let mut meta = RequestMeta::new(id.clone(), s.request_timeout);
    meta.stream_inbox = Some(inbox.clone());
    meta.api_key = api_key;
    let started = Instant::now();
    let (events_tx, events_rx) = mpsc::channel::<Event>(64);
    let relay_state = state.clone();
    let relay = tokio::spawn(async move {
        let answer = crate::relay(&relay_state, &meta, &req).await;
        let _ = events_tx.send(Event::Done(answer)).await;
    });
    let (tokens_tx, tokens_rx) = mpsc::channel::<String>(64);
    let token_pump = tokio::spawn(async move {
        let mut expected = 0u32;
        while let Some(msg) = chunks.next().await {
            match wire::decode::<StreamChunk>(Format::MsgPack, &msg.payload) {
                Ok(c) if c.index == expected => {
                    expected += 1;
                    if tokens_tx.send(c.delta).await.is_err() {
                        break;
                    }
                }
                // A gap or an unreadable chunk: the final answer fills in the text.
                _ => tracing::warn!("stream chunk out of order or unreadable"),
            }
        }
    });
    let mut tasks = StreamTasks {
        relay,
        pump: token_pump,
        client: s.client.clone(),
        cancel_subject: Subjects::cancel(&inbox),
        settled: false,
    };
    let mut events = Events {
        tokens: tokens_rx,
        events: events_rx,
        held: None,
    };
    // The first event decides the status. If the client goes away before
    // it, dropping `tasks` stops the relay and tells the provider.
    let first = events.next().await;
    let first = match first {
        Some(Event::Done(Err(e))) => {
            tasks.finish();
            return Err(ApiError::new(e, Some(&id)));
        }
        Some(ev) => ev,
        None => {
            tasks.finish();
            return Err(ApiError::new(
                Error::internal("stream ended before any event"),
                Some(&id),
            ));
        }
    };
    let (body_tx, body_rx) = mpsc::channel::<Bytes>(64);
    let request_id = id.clone();
    let metrics = s.metrics.clone();
    let send_timeout = s.limits.stream_send_timeout;
    tokio::spawn(async move {
        let _slot = slot;
        let mut sse = SseWriter::new(id.clone(), model, body_tx, send_timeout);
        let mut ev = Some(first);
        let mut streamed = String::new();
        let mut first_token_seen = false;
        let outcome = loop {
            let event = match ev.take() {
                Some(e) => e,
                None => tokio::select! {
                    e = events.next() => match e { Some(e) => e, None => break None },
                    _ = sse.closed() => break Some(ErrorKind::Cancelled),
                },
            };
            match event {
                Event::Delta(d) => {
                    if !first_token_seen {
                        first_token_seen = true;
                        metrics
                            .time_to_first_token
                            .observe(started.elapsed().as_secs_f64());
                    }
                    streamed.push_str(&d);
                    if !sse.delta(&d).await {
                        break Some(ErrorKind::Cancelled);
                    }
                }
                Event::Done(Ok(answer)) => {
                    // Whatever did not arrive as tokens (a cache hit, chunks
                    // still in flight) goes out as one last piece. An answer
                    // that does not continue what was sent cannot be spliced on.
                    let Some(rest) = answer.completion.text.strip_prefix(streamed.as_str()) else {
                        let e = Error::new(
                            ErrorKind::StreamInterrupted,
                            "the answer changed after tokens were sent",
                        );
                        sse.error(&e).await;
                        break None;
                    };
                    {
                        if !rest.is_empty() {
                            if !first_token_seen {
                                metrics
                                    .time_to_first_token
                                    .observe(started.elapsed().as_secs_f64());
                            }
                            sse.delta(rest).await;
                        }
                    }
                    sse.finish(&answer, include_usage).await;
                    break None;
                }
                Event::Done(Err(e)) => {
                    sse.error(&e).await;
                    break None;
                }
            }
        };
        if sse.stalled {
            tracing::info!(request_id = %id, "client stopped reading the stream; closing it");
            metrics
                .limited
                .with_label_values(&["stream_send_timeout"])
                .inc();
        }
        if outcome == Some(ErrorKind::Cancelled) {
            tracing::info!(request_id = %id, "client went away mid-stream; cancelling generation");
            tasks.cancel();
        } else {
            tasks.finish();
        }
        if sse.stalled {
            if let Some(c) = closer {
                c.close();
            }
        }
    });
    let stream = futures::stream::unfold(body_rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        h.insert(headers::HTTP_REQUEST_ID, v);
    }
    Ok(resp)
}

/// The tasks behind one stream: the NATS request to the routers and the
/// pump of tokens from the stream inbox. Dropped unsettled (the client went
/// away), they are aborted and the provider is told to stop generating.
struct StreamTasks {
    relay: tokio::task::JoinHandle<()>,
    pump: tokio::task::JoinHandle<()>,
    client: async_nats::Client,
    cancel_subject: String,
    settled: bool,
}

impl StreamTasks {
    /// The answer (or its error) has arrived: stop listening for tokens.
    fn finish(&mut self) {
        self.settled = true;
        self.pump.abort();
    }

    fn cancel(&mut self) {
        if self.settled {
            return;
        }
        self.settled = true;
        self.relay.abort();
        self.pump.abort();
        let (client, subject) = (
            self.client.clone(),
            std::mem::take(&mut self.cancel_subject),
        );
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = client.publish(subject, Bytes::new()).await;
            });
        }
    }
}

impl Drop for StreamTasks {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// Writes `chat.completion.chunk` events, byte for byte as OpenAI frames them.
struct SseWriter {
    id: String,
    created: u64,
    model: String,
    tx: mpsc::Sender<Bytes>,
    sent_role: bool,
    send_timeout: Duration,
    /// An event waited `send_timeout` for the client: nothing more is sent.
    stalled: bool,
}

impl SseWriter {
    /// `model` is the model the caller asked for: the one that answers is
    /// only known at the end, and every chunk must name the same model.
    fn new(
        request_id: String,
        model: String,
        tx: mpsc::Sender<Bytes>,
        send_timeout: Duration,
    ) -> Self {
        SseWriter {
            id: format!("chatcmpl-{request_id}"),
            created: unix_now(),
            model,
            tx,
            sent_role: false,
            send_timeout,
            stalled: false,
        }
    }

    async fn closed(&self) {
        self.tx.closed().await
    }

    /// False when the event cannot go out: the client left, or it has not
    /// taken the events before it for `send_timeout`.
    async fn send(&mut self, data: &str) -> bool {
        if self.stalled {
            return false;
        }
        let event = Bytes::from(format!("data: {data}\n\n"));
        match tokio::time::timeout(self.send_timeout, self.tx.send(event)).await {
            Ok(sent) => sent.is_ok(),
            Err(_) => {
                self.stalled = true;
                false
            }
        }
    }

    fn chunk_value(&self, delta: Value, finish_reason: Option<&str>) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": null}],
        })
    }

    fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> String {
        self.chunk_value(delta, finish_reason).to_string()
    }

    async fn delta(&mut self, text: &str) -> bool {
        let delta = if self.sent_role {
            json!({"content": text})
        } else {
            self.sent_role = true;
            json!({"role": "assistant", "content": text})
        };
        let chunk = self.chunk(delta, None);
        self.send(&chunk).await
    }

    async fn finish(&mut self, answer: &GenerateResponse, include_usage: bool) {
        let finish = answer.completion.finish_reason.as_deref().unwrap_or("stop");
        // The last chunk also says how OptiRoute served the request (the
        // `x-optiroute-*` headers of a plain answer); OpenAI clients ignore it.
        let mut chunk = self.chunk_value(json!({}), Some(finish));
        chunk["optiroute"] = json!({
            "provider": answer.provider.as_str(),
            "routed_to": answer.routed_to.as_str(),
            "cached": answer.cached,
            "cost": answer.cost,
            "latency": answer.latency,
            "model": answer.completion.model,
            "route_reason": answer.route_reason,
            "fallback_reason": answer.fallback_reason,
        });
        self.send(&chunk.to_string()).await;
        if include_usage {
            let usage = json!({
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": usage_json(answer),
            });
            self.send(&usage.to_string()).await;
        }
        self.send("[DONE]").await;
    }

    /// An error after the stream started: one error event, then the end.
    async fn error(&mut self, e: &Error) {
        let message = if e.kind == ErrorKind::Internal {
            "internal error".to_string()
        } else {
            e.message.clone()
        };
        let body =
            json!({"error": {"message": message, "type": "stream_error", "code": e.kind.as_str()}});
        self.send(&body.to_string()).await;
    }
}

pub(crate) async fn models(State(state): State<AppState>) -> Response {
    let s = &state.inner;
    let entry = |id: &str, pool: &str| json!({"id": id, "object": "model", "created": 0, "owned_by": "optiroute", "pool": pool});
    let mut data = vec![
        entry("auto", "auto"),
        entry("local", "local"),
        entry("cloud", "cloud"),
    ];
    data.extend(s.local_models.iter().map(|m| entry(m, "local")));
    data.extend(s.cloud_models.iter().map(|m| entry(m, "cloud")));
    (
        StatusCode::OK,
        Json(json!({"object": "list", "data": data})),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events() -> (mpsc::Sender<String>, mpsc::Sender<Event>, Events) {
        let (tokens_tx, tokens) = mpsc::channel(8);
        let (events_tx, events) = mpsc::channel(8);
        let ev = Events {
            tokens,
            events,
            held: None,
        };
        (tokens_tx, events_tx, ev)
    }

    fn interrupted() -> Event {
        Event::Done(Err(Error::new(ErrorKind::StreamInterrupted, "broke")))
    }

    fn describe(e: Option<Event>) -> String {
        match e {
            Some(Event::Delta(t)) => format!("token {t}"),
            Some(Event::Done(Ok(_))) => "answer".into(),
            Some(Event::Done(Err(e))) => format!("error {}", e.kind.as_str()),
            None => "end".into(),
        }
    }

    /// The interruption can arrive before the tokens sent ahead of it (it
    /// comes through the router, they straight from the worker): they are
    /// still delivered first, so the stream starts (200) and ends with the
    /// error event instead of failing as a whole.
    #[tokio::test(start_paused = true)]
    async fn tokens_sent_before_an_interruption_come_before_it() {
        let (tokens, done, mut ev) = events();
        done.send(interrupted()).await.unwrap();
        drop(done);
        tokio::spawn(async move {
            for t in ["a", "b"] {
                tokio::time::sleep(Duration::from_millis(30)).await;
                tokens.send(t.to_string()).await.unwrap();
            }
        });
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(describe(ev.next().await));
        }
        assert_eq!(
            seen,
            ["token a", "token b", "error stream_interrupted", "end"]
        );
    }

    /// Tokens already here go before the final answer, whichever the
    /// runtime would poll first; with no token at all, an interruption is
    /// delivered after the grace.
    #[tokio::test(start_paused = true)]
    async fn queued_tokens_go_before_the_answer() {
        let (tokens, done, mut ev) = events();
        tokens.send("x".to_string()).await.unwrap();
        done.send(Event::Done(Err(Error::internal("late"))))
            .await
            .unwrap();
        assert_eq!(describe(ev.next().await), "token x");
        assert_eq!(describe(ev.next().await), "error internal");

        let (_tokens, done, mut ev) = events();
        done.send(interrupted()).await.unwrap();
        let started = tokio::time::Instant::now();
        assert_eq!(describe(ev.next().await), "error stream_interrupted");
        assert!(started.elapsed() >= LATE_TOKEN_GRACE);
    }
}
