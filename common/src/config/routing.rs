//! Settings of `auto` routing.

use serde::Deserialize;

/// The complexity score of `auto` routing; see `router-worker/src/routing.rs`.
/// Defaults were tuned with `optiroute-route-eval --tune` on two thirds of
/// `router-worker/data/prompts.jsonl` and checked on the held-out third.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Which router scores `auto` requests. `learned` (the default: it won
    /// on the held-out third, see the README) falls back to `features`,
    /// with the reason in `route_reason`, when its weights or the embedding
    /// model (`router.embedding`) cannot be loaded.
    pub kind: RouterKind,
    /// `learned` only (an error with `features`): the share (0..1) of the reference workload the
    /// threshold sends to the cloud; unset, the threshold trained with the
    /// weights (chosen for cloud recall). `route_bias` moves it further.
    pub cloud_share: Option<f32>,
    pub learned: LearnedConfig,
    /// Score at or above which `auto` goes to the cloud.
    pub threshold: f32,
    /// How far `route_bias` = ±1 moves the threshold.
    pub bias_span: f32,
    /// Overflow: a prompt routed to the local pool goes to the cloud
    /// instead when the local pool's expected wait is past this many ms
    /// (its replicas all busy, from their `$SRV.STATS` load and service
    /// time). 0 turns overflow off: local prompts queue.
    pub local_max_wait_ms: u64,
    pub weights: RoutingWeights,
    /// Phrases are matched on word boundaries, lower-cased; a trailing `*`
    /// matches any word ending, and symbols (`^`, three backticks) anywhere.
    pub code_keywords: Vec<String>,
    pub math_keywords: Vec<String>,
    pub reasoning_keywords: Vec<String>,
    pub longform_keywords: Vec<String>,
    pub constraint_keywords: Vec<String>,
    pub simple_keywords: Vec<String>,
}

/// The router behind `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouterKind {
    /// The keyword and length score (`router-worker/src/routing.rs`): no
    /// model, a microsecond a decision.
    Features,
    /// Kernel ridge regression on the prompt's embedding and the same
    /// features (`router-worker/src/learned.rs`): the default.
    #[default]
    Learned,
}

/// `[router.routing.learned]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LearnedConfig {
    /// A weights file written by `optiroute-route-eval --train`; unset,
    /// the weights built into the router (`router-worker/data/learned-router.json`).
    pub weights_file: Option<String>,
    /// How far `route_bias` = ±1 moves the threshold, in learned-score
    /// units (the score runs about −1 for local-like prompts to +1 for
    /// cloud-like ones; 0.5 moves the cloud share of the reference workload
    /// by about 20 points either way).
    pub bias_span: f32,
}

impl Default for LearnedConfig {
    fn default() -> Self {
        LearnedConfig {
            weights_file: None,
            bias_span: 0.5,
        }
    }
}

impl RoutingConfig {
    /// The first invalid key (relative to `router.routing`) and why.
    pub fn check(&self) -> Result<(), (&'static str, &'static str)> {
        if let Some(s) = self.cloud_share {
            if !(0.0..=1.0).contains(&s) {
                return Err(("cloud_share", "must be between 0 and 1"));
            }
            if self.kind == RouterKind::Features {
                return Err((
                    "cloud_share",
                    "applies to kind = \"learned\"; with \"features\" set threshold \
                     (optiroute-route-eval --calibrate SHARE prints it)",
                ));
            }
        }
        if !(self.learned.bias_span.is_finite() && self.learned.bias_span >= 0.0) {
            return Err(("learned.bias_span", "must be a finite number >= 0"));
        }
        if self.learned.weights_file.as_deref() == Some("") {
            return Err(("learned.weights_file", "must name a file, or be left unset"));
        }
        Ok(())
    }
}

/// One weight per feature; a feature's value is mostly in [0, 2].
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingWeights {
    pub length: f32,
    pub max_tokens: f32,
    pub code: f32,
    pub math: f32,
    pub reasoning: f32,
    pub longform: f32,
    pub questions: f32,
    pub non_english: f32,
    pub constraints: f32,
    pub simple: f32,
}

impl Default for RoutingWeights {
    fn default() -> Self {
        RoutingWeights {
            length: 1.25,
            max_tokens: 0.5,
            code: 0.6,
            math: 0.65,
            reasoning: 0.8,
            longform: 0.8,
            questions: 0.2,
            non_english: 0.3,
            constraints: 0.4,
            simple: -0.8,
        }
    }
}

impl RoutingWeights {
    /// Each weight with its feature's name, for a search over the weights
    /// (`optiroute-route-eval --tune`).
    pub fn named_mut(&mut self) -> [(&'static str, &mut f32); 10] {
        [
            ("length", &mut self.length),
            ("max_tokens", &mut self.max_tokens),
            ("code", &mut self.code),
            ("math", &mut self.math),
            ("reasoning", &mut self.reasoning),
            ("longform", &mut self.longform),
            ("questions", &mut self.questions),
            ("non_english", &mut self.non_english),
            ("constraints", &mut self.constraints),
            ("simple", &mut self.simple),
        ]
    }
}

fn words(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            kind: RouterKind::default(),
            cloud_share: None,
            learned: LearnedConfig::default(),
            threshold: 1.05,
            bias_span: 0.6,
            local_max_wait_ms: 0,
            weights: RoutingWeights::default(),
            code_keywords: words(&[
                "```",
                "fn",
                "def",
                "class",
                "#include",
                "import",
                "function",
                "=>",
                "();",
                "};",
                "select",
                "console.log",
                "println",
                "printf",
                "struct",
                "lambda",
                "regex",
                "sql",
                "python",
                "javascript",
                "typescript",
                "rust",
                "golang",
                "java",
                "c++",
                "bash",
                "html",
                "css",
                "api",
                "compile*",
                "segfault",
                "stack trace",
                "traceback",
                "exception",
                "bug",
                "dockerfile",
                "docker",
                "kubernetes",
                "tokio",
                "async",
                "server",
                "query",
                "script",
                "implement*",
                "code",
                "program",
                "endpoint",
                "database",
                "unit test*",
                "cache",
                "thread*",
                "concurren*",
                "shard*",
            ]),
            math_keywords: words(&[
                "∫",
                "√",
                "∑",
                "π",
                "≤",
                "≥",
                "≠",
                "∞",
                "^",
                "→",
                "|",
                "integral",
                "derivative",
                "differentiat*",
                "integrat*",
                "equation*",
                "solve",
                "probabilit*",
                "theorem",
                "prime",
                "matrix",
                "eigen*",
                "limit",
                "series",
                "polynomial*",
                "logarithm*",
                "factorial",
                "mod",
                "modulo",
                "expected value",
                "variance",
                "irrational",
                "induction",
                "combinatori*",
                "permutation*",
                "arrange*",
                "compounded",
                "interest",
                "km/h",
                "prove",
                "proof",
                "show that",
                "how many ways",
                "puzzle",
                "knights",
                "riddle",
                "paradox",
                "flaw",
            ]),
            reasoning_keywords: words(&[
                "explain why",
                "explain how",
                "explain the",
                "compare",
                "contrast",
                "step by step",
                "step-by-step",
                "design",
                "architect*",
                "analy*",
                "evaluate",
                "trade-off*",
                "tradeoff*",
                "pros and cons",
                "derive",
                "critique",
                "justify",
                "why did",
                "why does",
                "why do",
                "why is",
                "why might",
                "why would",
                "implications",
                "strategy",
                "optimi*",
                "debug",
                "refactor",
                "algorithm",
                "complexity",
                "in depth",
                "in-depth",
                "detailed",
                "thorough",
                "comprehensive",
                "reason about",
                "what would happen",
                "how would you",
                "how does",
                "what caused",
                "causes",
                "second-order",
                "effects",
                "threats",
                "insights",
                "weakest",
                "argument",
                "consensus",
                "mechanisms",
                "should we",
                "whether",
                "identify",
            ]),
            longform_keywords: words(&[
                "essay",
                "story",
                "short story",
                "report",
                "article",
                "blog post",
                "cover letter",
                "speech",
                "chapter",
                "screenplay",
                "words",
                "paragraphs",
                "business plan",
                "proposal",
                "white paper",
                "op-ed",
                "ballad",
                "sonnet",
                "epic",
                "stanza*",
                "readme",
                "novel*",
                "nouvelle",
                "adventure",
                "persuasive",
                "lesson plan",
                "guide",
                "tutorial",
                "documentation",
            ]),
            constraint_keywords: words(&[
                "exactly",
                "keeping",
                "keep",
                "preserving",
                "preserve",
                "in the style of",
                "iambic",
                "rhyme*",
                "rhyming",
                "at least",
                "no more than",
                "without",
                "consistent",
                "register",
                "tone*",
                "natural",
                "plain",
                "for a non-expert",
                "numbered",
                "timeline",
                "valid json",
                "typed",
                "three",
                "several",
                "each",
                "all",
                "then",
            ]),
            simple_keywords: words(&[
                "hello",
                "hi",
                "hey",
                "thanks",
                "thank you",
                "good morning",
                "how are you",
                "what is the capital",
                "capital of",
                "capitalization",
                "capitalize",
                "spell",
                "synonym",
                "what time",
                "lowercase",
                "uppercase",
                "bonjour",
                "hola",
                "hallo",
                "what's",
                "who is",
                "who wrote",
                "how do i",
                "one word",
                "short poem",
                "haiku",
                "4 lines",
                "polite",
                "fix the typo*",
                "typos",
                "grammar",
            ]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn with(sets: &[(&str, &str)]) -> Result<Config, crate::Error> {
        let sets: Vec<(String, String)> = sets
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_parts(None, &[], &sets)
    }

    #[test]
    fn kind_share_and_weights_file_are_read_and_checked() {
        let c = with(&[
            ("router.routing.kind", "learned"),
            ("router.routing.cloud_share", "0.4"),
            ("router.routing.learned.weights_file", "w.json"),
        ])
        .unwrap();
        assert_eq!(c.router.routing.kind, RouterKind::Learned);
        assert_eq!(c.router.routing.cloud_share, Some(0.4));
        assert_eq!(
            c.router.routing.learned.weights_file.as_deref(),
            Some("w.json")
        );
        assert_eq!(with(&[]).unwrap().router.routing.kind, RouterKind::Learned);
        let e = with(&[
            ("router.routing.kind", "features"),
            ("router.routing.cloud_share", "0.4"),
        ])
        .unwrap_err();
        assert!(
            e.message.contains("router.routing.cloud_share") && e.message.contains("threshold")
        );
        for (key, value, named) in [
            (
                "router.routing.cloud_share",
                "1.5",
                "router.routing.cloud_share",
            ),
            (
                "router.routing.learned.weights_file",
                "",
                "router.routing.learned.weights_file",
            ),
            (
                "router.routing.learned.bias_span",
                "-1",
                "router.routing.learned.bias_span",
            ),
            ("router.routing.kind", "neural", "kind"),
        ] {
            let e = with(&[(key, value)]).unwrap_err();
            assert!(e.message.contains(named), "{key}={value}: {}", e.message);
        }
    }
}
