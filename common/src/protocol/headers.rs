//! Header names: on NATS messages between processes, and on HTTP answers.

/// The request id made at the ingress (`x-request-id` on HTTP).
pub const REQUEST_ID: &str = "Optiroute-Request-Id";
/// The request's absolute deadline, in Unix epoch milliseconds.
pub const DEADLINE: &str = "Optiroute-Deadline";
/// The subject where the provider publishes stream chunks as tokens are
/// generated; the final reply still carries the whole answer. The
/// requester publishes anything on [`super::Subjects::cancel`]`(inbox)` to
/// stop generation.
pub const STREAM_INBOX: &str = "Optiroute-Stream-Inbox";
/// The caller's API key on a generate request or batch job (the HTTP
/// ingress copies `Authorization: Bearer <key>` here). Routers check it.
pub const API_KEY: &str = "Optiroute-Api-Key";
/// A batch job's credential in [`API_KEY`]: `batch:<batch id>:<token>`.
/// The token is derived from the submitter's key and the batch id
/// ([`batch_token`]); the batch's description keeps only its SHA-256, so
/// the job queue holds no key secret, and the token is good for that
/// batch's jobs only.
pub const BATCH_CREDENTIAL_PREFIX: &str = "batch:";

/// The token of batch `id` submitted with the key `secret`.
pub fn batch_token(secret: &str, id: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"optiroute-batch\0");
    h.update(secret.as_bytes());
    h.update(b"\0");
    h.update(id.as_bytes());
    hex::encode(h.finalize())
}

/// Hex SHA-256 of a batch token (what a batch's description keeps).
pub fn batch_token_hash(token: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// `batch:<id>:<token>`.
pub fn batch_credential(id: &str, token: &str) -> String {
    format!("{BATCH_CREDENTIAL_PREFIX}{id}:{token}")
}

/// The batch id and token of a batch credential.
pub fn parse_batch_credential(s: &str) -> Option<(&str, &str)> {
    s.strip_prefix(BATCH_CREDENTIAL_PREFIX)?.split_once(':')
}

/// The caller's team, on the router's requests to a provider pool (the
/// `team` label of `llm_total_cost_usd_total`).
pub const TEAM: &str = "Optiroute-Team";
/// `application/json` selects JSON bodies; anything else is MessagePack.
pub const CONTENT_TYPE: &str = "Content-Type";
pub const JSON_CONTENT_TYPE: &str = "application/json";
pub const MSGPACK_CONTENT_TYPE: &str = "application/msgpack";
/// The service API's error headers: a description and an HTTP-like status.
pub use async_nats::service::{NATS_SERVICE_ERROR, NATS_SERVICE_ERROR_CODE};
/// JetStream's deduplication id on a published batch job.
pub const NATS_MSG_ID: &str = "Nats-Msg-Id";

/// HTTP: the request id, taken from the caller when usable and always returned.
pub const HTTP_REQUEST_ID: &str = "x-request-id";
/// HTTP: the pool that answered.
pub const HTTP_PROVIDER: &str = "x-optiroute-provider";
/// HTTP: the pool routing chose.
pub const HTTP_ROUTED_TO: &str = "x-optiroute-routed-to";
/// HTTP: `hit` or `miss`.
pub const HTTP_CACHE: &str = "x-optiroute-cache";
/// HTTP: narrows the cache scope (`cache_namespace`).
pub const HTTP_CACHE_NAMESPACE: &str = "x-optiroute-cache-namespace";
/// HTTP: `on` or `off` asks for the semantic cache or not (`semantic`).
pub const HTTP_SEMANTIC: &str = "x-optiroute-semantic";
/// HTTP answer: `exact` or `semantic`, on a cached answer.
pub const HTTP_CACHE_MATCH: &str = "x-optiroute-cache-match";
/// HTTP answer: the similarity of a semantic match.
pub const HTTP_SIMILARITY: &str = "x-optiroute-similarity";
/// HTTP: what the request cost, in USD.
pub const HTTP_COST_USD: &str = "x-optiroute-cost-usd";
