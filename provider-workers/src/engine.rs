//! What a provider pool runs to turn a prompt into text.

use std::future::Future;

use async_nats::Client;
use optiroute_common::nats::RequestMeta;
use optiroute_common::wire::{self, Format, ProviderRequest, StreamChunk, Usage};
use optiroute_common::{Error, ErrorKind};

/// One generated answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub text: String,
    pub usage: Usage,
    /// The configured model that served it (a bounded set, used as a metric label).
    pub model: String,
    pub finish_reason: Option<String>,
    /// Time spent computing the answer, when the engine knows it apart from
    /// waiting (the embedded model queues for a slot first). Local cost is
    /// charged on this; engines that cannot tell leave it `None` and the
    /// worker charges the time the request took.
    pub compute_seconds: Option<f64>,
}

/// Publishes a streamed answer's pieces on the requester's stream inbox.
pub struct ChunkSink {
    client: Client,
    inbox: String,
    next: u32,
    /// Bytes of text sent.
    bytes: usize,
}

impl ChunkSink {
    pub fn new(client: Client, inbox: String) -> Self {
        ChunkSink {
            client,
            inbox,
            next: 0,
            bytes: 0,
        }
    }

    /// Whether any token has gone out (after that, no fallback is possible).
    pub fn started(&self) -> bool {
        self.next > 0
    }

    /// Tokens sent so far, estimated: about four bytes a token, and at
    /// least one a chunk.
    pub fn tokens_estimate(&self) -> u32 {
        let by_bytes = u32::try_from(self.bytes.div_ceil(4)).unwrap_or(u32::MAX);
        by_bytes.max(self.next)
    }

    pub async fn send(&mut self, delta: &str) -> Result<(), Error> {
        if delta.is_empty() {
            return Ok(());
        }
        let chunk = StreamChunk {
            index: self.next,
            delta: delta.to_string(),
        };
        let body = wire::encode(Format::MsgPack, &chunk)?;
        self.client
            .publish(self.inbox.clone(), body)
            .await
            .map_err(|e| Error::new(ErrorKind::NatsUnavailable, format!("stream publish: {e}")))?;
        self.next += 1;
        self.bytes += delta.len();
        Ok(())
    }
}

pub trait Engine: Send + Sync + 'static {
    /// Generates an answer; with a `sink`, publishes the tokens to it as
    /// they come (an engine that cannot stream sends the whole text at once).
    fn generate(
        &self,
        meta: &RequestMeta,
        request: &ProviderRequest,
        sink: Option<&mut ChunkSink>,
    ) -> impl Future<Output = Result<Generation, Error>> + Send;

    /// `Ok` when the engine can serve, else why not (shown on `/ready`).
    fn ready(&self) -> Result<(), String> {
        Ok(())
    }

    /// The engine's load for the NATS service stats (`$SRV.STATS` data),
    /// when it knows it.
    fn stats(&self) -> Option<serde_json::Value> {
        None
    }
}
