//! Subject and service names, under a configurable prefix so several
//! deployments can share one NATS system.

/// All subjects of one deployment.
#[derive(Debug, Clone)]
pub struct Subjects {
    pub prefix: String,
    pub generate: String,
    pub provider_local: String,
    pub provider_cloud: String,
}

impl Subjects {
    pub fn new(prefix: &str) -> Self {
        Subjects {
            prefix: prefix.to_string(),
            generate: format!("{prefix}.generate"),
            provider_local: format!("{prefix}.provider.local"),
            provider_cloud: format!("{prefix}.provider.cloud"),
        }
    }

    pub fn provider(&self, pool: crate::wire::Pool) -> &str {
        match pool {
            crate::wire::Pool::Local => &self.provider_local,
            crate::wire::Pool::Cloud => &self.provider_cloud,
        }
    }
}

impl Default for Subjects {
    fn default() -> Self {
        Subjects::new("optiroute")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_is_applied_everywhere() {
        let s = Subjects::new("blue");
        assert_eq!(s.generate, "blue.generate");
        assert_eq!(s.provider(crate::wire::Pool::Local), "blue.provider.local");
        assert_eq!(s.provider(crate::wire::Pool::Cloud), "blue.provider.cloud");
    }
}
