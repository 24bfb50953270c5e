//! `[auth]`: who may call OptiRoute, and how budgets and rate limits are
//! shared between replicas.

use serde::Deserialize;

/// Whether callers must present an API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Anonymous callers, as before keys existed: allowed only while the
    /// ingress listens on loopback (or `allow_anonymous_public`).
    #[default]
    Off,
    /// Every request carries a key (HTTP bearer, or the NATS header
    /// `Optiroute-Api-Key`); budgets and rate limits apply.
    Required,
}

impl AuthMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::Off => "off",
            AuthMode::Required => "required",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub mode: AuthMode,
    /// The admin key for `/admin/*` (also `OPTIROUTE_ADMIN_KEY`). Without
    /// one the admin API answers 401 to everyone.
    pub admin_key: Option<String>,
    /// Lets `mode = "off"` listen beyond loopback: anyone who reaches the
    /// port spends money.
    pub allow_anonymous_public: bool,
    /// A lease of budget or rate-limit capacity held by a replica that
    /// stops renewing it (it died) returns to the pool after this long.
    pub lease_ttl_ms: u64,
    /// A replica that has nothing in flight on a budget gives its unused
    /// lease back after this long.
    pub lease_idle_ms: u64,
    /// Longest a request waits for budget held by requests in flight (their
    /// reservations settle below the most they could cost) before 429.
    pub budget_wait_ms: u64,
    /// Spend records (`<PREFIX>_SPEND`) are kept this many days.
    pub spend_retention_days: u64,
    /// Write spend records for anonymous requests too (`mode = "off"`).
    pub record_anonymous: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: AuthMode::Off,
            admin_key: None,
            allow_anonymous_public: false,
            lease_ttl_ms: 10_000,
            lease_idle_ms: 200,
            budget_wait_ms: 5_000,
            spend_retention_days: 400,
            record_anonymous: false,
        }
    }
}

/// Whether `listen` (`host:port`) accepts only this machine's connections.
pub fn is_loopback_listen(listen: &str) -> bool {
    let host = match listen.rsplit_once(':') {
        Some((h, _)) => h,
        None => listen,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_listeners() {
        for l in [
            "127.0.0.1:8000",
            "localhost:1",
            "[::1]:8000",
            "127.0.0.2:80",
        ] {
            assert!(is_loopback_listen(l), "{l}");
        }
        for l in [
            "0.0.0.0:8000",
            "[::]:8000",
            "10.0.0.1:8000",
            "example.com:80",
        ] {
            assert!(!is_loopback_listen(l), "{l}");
        }
    }
}
