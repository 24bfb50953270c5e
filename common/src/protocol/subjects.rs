//! Subject, queue group and service names, under a configurable prefix so
//! several deployments can share one NATS system.

use crate::wire::Pool;

/// All subjects and service names of one deployment.
#[derive(Debug, Clone)]
pub struct Subjects {
    pub prefix: String,
    /// Generate requests, served by the routers.
    pub generate: String,
    pub provider_local: String,
    pub provider_cloud: String,
    /// NATS service API names (`$SRV.PING.<name>`): each deployment's own,
    /// so one deployment's probes never see another's services.
    pub router_service: String,
    pub local_service: String,
    pub cloud_service: String,
}

/// The token after the prefix in batch job subjects.
const BATCH_TOKEN: &str = ".batch";

/// `prefix` as a name token: service, bucket and stream names allow only
/// letters, digits, `-` and `_`, so any other character of the prefix (a
/// `.` between its tokens) becomes `_`.
pub(crate) fn name_token(prefix: &str) -> String {
    prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The service name of `role` in the deployment under `prefix`.
fn service_name(prefix: &str, role: &str) -> String {
    format!("{}-{role}", name_token(prefix))
}

impl Subjects {
    pub fn new(prefix: &str) -> Self {
        Subjects {
            prefix: prefix.to_string(),
            generate: format!("{prefix}.generate"),
            provider_local: format!("{prefix}.provider.local"),
            provider_cloud: format!("{prefix}.provider.cloud"),
            router_service: service_name(prefix, "router"),
            local_service: service_name(prefix, "local"),
            cloud_service: service_name(prefix, "cloud"),
        }
    }

    /// The request subject of a provider pool.
    pub fn provider(&self, pool: Pool) -> &str {
        match pool {
            Pool::Local => &self.provider_local,
            Pool::Cloud => &self.provider_cloud,
        }
    }

    /// The service name of a provider pool.
    pub fn provider_service(&self, pool: Pool) -> &str {
        match pool {
            Pool::Local => &self.local_service,
            Pool::Cloud => &self.cloud_service,
        }
    }

    /// The queue group every router replica shares.
    pub fn router_queue_group(&self) -> String {
        format!("{}.router", self.prefix)
    }

    /// The queue group every replica of a provider pool shares (its subject).
    pub fn provider_queue_group(&self, pool: Pool) -> String {
        self.provider(pool).to_string()
    }

    /// The subject a batch's jobs are published on (`id` is one token).
    pub fn batch_job(&self, id: &str) -> String {
        format!("{}{BATCH_TOKEN}.{id}", self.prefix)
    }

    /// The batch id of a job subject (the token after `<prefix>.batch.`),
    /// unchecked; `None` when the subject is not a batch job's.
    pub fn batch_id_of<'a>(&self, subject: &'a str) -> Option<&'a str> {
        subject
            .strip_prefix(self.prefix.as_str())
            .and_then(|s| s.strip_prefix(BATCH_TOKEN))
            .and_then(|s| s.strip_prefix('.'))
    }

    /// Every batch's jobs: the jobs stream's subject and the workers' filter.
    pub fn batch_jobs(&self) -> String {
        self.batch_job("*")
    }

    /// Where every router says it is alive, four times a second, with the
    /// ids of the requests it holds: an ingress fails at once the requests
    /// of a router that stopped, instead of waiting out their deadline
    /// (`crate::liveness`).
    pub fn router_alive(&self) -> String {
        format!("{}.alive.router", self.prefix)
    }

    /// The same for a provider pool's replicas, followed by the routers.
    pub fn pool_alive(&self, pool: Pool) -> String {
        format!("{}.alive.{}", self.prefix, pool.as_str())
    }

    /// The subject of a key's spend records (`id` is one token;
    /// `anonymous` when auth is off).
    pub fn spend(&self, key_id: &str) -> String {
        format!("{}.spend.{key_id}", self.prefix)
    }

    /// Every spend record: the spend stream's subject.
    pub fn spend_all(&self) -> String {
        self.spend("*")
    }

    /// Where a streaming requester publishes (anything) to stop the
    /// generation that streams to `inbox`.
    pub fn cancel(inbox: &str) -> String {
        format!("{inbox}.cancel")
    }
}

/// The NATS service API's discovery requests, answered by every instance
/// of the named service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discovery {
    Ping,
    Info,
    Stats,
}

impl Discovery {
    /// `$SRV.PING.<service>` and so on.
    pub fn subject(self, service: &str) -> String {
        let verb = match self {
            Discovery::Ping => "PING",
            Discovery::Info => "INFO",
            Discovery::Stats => "STATS",
        };
        format!("$SRV.{verb}.{service}")
    }
}

impl Default for Subjects {
    fn default() -> Self {
        Subjects::new(super::DEFAULT_PREFIX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_is_applied_everywhere() {
        let s = Subjects::new("blue");
        assert_eq!(s.generate, "blue.generate");
        assert_eq!(s.provider(Pool::Local), "blue.provider.local");
        assert_eq!(s.provider(Pool::Cloud), "blue.provider.cloud");
        assert_eq!(s.router_service, "blue-router");
        assert_eq!(s.provider_service(Pool::Cloud), "blue-cloud");
        assert_eq!(s.router_queue_group(), "blue.router");
        assert_eq!(s.provider_queue_group(Pool::Local), "blue.provider.local");
        assert_eq!(s.batch_job("b1"), "blue.batch.b1");
        assert_eq!(s.batch_jobs(), "blue.batch.*");
        assert_eq!(s.batch_id_of("blue.batch.b1"), Some("b1"));
        assert_eq!(s.batch_id_of("blue.batchx.b1"), None);
        assert_eq!(s.batch_id_of("optiroute.batch.b1"), None);
        assert_eq!(Subjects::cancel("_INBOX.x"), "_INBOX.x.cancel");
        assert_eq!(
            Discovery::Ping.subject("blue-router"),
            "$SRV.PING.blue-router"
        );
        // The default deployment keeps the names operators already use.
        let d = Subjects::default();
        assert_eq!(d.router_service, "optiroute-router");
        assert_eq!(d.local_service, "optiroute-local");
        assert_eq!(Subjects::new("team.a").router_service, "team_a-router");
    }
}
