//! Configuration: one TOML file, then `OPTIROUTE__SECTION__KEY=value`
//! environment overrides, then `--set section.key=value` flags. Every process
//! reads the same file and uses its own sections. Unknown keys are errors that
//! name the key, so a typo never silently falls back to a default.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::Error;

mod auth;
mod batch;
mod cache;
mod roles;
mod routing;
mod semantic;

pub use auth::{is_loopback_listen, AuthConfig, AuthMode};
pub use batch::BatchConfig;
pub use cache::{CacheConfig, CacheScope};
pub use roles::{
    BreakerConfig, CloudConfig, EmbeddedConfig, EmbeddingConfig, LocalConfig, LocalEngineKind,
    ModelPrice, RouterConfig, ServiceSettings, SimulatedConfig, UpstreamConfig,
};
pub use routing::{LearnedConfig, RouterKind, RoutingConfig, RoutingWeights};
pub use semantic::{SemanticConfig, DEFAULT_SEMANTIC_THRESHOLD};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub nats: NatsConfig,
    pub log: LogConfig,
    pub ingress: IngressConfig,
    pub router: RouterConfig,
    pub cache: CacheConfig,
    pub local: LocalConfig,
    pub cloud: CloudConfig,
    pub batch: BatchConfig,
    pub auth: AuthConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Comma-separated server URLs.
    pub url: String,
    /// Subject prefix, so several deployments can share one NATS system.
    pub prefix: String,
    /// Upper bound of the reconnect backoff, in milliseconds.
    pub max_reconnect_delay_ms: u64,
    /// Where replies and streamed tokens come back to this process. Give
    /// each role its own (`nats/accounts.conf` uses `_INBOX_<role>`) so a
    /// user may only read its own replies.
    pub inbox_prefix: String,
    /// Where this process's endpoints may answer: a request whose reply
    /// subject (or `Optiroute-Stream-Inbox` header) is not under one of
    /// these is refused, so a requester cannot make a worker write into a
    /// KV bucket (`$KV.…`) or call the JetStream API (`$JS.…`) as its reply.
    /// List every requester's `inbox_prefix`; this process's own is always
    /// added. The default covers async-nats's `_INBOX` and the per-role
    /// inboxes of `nats/accounts.conf`.
    pub reply_prefixes: Vec<String>,
    /// PEM file of the certificate authority to trust for `tls://` servers
    /// (`nats/cluster/` uses the one `scripts/make-certs.sh` makes). When
    /// set, the connection must be TLS.
    pub tls_ca_file: Option<String>,
    /// Copies of every stream and bucket this process creates (the cache,
    /// the batch stream and buckets): 1 on one server, 3 on a 3-node
    /// cluster. One setting for every role.
    pub replicas: usize,
}

/// The reply prefixes allowed by default: async-nats's own and the
/// `_INBOX_<role>` inboxes `nats/accounts.conf` gives each user.
pub const DEFAULT_REPLY_PREFIXES: &[&str] = &[
    "_INBOX",
    "_INBOX_ingress",
    "_INBOX_router",
    "_INBOX_provider",
    "_INBOX_batch",
    "_INBOX_client",
];

impl NatsConfig {
    /// `reply_prefixes` plus this process's own `inbox_prefix`.
    pub fn allowed_reply_prefixes(&self) -> Vec<String> {
        let mut v = self.reply_prefixes.clone();
        if !v.contains(&self.inbox_prefix) {
            v.push(self.inbox_prefix.clone());
        }
        v
    }
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            prefix: crate::protocol::DEFAULT_PREFIX.into(),
            max_reconnect_delay_ms: 2000,
            inbox_prefix: "_INBOX".into(),
            reply_prefixes: DEFAULT_REPLY_PREFIXES
                .iter()
                .map(|p| p.to_string())
                .collect(),
            tls_ca_file: None,
            replicas: 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// `tracing` filter directive; `RUST_LOG` wins when set.
    pub level: String,
    /// Log prompts and answers (user data). Off by default.
    pub log_payloads: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
            log_payloads: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngressConfig {
    /// The public HTTP API. Loopback by default: bind a public address only
    /// behind something that authenticates. `/metrics` is served here only
    /// while this is a loopback address.
    pub listen: String,
    /// `/metrics`, `/health`, `/ready` for operators (port 0 picks a free one).
    pub admin_listen: String,
    /// Deadline given to each request, end to end.
    pub request_timeout_ms: u64,
    pub max_prompt_bytes: usize,
    /// How long `/ready` waits for a router to answer its probe.
    pub ready_probe_timeout_ms: u64,
    pub drain_timeout_ms: u64,
    /// HTTP requests served at once (streams count until their headers are
    /// sent); beyond it a request is answered 503 with `Retry-After`.
    /// `/health` and `/metrics` are not counted.
    pub max_in_flight_requests: usize,
    /// Streamed completions open at once; beyond it 503 with `Retry-After`.
    pub max_streams: usize,
    /// Longest one streamed event may wait for a client that stopped
    /// reading; then the stream is dropped and the provider told to stop.
    pub stream_send_timeout_ms: u64,
    /// Longest a client may take to send a request's headers (slowloris);
    /// then the connection is closed.
    pub header_read_timeout_ms: u64,
    /// Longest a client may take to send a request's whole body; then 408.
    pub body_read_timeout_ms: u64,
}

impl Default for IngressConfig {
    fn default() -> Self {
        IngressConfig {
            listen: "127.0.0.1:8000".into(),
            admin_listen: "127.0.0.1:9100".into(),
            request_timeout_ms: 30_000,
            max_prompt_bytes: 32 * 1024,
            ready_probe_timeout_ms: 500,
            drain_timeout_ms: 10_000,
            max_in_flight_requests: 4096,
            max_streams: 1024,
            stream_send_timeout_ms: 10_000,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 60_000,
        }
    }
}

/// The largest `cloud.breaker.max_open_ms` accepted: a day, far below any
/// overflow of the clock.
const MAX_OPEN_LIMIT_MS: u64 = 86_400_000;

/// Command-line options every binary accepts.
#[derive(Debug, Default, Clone)]
pub struct CliArgs {
    pub config: Option<PathBuf>,
    pub sets: Vec<(String, String)>,
    pub log_json: bool,
}

pub const USAGE: &str = "options:
  --config FILE          TOML configuration file (default: $OPTIROUTE_CONFIG, else built-in defaults)
  --set SECTION.KEY=VAL  override one setting (repeatable), e.g. --set nats.url=nats://host:4222
  --log-json             JSON logs
  -h, --help             this help
environment: OPTIROUTE__SECTION__KEY=value overrides the file, e.g. OPTIROUTE__NATS__URL";

impl CliArgs {
    /// Parses `std::env::args`; `Ok(None)` means help was printed.
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Option<CliArgs>, Error> {
        let mut out = CliArgs::default();
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            let mut value_of = |name: &str, inline: Option<&str>| -> Result<String, Error> {
                match inline {
                    Some(v) => Ok(v.to_string()),
                    None => it
                        .next()
                        .ok_or_else(|| Error::bad_request(format!("{name} needs a value"))),
                }
            };
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v)),
                _ => (arg.clone(), None),
            };
            match flag.as_str() {
                "-h" | "--help" => return Ok(None),
                "--config" => out.config = Some(PathBuf::from(value_of("--config", inline)?)),
                "--set" => {
                    let kv = value_of("--set", inline)?;
                    let (k, v) = kv.split_once('=').ok_or_else(|| {
                        Error::bad_request(format!("--set expects SECTION.KEY=VALUE, got `{kv}`"))
                    })?;
                    out.sets.push((k.trim().to_string(), v.to_string()));
                }
                "--log-json" => out.log_json = true,
                other => {
                    return Err(Error::bad_request(format!(
                        "unknown argument `{other}`\n{USAGE}"
                    )))
                }
            }
        }
        Ok(Some(out))
    }
}

impl Config {
    /// Loads the file (if any), then environment overrides, then `--set` flags.
    pub fn load(args: &CliArgs) -> Result<Config, Error> {
        let path = args
            .config
            .clone()
            .or_else(|| std::env::var_os("OPTIROUTE_CONFIG").map(PathBuf::from));
        let env: Vec<(String, String)> = std::env::vars().collect();
        let mut cfg = Self::from_parts(path.as_deref(), &env, &args.sets)?;
        if args.log_json {
            cfg.log.format = LogFormat::Json;
        }
        Ok(cfg)
    }

    /// The pure part of [`Config::load`], for tests.
    pub fn from_parts(
        path: Option<&Path>,
        env: &[(String, String)],
        sets: &[(String, String)],
    ) -> Result<Config, Error> {
        let mut root = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| {
                    Error::bad_request(format!("cannot read config file {}: {e}", p.display()))
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| Error::bad_request(format!("config file {}: {e}", p.display())))?
            }
            None => toml::Table::new(),
        };
        for (k, v) in env {
            if let Some(rest) = k.strip_prefix("OPTIROUTE__") {
                let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
                set_path(&mut root, &path, v, k)?;
            }
        }
        for (k, v) in sets {
            let path: Vec<String> = k.split('.').map(str::to_string).collect();
            set_path(&mut root, &path, v, &format!("--set {k}"))?;
        }
        let given = |section: &str, key: &str| {
            root.get(section)
                .and_then(|s| s.as_table())
                .is_some_and(|s| s.contains_key(key))
        };
        let derive = [
            !given("cache", "bucket"),
            !given("batch", "stream"),
            !given("batch", "meta_bucket"),
            !given("batch", "results_bucket"),
            !given("batch", "consumer"),
        ];
        let mut cfg: Config =
            serde_path_to_error::deserialize(toml::Value::Table(root)).map_err(|e| {
                let path = e.path().to_string();
                // Keys that moved: say where.
                let moved = match path.as_str() {
                    "cache.replicas" | "batch.replicas" => {
                        " (moved to `nats.replicas`, one setting for every stream and bucket)"
                    }
                    _ => "",
                };
                Error::bad_request(format!("config key `{path}`: {}{moved}", e.inner()))
            })?;
        // JetStream names not set follow the prefix, so deployments under
        // different prefixes never share a cache or a batch queue.
        let names = crate::protocol::JetStreamNames::for_prefix(&cfg.nats.prefix);
        for (derived, (slot, name)) in derive.into_iter().zip([
            (&mut cfg.cache.bucket, names.cache_bucket),
            (&mut cfg.batch.stream, names.batch_stream),
            (&mut cfg.batch.meta_bucket, names.batch_meta_bucket),
            (&mut cfg.batch.results_bucket, names.batch_results_bucket),
            (&mut cfg.batch.consumer, names.batch_consumer),
        ]) {
            if derived {
                *slot = name;
            }
        }
        if cfg.auth.admin_key.is_none() {
            cfg.auth.admin_key = env
                .iter()
                .find(|(k, v)| k == "OPTIROUTE_ADMIN_KEY" && !v.is_empty())
                .map(|(_, v)| v.clone());
        }
        // Credentials the original OptiRoute users already have.
        if cfg.cloud.upstream.api_key.is_none() {
            cfg.cloud.upstream.api_key = env
                .iter()
                .find(|(k, v)| {
                    (k == "OPTIROUTE_CLOUD_API_KEY" || k == "HF_API_TOKEN") && !v.is_empty()
                })
                .map(|(_, v)| v.clone());
        }
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), Error> {
        let bad =
            |key: &str, why: &str| Err(Error::bad_request(format!("config key `{key}`: {why}")));
        if self.auth.mode == AuthMode::Off
            && !self.auth.allow_anonymous_public
            && !is_loopback_listen(&self.ingress.listen)
        {
            return Err(Error::bad_request(format!(
                "config key `auth.mode`: \"off\" lets anyone who reaches {} spend money; \
                 set auth.mode = \"required\" (and create keys), listen on 127.0.0.1, \
                 or set auth.allow_anonymous_public = true to accept that",
                self.ingress.listen
            )));
        }
        if self.auth.admin_key.as_ref().is_some_and(|k| k.len() < 16) {
            return bad("auth.admin_key", "must be at least 16 characters");
        }
        if self.auth.lease_ttl_ms < 1_000 || self.auth.lease_ttl_ms > 300_000 {
            return bad("auth.lease_ttl_ms", "must be 1000 to 300000");
        }
        if self.auth.budget_wait_ms > 60_000 {
            return bad("auth.budget_wait_ms", "must be at most 60000");
        }
        if self.nats.prefix.is_empty()
            || self
                .nats
                .prefix
                .chars()
                .any(|c| c.is_whitespace() || c == '*' || c == '>')
        {
            return bad(
                "nats.prefix",
                "must be a non-empty subject token without spaces or wildcards",
            );
        }
        if !crate::nats::valid_subject(&self.nats.inbox_prefix) {
            return bad(
                "nats.inbox_prefix",
                "must be a subject without spaces or wildcards, e.g. _INBOX_router",
            );
        }
        if self.nats.reply_prefixes.is_empty() {
            return bad(
                "nats.reply_prefixes",
                "must list at least one inbox prefix, e.g. [\"_INBOX\"]",
            );
        }
        for p in &self.nats.reply_prefixes {
            if !crate::nats::valid_subject(p) {
                return bad(
                    "nats.reply_prefixes",
                    "each entry must be a subject without spaces or wildcards, e.g. _INBOX_ingress",
                );
            }
            // System subjects ($JS, $KV, $SRV, $SYS...) and the deployment's
            // own subjects are exactly where replies must never go.
            if p.starts_with('$') || crate::nats::under_prefix(p, &self.nats.prefix) {
                return bad(
                    "nats.reply_prefixes",
                    &format!("`{p}` is a system or service subject, not an inbox"),
                );
            }
        }
        if let Some(ca) = &self.nats.tls_ca_file {
            if !Path::new(ca).is_file() {
                return bad("nats.tls_ca_file", &format!("no such file: {ca}"));
            }
        }
        if self.cache.ttl_secs == 0 {
            return bad("cache.ttl_secs", "must be at least 1");
        }
        if self.nats.replicas == 0 || self.nats.replicas > 5 {
            return bad("nats.replicas", "must be between 1 and 5");
        }
        if let Err((key, why)) = self.router.routing.check() {
            return bad(&format!("router.routing.{key}"), why);
        }
        if let Err((key, why)) = self.batch.check() {
            return bad(&format!("batch.{key}"), why);
        }
        if self.cloud.breaker.failure_threshold == 0 {
            return bad("cloud.breaker.failure_threshold", "must be at least 1");
        }
        let b = &self.cloud.breaker;
        if b.max_open_ms == 0 || b.max_open_ms > MAX_OPEN_LIMIT_MS {
            return bad(
                "cloud.breaker.max_open_ms",
                "must be between 1 and 86400000 (one day)",
            );
        }
        if b.open_ms > b.max_open_ms {
            return bad(
                "cloud.breaker.open_ms",
                "must not exceed cloud.breaker.max_open_ms",
            );
        }
        let r = &self.router;
        if r.max_deadline_ms == 0 || r.max_deadline_ms > 600_000 {
            return bad(
                "router.max_deadline_ms",
                "must be between 1 and 600000 (ten minutes)",
            );
        }
        if r.default_deadline_ms > r.max_deadline_ms {
            return bad(
                "router.default_deadline_ms",
                "must not exceed router.max_deadline_ms",
            );
        }
        if let Err((key, why)) = self.cache.semantic.check() {
            return bad(&format!("cache.semantic.{key}"), why);
        }
        if self.cache.max_waiters_per_key == 0 {
            return bad("cache.max_waiters_per_key", "must be at least 1");
        }
        let e = &self.local.embedded;
        if e.max_concurrent > 1024 {
            return bad(
                "local.embedded.max_concurrent",
                "must be at most 1024 (0 = 16)",
            );
        }
        if e.max_queue > 100_000 {
            return bad("local.embedded.max_queue", "must be at most 100000");
        }
        if e.max_kv_cache_mib == 0 {
            return bad("local.embedded.max_kv_cache_mib", "must be at least 1");
        }
        if e.prefill_chunk == 0 || e.prefill_chunk > 4096 {
            return bad("local.embedded.prefill_chunk", "must be between 1 and 4096");
        }
        let mut prices = vec![
            (
                "cloud.input_price_per_1k".to_string(),
                self.cloud.input_price_per_1k,
            ),
            (
                "cloud.output_price_per_1k".to_string(),
                self.cloud.output_price_per_1k,
            ),
        ];
        for (model, p) in &self.cloud.prices {
            prices.push((format!("cloud.prices.{model}.input_per_1k"), p.input_per_1k));
            prices.push((
                format!("cloud.prices.{model}.output_per_1k"),
                p.output_per_1k,
            ));
        }
        for (key, price) in prices {
            if !(price.is_finite() && price >= 0.0) {
                return bad(&key, "must be a finite number, 0 or more");
            }
        }
        for (key, n) in [
            ("router.max_in_flight", self.router.max_in_flight),
            ("local.max_in_flight", self.local.max_in_flight),
            ("cloud.max_in_flight", self.cloud.max_in_flight),
            (
                "ingress.max_in_flight_requests",
                self.ingress.max_in_flight_requests,
            ),
            ("ingress.max_streams", self.ingress.max_streams),
            (
                "ingress.stream_send_timeout_ms",
                to_usize(self.ingress.stream_send_timeout_ms),
            ),
            (
                "ingress.header_read_timeout_ms",
                to_usize(self.ingress.header_read_timeout_ms),
            ),
            (
                "ingress.body_read_timeout_ms",
                to_usize(self.ingress.body_read_timeout_ms),
            ),
        ] {
            if n == 0 {
                return bad(key, "must be at least 1");
            }
        }
        Ok(())
    }
}

/// For the "at least 1" check: any value past `usize` is large enough.
fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// Sets `root.a.b.c = value`, reading `value` as a TOML literal when it is one
/// (number, boolean, array) and as a string otherwise.
fn set_path(
    root: &mut toml::Table,
    path: &[String],
    value: &str,
    origin: &str,
) -> Result<(), Error> {
    let Some((last, parents)) = path.split_last() else {
        return Err(Error::bad_request(format!("{origin}: empty key")));
    };
    let mut table = root;
    for p in parents {
        let entry = table
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| Error::bad_request(format!("{origin}: `{p}` is not a section")))?;
    }
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    table.insert(last.clone(), parsed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = Config::from_parts(None, &[], &[]).unwrap();
        // Nothing listens beyond this host unless asked to.
        for listen in [
            &c.ingress.listen,
            &c.ingress.admin_listen,
            &c.router.admin_listen,
            &c.local.admin_listen,
            &c.cloud.admin_listen,
            &c.batch.admin_listen,
        ] {
            let addr: std::net::SocketAddr = listen.parse().unwrap();
            assert!(addr.ip().is_loopback(), "{listen}");
        }
        assert_eq!(c.ingress.listen, "127.0.0.1:8000");
        assert_eq!(c.ingress.admin_listen, "127.0.0.1:9100");
        assert_eq!(c.cloud.breaker.failure_threshold, 3);
        assert_eq!(c.cache.ttl_secs, 3600);
    }

    #[test]
    fn replicas_is_one_setting_and_the_old_keys_say_where_it_went() {
        let set = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
        let c = Config::from_parts(None, &[], &set("nats.replicas", "3")).unwrap();
        assert_eq!(c.nats.replicas, 3);
        for old in ["cache.replicas", "batch.replicas"] {
            let e = Config::from_parts(None, &[], &set(old, "3")).unwrap_err();
            assert!(e.message.contains(old), "{}", e.message);
            assert!(
                e.message.contains("moved to `nats.replicas`"),
                "{}",
                e.message
            );
        }
        for bad in ["0", "6"] {
            let e = Config::from_parts(None, &[], &set("nats.replicas", bad)).unwrap_err();
            assert!(e.message.contains("nats.replicas"), "{}", e.message);
        }
    }

    #[test]
    fn file_then_env_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "[nats]\nurl = \"nats://file:1\"\n[cache]\nttl_secs = 5\n",
        )
        .unwrap();
        let env = vec![
            ("OPTIROUTE__CACHE__TTL_SECS".to_string(), "7".to_string()),
            ("HF_API_TOKEN".to_string(), "hf_x".to_string()),
        ];
        let sets = vec![("cloud.breaker.open_ms".to_string(), "10".to_string())];
        let c = Config::from_parts(Some(&p), &env, &sets).unwrap();
        assert_eq!(c.nats.url, "nats://file:1");
        assert_eq!(c.cache.ttl_secs, 7);
        assert_eq!(c.cloud.breaker.open_ms, 10);
        assert_eq!(c.cloud.upstream.api_key.as_deref(), Some("hf_x"));
    }

    #[test]
    fn batch_limits_are_checked_and_named() {
        for (key, value) in [
            ("batch.retention_hours", "0"),
            ("batch.max_line_bytes", "0"),
            ("batch.max_queue_bytes", "-1"),
            ("batch.store_attempts", "0"),
        ] {
            let e = Config::from_parts(None, &[], &[(key.into(), value.into())]).unwrap_err();
            assert!(e.message.contains(key), "{}", e.message);
        }
        let e = Config::from_parts(
            None,
            &[],
            &[
                ("batch.ack_wait_ms".into(), "30000".into()),
                ("batch.request_timeout_ms".into(), "30000".into()),
            ],
        )
        .unwrap_err();
        assert!(
            e.message.contains("batch.request_timeout_ms")
                && e.message.contains("batch.ack_wait_ms"),
            "{}",
            e.message
        );
        let e = Config::from_parts(None, &[], &[("batch.results_ttl_secs".into(), "5".into())])
            .unwrap_err();
        assert!(e.message.contains("results_ttl_secs"), "{}", e.message);
        assert_eq!(Config::default().batch.retention_hours, 168);
    }

    #[test]
    fn unknown_and_invalid_keys_are_named() {
        let e = Config::from_parts(None, &[], &[("cache.ttl".into(), "5".into())]).unwrap_err();
        assert!(e.message.contains("ttl"), "{}", e.message);
        let e =
            Config::from_parts(None, &[], &[("cache.ttl_secs".into(), "0".into())]).unwrap_err();
        assert!(e.message.contains("cache.ttl_secs"), "{}", e.message);
        let e = Config::from_parts(None, &[], &[("router.max_in_flight".into(), "many".into())])
            .unwrap_err();
        assert!(e.message.contains("max_in_flight"), "{}", e.message);
        for bad in ["", "_INBOX.>", "a b", ".x"] {
            let e = Config::from_parts(None, &[], &[("nats.inbox_prefix".into(), bad.into())])
                .unwrap_err();
            assert!(e.message.contains("nats.inbox_prefix"), "{}", e.message);
        }
        let c = Config::from_parts(
            None,
            &[],
            &[("nats.inbox_prefix".into(), "_INBOX_router".into())],
        )
        .unwrap();
        assert_eq!(c.nats.inbox_prefix, "_INBOX_router");
        assert!(c
            .nats
            .allowed_reply_prefixes()
            .contains(&"_INBOX_router".to_string()));
        for bad in [
            "[]",
            "[\"$KV.optiroute-cache\"]",
            "[\"optiroute.x\"]",
            "[\"_INBOX.>\"]",
        ] {
            let e = Config::from_parts(None, &[], &[("nats.reply_prefixes".into(), bad.into())])
                .unwrap_err();
            assert!(
                e.message.contains("nats.reply_prefixes"),
                "{bad}: {}",
                e.message
            );
        }
        let c = Config::from_parts(
            None,
            &[("OPTIROUTE__NATS__INBOX_PREFIX".into(), "_INBOX_edge".into())],
            &[(
                "nats.reply_prefixes".into(),
                "[\"_INBOX_a\", \"_INBOX_b\"]".into(),
            )],
        )
        .unwrap();
        assert_eq!(
            c.nats.allowed_reply_prefixes(),
            vec!["_INBOX_a", "_INBOX_b", "_INBOX_edge"]
        );
    }

    #[test]
    fn cli_flags_parse() {
        let a = CliArgs::parse(
            [
                "--config",
                "x.toml",
                "--set",
                "nats.url=nats://h:1",
                "--log-json",
            ]
            .map(String::from),
        )
        .unwrap()
        .unwrap();
        assert_eq!(a.config.as_deref(), Some(Path::new("x.toml")));
        assert_eq!(
            a.sets,
            vec![("nats.url".to_string(), "nats://h:1".to_string())]
        );
        assert!(a.log_json);
        assert!(CliArgs::parse(["--bogus".to_string()]).is_err());
        assert!(CliArgs::parse(["--help".to_string()]).unwrap().is_none());
    }

    #[test]
    fn limits_on_upstream_numbers_and_deadlines_are_checked() {
        let c = Config::from_parts(None, &[], &[]).unwrap();
        assert_eq!(c.cloud.breaker.max_open_ms, 600_000);
        assert_eq!(c.router.max_deadline_ms, 120_000);
        assert_eq!(c.cache.max_waiters_per_key, 256);
        for (key, value) in [
            ("cloud.breaker.max_open_ms", "0"),
            ("cloud.breaker.max_open_ms", "18446744073709551615"),
            ("cloud.breaker.open_ms", "700000"),
            ("router.max_deadline_ms", "600001"),
            ("router.default_deadline_ms", "130000"),
            ("cache.max_waiters_per_key", "0"),
            ("cloud.input_price_per_1k", "-1.0"),
            ("cloud.output_price_per_1k", "inf"),
        ] {
            let err = Config::from_parts(None, &[], &[(key.into(), value.into())]).unwrap_err();
            assert!(err.message.contains(key), "{key}={value}: {}", err.message);
        }
    }

    #[test]
    fn jetstream_names_follow_the_prefix_unless_set() {
        let set = |k: &str, v: &str| (k.to_string(), v.to_string());
        let d = Config::from_parts(None, &[], &[]).unwrap();
        assert_eq!(d.cache.bucket, "optiroute-cache");
        assert_eq!(d.batch.stream, "OPTIROUTE_BATCH");
        assert_eq!(d.batch.meta_bucket, "optiroute-batches");
        assert_eq!(d.batch.results_bucket, "optiroute-batch-results");
        assert_eq!(d.batch.consumer, "optiroute-batch-workers");
        let blue = Config::from_parts(
            None,
            &[],
            &[
                set("nats.prefix", "team.blue"),
                set("batch.meta_bucket", "mine"),
            ],
        )
        .unwrap();
        assert_eq!(blue.cache.bucket, "team_blue-cache");
        assert_eq!(blue.batch.stream, "TEAM_BLUE_BATCH");
        assert_eq!(blue.batch.meta_bucket, "mine", "a key that is set wins");
        assert_eq!(blue.batch.results_bucket, "team_blue-batch-results");
        assert_eq!(blue.batch.consumer, "team_blue-batch-workers");
    }
}
