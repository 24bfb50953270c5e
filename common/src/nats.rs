//! NATS connection and the request side of request-reply.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::{client::RequestErrorKind, connection::State, Client, HeaderMap};
use serde::{de::DeserializeOwned, Serialize};

use crate::config::NatsConfig;
use crate::error::{Error, ErrorBody, ErrorKind};
use crate::wire::{self, Format, DEADLINE_HEADER, REQUEST_ID_HEADER};

pub use crate::protocol::headers::{NATS_SERVICE_ERROR, NATS_SERVICE_ERROR_CODE};

/// Credentials written into a NATS URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlAuth {
    /// `nats://user:password@host`
    UserPassword(String, String),
    /// `nats://token@host`
    Token(String),
}

/// One URL cut around its credentials: (`scheme://` or "", the
/// credentials if any, the rest). The last `@` ends them, so a password
/// may contain `@`; a NATS URL has no path that could.
fn userinfo(url: &str) -> (&str, Option<&str>, &str) {
    let start = url.find("://").map_or(0, |i| i + 3);
    match url[start..].rfind('@') {
        Some(at) => (
            &url[..start],
            Some(&url[start..start + at]),
            &url[start + at + 1..],
        ),
        None => (&url[..start], None, &url[start..]),
    }
}

/// The servers of a comma-separated `nats.url`, without credentials (which
/// go to the connect options instead, so async-nats never logs them).
pub fn server_urls(urls: &str) -> Vec<String> {
    urls.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            let (scheme, _, rest) = userinfo(u);
            format!("{scheme}{rest}")
        })
        .collect()
}

/// The credentials in `urls` (comma-separated; the first URL that has
/// any), percent-decoded: `user:password@` or `token@` (a `,` or `@` in a
/// password is written `%2C`, `%40`). async-nats does
/// not read them from the URL by itself, and `nats/accounts.conf` gives
/// every process its user this way.
pub fn url_auth(urls: &str) -> Option<UrlAuth> {
    urls.split(',').find_map(|url| {
        let info = userinfo(url.trim()).1?;
        Some(match info.split_once(':') {
            Some((user, password)) => {
                UrlAuth::UserPassword(percent_decode(user), percent_decode(password))
            }
            None => UrlAuth::Token(percent_decode(info)),
        })
    })
}

/// `urls` with any credentials replaced by `***`, for logs and errors.
pub fn redacted(urls: &str) -> String {
    urls.split(',')
        .map(|url| match userinfo(url) {
            (scheme, Some(_), rest) => format!("{scheme}***@{rest}"),
            _ => url.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Connects with unlimited reconnects and capped exponential backoff, and
/// logs every connection state change. Returns at once even when NATS is
/// down: the client keeps trying in the background. Credentials come from
/// the URL (`nats://user:password@host:4222` or `nats://token@host:4222`).
pub async fn connect(cfg: &NatsConfig, name: &str) -> Result<Client, Error> {
    let max_delay = Duration::from_millis(cfg.max_reconnect_delay_ms.max(10));
    let opts = match url_auth(&cfg.url) {
        Some(UrlAuth::UserPassword(user, password)) => {
            async_nats::ConnectOptions::with_user_and_password(user, password)
        }
        Some(UrlAuth::Token(token)) => async_nats::ConnectOptions::with_token(token),
        None => async_nats::ConnectOptions::new(),
    };
    let opts = match &cfg.tls_ca_file {
        Some(ca) => opts.add_root_certificates(ca.into()).require_tls(true),
        None => opts,
    };
    let opts = opts
        .custom_inbox_prefix(&cfg.inbox_prefix)
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .ping_interval(Duration::from_secs(10))
        .request_timeout(Some(Duration::from_secs(30)))
        .reconnect_delay_callback(move |attempts| {
            let exp = 10u64.saturating_mul(1u64 << attempts.min(16));
            Duration::from_millis(exp).min(max_delay)
        })
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => tracing::info!("nats connected"),
                async_nats::Event::Disconnected => {
                    tracing::warn!("nats disconnected, reconnecting")
                }
                other => tracing::info!(event = %other, "nats event"),
            }
        });
    let servers = server_urls(&cfg.url);
    if servers.is_empty() {
        return Err(Error::new(
            ErrorKind::NatsUnavailable,
            "nats.url names no server",
        ));
    }
    opts.connect(servers).await.map_err(|e| {
        Error::new(
            ErrorKind::NatsUnavailable,
            format!("cannot connect to NATS at {}: {e}", redacted(&cfg.url)),
        )
    })
}

pub fn is_connected(client: &Client) -> bool {
    client.connection_state() == State::Connected
}

/// Milliseconds since the Unix epoch, the unit of [`DEADLINE_HEADER`].
pub fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn from_epoch_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// The longest deadline a request may carry.
pub const MAX_DEADLINE: Duration = Duration::from_secs(600);

/// What travels with every hop: who the request is and when it must be done.
#[derive(Debug, Clone)]
pub struct RequestMeta {
    pub request_id: String,
    pub deadline: SystemTime,
    /// Where to publish streamed tokens, when the caller streams.
    pub stream_inbox: Option<String>,
    /// The caller's API key (header `Optiroute-Api-Key`), checked by the
    /// router and never sent on to a provider.
    pub api_key: Option<String>,
    /// The caller's team, set by the router on provider requests (a
    /// bounded label of the cost metric).
    pub team: Option<String>,
}

impl RequestMeta {
    pub fn new(request_id: String, timeout: Duration) -> Self {
        RequestMeta {
            request_id,
            deadline: SystemTime::now() + timeout,
            stream_inbox: None,
            api_key: None,
            team: None,
        }
    }

    /// Time left before the deadline (zero when it has passed).
    pub fn remaining(&self) -> Duration {
        self.deadline
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
    }

    /// Reads the id and deadline from headers; missing ones get a fresh id and
    /// `default_timeout` from now. A malformed deadline is a bad request.
    pub fn from_headers(
        headers: Option<&HeaderMap>,
        default_timeout: Duration,
    ) -> Result<Self, Error> {
        let get = |name: &str| {
            headers
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_string())
        };
        let request_id = match get(REQUEST_ID_HEADER) {
            Some(id) if !id.is_empty() && id.len() <= 128 => id,
            Some(_) => {
                return Err(Error::bad_request(format!(
                    "header {REQUEST_ID_HEADER} must be 1 to 128 bytes"
                )))
            }
            None => new_request_id(),
        };
        let deadline = match get(DEADLINE_HEADER) {
            Some(v) => from_epoch_ms(v.trim().parse::<u64>().map_err(|_| {
                Error::bad_request(format!(
                    "header {DEADLINE_HEADER} must be Unix epoch milliseconds, got `{v}`"
                ))
            })?),
            None => SystemTime::now() + default_timeout,
        };
        // Nobody waits longer than this, whatever a publisher asks for.
        let deadline = deadline.min(SystemTime::now() + MAX_DEADLINE);
        let stream_inbox = match get(wire::STREAM_INBOX_HEADER) {
            Some(s) if valid_subject(&s) => Some(s),
            Some(s) => {
                return Err(Error::bad_request(format!(
                    "header {} must be a plain subject (no spaces or wildcards, at most 256 bytes), got `{s}`",
                    wire::STREAM_INBOX_HEADER
                )))
            }
            None => None,
        };
        let api_key = get(crate::protocol::headers::API_KEY);
        let team = get(crate::protocol::headers::TEAM).filter(|t| !t.is_empty() && t.len() <= 64);
        Ok(RequestMeta {
            request_id,
            deadline,
            stream_inbox,
            api_key,
            team,
        })
    }

    pub fn headers(&self, format: Format) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(REQUEST_ID_HEADER, self.request_id.as_str());
        h.insert(
            DEADLINE_HEADER,
            epoch_ms(self.deadline).to_string().as_str(),
        );
        if let Some(inbox) = &self.stream_inbox {
            h.insert(wire::STREAM_INBOX_HEADER, inbox.as_str());
        }
        if let Some(key) = &self.api_key {
            h.insert(crate::protocol::headers::API_KEY, key.as_str());
        }
        if let Some(team) = &self.team {
            h.insert(crate::protocol::headers::TEAM, team.as_str());
        }
        if format == Format::Json {
            h.insert(wire::CONTENT_TYPE_HEADER, wire::JSON_CONTENT_TYPE);
        }
        h
    }

    /// The subject a streaming requester listens on to cancel generation.
    pub fn cancel_subject(&self) -> Option<String> {
        self.stream_inbox
            .as_deref()
            .map(crate::protocol::Subjects::cancel)
    }
}

/// A subject we are willing to publish to on a caller's behalf.
pub(crate) fn valid_subject(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && !s.starts_with('.')
        && !s.ends_with('.')
        && !s.contains("..")
        && !s
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '*' || c == '>')
}

/// Whether `subject` is `prefix` itself or lies under it, token-wise:
/// `_INBOX` covers `_INBOX.abc.1` but not `_INBOXES.x`.
pub fn under_prefix(subject: &str, prefix: &str) -> bool {
    match subject.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('.'),
        None => false,
    }
}

/// Whether a worker may answer on (or stream to) `subject`: a plain subject
/// strictly under one of `prefixes` (an inbox, never the prefix alone).
pub fn is_allowed_reply(subject: &str, prefixes: &[String]) -> bool {
    valid_subject(subject)
        && prefixes
            .iter()
            .any(|p| subject.len() > p.len() && under_prefix(subject, p))
}

/// A fresh, unique request id (a NUID: 22 characters, no coordination needed).
pub fn new_request_id() -> String {
    nuid::next().to_string()
}

/// Sends a request and waits for its reply until the meta's deadline (or
/// for `wait`, when given: a caller that lets the worker give up first, so
/// the worker's own verdict arrives). Fails fast with `nats_unavailable`
/// when disconnected and `no_responders` when nobody listens; decodes error
/// replies into their kind.
pub async fn request<Req: Serialize, Resp: DeserializeOwned>(
    client: &Client,
    subject: &str,
    meta: &RequestMeta,
    wait: Option<Duration>,
    req: &Req,
) -> Result<Resp, Error> {
    if !is_connected(client) {
        return Err(Error::new(
            ErrorKind::NatsUnavailable,
            "NATS is not connected",
        ));
    }
    if meta.remaining().is_zero() {
        return Err(Error::new(
            ErrorKind::Timeout,
            "deadline passed before the request was sent",
        ));
    }
    let timeout = wait.unwrap_or_else(|| meta.remaining());
    if timeout.is_zero() {
        return Err(Error::new(
            ErrorKind::Timeout,
            "deadline passed before the request was sent",
        ));
    }
    let body = wire::encode(Format::MsgPack, req)?;
    let request = async_nats::Request::new()
        .payload(body)
        .headers(meta.headers(Format::MsgPack))
        .timeout(Some(timeout));
    let msg = client
        .send_request(subject.to_string(), request)
        .await
        .map_err(|e| match e.kind() {
            RequestErrorKind::NoResponders => Error::new(
                ErrorKind::NoResponders,
                format!("no responders on {subject}"),
            ),
            RequestErrorKind::TimedOut => Error::new(
                ErrorKind::Timeout,
                format!("no reply on {subject} within {timeout:?}"),
            ),
            _ => Error::new(
                ErrorKind::NatsUnavailable,
                format!("request on {subject} failed: {e}"),
            ),
        })?;
    if let Some(err) = reply_error(msg.headers.as_ref(), &msg.payload, Format::MsgPack) {
        return Err(err);
    }
    wire::decode(Format::MsgPack, &msg.payload)
        .map_err(|e| Error::internal(format!("undecodable reply on {subject}: {}", e.message)))
}

/// The error a reply carries, if it is an error reply.
pub fn reply_error(headers: Option<&HeaderMap>, body: &[u8], format: Format) -> Option<Error> {
    let headers = headers?;
    let code = headers.get(NATS_SERVICE_ERROR_CODE)?;
    if let Ok(b) = wire::decode::<ErrorBody>(format, body) {
        return Some(b.into());
    }
    let status: u16 = code.as_str().parse().unwrap_or(500);
    let message = headers
        .get(NATS_SERVICE_ERROR)
        .map(|v| v.as_str().to_string())
        .unwrap_or_default();
    let kind = match status {
        400 => ErrorKind::BadRequest,
        429 => ErrorKind::RateLimited,
        502 => ErrorKind::UpstreamError,
        503 => ErrorKind::NoResponders,
        504 => ErrorKind::Timeout,
        _ => ErrorKind::Internal,
    };
    Some(Error::new(kind, message))
}

/// Warns when a stream or bucket that already existed keeps another number
/// of copies than `nats.replicas` asks for: an existing one is used as it
/// is (raising `nats.replicas` later does not move its data; an operator
/// changes it with `nats stream edit <stream> --replicas <n>`).
pub fn check_replicas(what: &str, stream: &str, have: usize, want: usize) {
    if have != want {
        tracing::warn!(
            what,
            stream,
            have,
            want,
            "the existing stream has another number of replicas than nats.replicas; \
             it is used as it is (nats stream edit <stream> --replicas <n> changes it)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_only_under_the_inbox_prefixes() {
        let p = vec!["_INBOX".to_string(), "_INBOX_ingress".to_string()];
        assert!(is_allowed_reply("_INBOX.abc.1", &p));
        assert!(is_allowed_reply("_INBOX_ingress.abc", &p));
        for bad in [
            "_INBOX",
            "_INBOXES.abc",
            "_INBOX_router.abc",
            "$KV.optiroute-cache.0123",
            "$JS.API.STREAM.DELETE.KV_optiroute-cache",
            "$JS.ACK.OPTIROUTE_BATCH.x",
            "optiroute.batch.x",
            "_INBOX.*",
            "_INBOX.>",
            "_INBOX..x",
            "",
        ] {
            assert!(!is_allowed_reply(bad, &p), "{bad}");
        }
    }

    #[test]
    fn credentials_come_from_the_url_and_stay_out_of_messages() {
        assert_eq!(url_auth("nats://127.0.0.1:4222"), None);
        assert_eq!(
            url_auth("nats://router:change-me-router@127.0.0.1:4222"),
            Some(UrlAuth::UserPassword(
                "router".into(),
                "change-me-router".into()
            ))
        );
        assert_eq!(
            url_auth("nats://a:4222, nats://u:p%40ss%3A1@b:4222"),
            Some(UrlAuth::UserPassword("u".into(), "p@ss:1".into()))
        );
        assert_eq!(
            url_auth("nats://s3cr3t@h:4222"),
            Some(UrlAuth::Token("s3cr3t".into()))
        );
        // A comma separates servers, so one in a password is written %2C.
        assert_eq!(
            url_auth("nats://u:p%2Cw@h:4222"),
            Some(UrlAuth::UserPassword("u".into(), "p,w".into()))
        );
        assert_eq!(
            redacted("nats://u:p@a:4222,nats://b:4222,u:p@@c:1"),
            "nats://***@a:4222,nats://b:4222,***@c:1"
        );
        assert_eq!(
            server_urls("nats://u:p@a:4222, nats://b:4222,,tls://t@[::1]:4222"),
            vec!["nats://a:4222", "nats://b:4222", "tls://[::1]:4222"]
        );
    }
}
