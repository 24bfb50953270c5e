//! `[cache.semantic]`: the semantic cache, which answers a prompt with the
//! cached answer of another prompt of the same meaning.

use serde::Deserialize;

/// The threshold chosen on the calibration set's tuning half
/// (`optiroute-semantic-calibrate`, figures in the README).
pub const DEFAULT_SEMANTIC_THRESHOLD: f32 = 0.80;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SemanticConfig {
    /// Whether a request that does not say (`"semantic"` in the body,
    /// `x-optiroute-semantic` on HTTP) uses the semantic cache. Off by default.
    pub enabled: bool,
    /// Whether requests may ask for it when it is not the default: the
    /// router then loads the embedding model at startup
    /// (`router.embedding.model_dir`).
    pub allow_opt_in: bool,
    /// Cosine similarity at or above which a stored prompt is a candidate.
    pub threshold: f32,
    /// The lexical guard: above the threshold, the two prompts must still
    /// agree on numbers, negations, opposites, named entities, quoted
    /// strings and the asked format. Turning it off is for measurement only.
    pub guard: bool,
    /// Most vectors a router keeps in memory, all scopes together; beyond
    /// that new entries are not indexed until old ones expire.
    pub max_entries: usize,
}

impl Default for SemanticConfig {
    fn default() -> Self {
        SemanticConfig {
            enabled: false,
            allow_opt_in: true,
            threshold: DEFAULT_SEMANTIC_THRESHOLD,
            guard: true,
            max_entries: 100_000,
        }
    }
}

impl SemanticConfig {
    /// Whether any request can use it (the embedding model is needed).
    pub fn in_use(&self) -> bool {
        self.enabled || self.allow_opt_in
    }

    /// The bad key and why, when a setting is out of range.
    pub fn check(&self) -> Result<(), (&'static str, &'static str)> {
        if !(self.threshold > 0.0 && self.threshold <= 1.0) {
            return Err(("threshold", "must be above 0 and at most 1"));
        }
        if self.max_entries == 0 || self.max_entries > 10_000_000 {
            return Err(("max_entries", "must be between 1 and 10000000"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn semantic_settings_default_off_and_bad_ones_are_named() {
        let c = Config::from_parts(None, &[], &[]).unwrap();
        assert!(!c.cache.semantic.enabled, "off unless asked");
        assert!(c.cache.semantic.allow_opt_in && c.cache.semantic.guard);
        let c = Config::from_parts(
            None,
            &[],
            &[("cache.semantic.enabled".into(), "true".into())],
        )
        .unwrap();
        assert!(c.cache.semantic.enabled);
        for (key, value) in [
            ("cache.semantic.threshold", "1.5"),
            ("cache.semantic.threshold", "0"),
            ("cache.semantic.max_entries", "0"),
            ("cache.semantic.treshold", "0.9"),
        ] {
            let e = Config::from_parts(None, &[], &[(key.into(), value.into())]).unwrap_err();
            assert!(
                e.message.contains(key.rsplit('.').next().unwrap()),
                "{key}: {}",
                e.message
            );
        }
    }
}
