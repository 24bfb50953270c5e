//! Cost-aware routing: a complexity score from cheap, transparent features
//! of the request. At or above the threshold the prompt goes to the cloud;
//! below it, to the cheap local pool. An explicit provider always wins.
//!
//! Every feature is in [0, 1] (a few may reach 2) and multiplied by its
//! configured weight; the reply's `route_reason` lists the score and the
//! features that contributed most. Scoring allocates only for the reason
//! string and costs a few microseconds (see `benches`/`route-eval --bench`).

use optiroute_common::config::RoutingConfig;
use optiroute_common::wire::{GenerateRequest, Pool, ProviderChoice};

/// Names of the features, also the bounded `reason` label of `llm_route_decisions_total`.
pub const FEATURES: [&str; 9] = [
    "length",
    "max_tokens",
    "code",
    "math",
    "reasoning",
    "longform",
    "questions",
    "non_english",
    "simple",
];

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub target: Pool,
    /// Bounded label: `explicit`, `below_threshold`, or the top feature.
    pub reason_label: &'static str,
    /// Human-readable: score, threshold and top features.
    pub reason: String,
    pub score: f32,
}

/// A router built from config: keyword lists lower-cased once.
#[derive(Debug, Clone)]
pub struct Router {
    cfg: RoutingConfig,
}

const CODE_MARKERS: &[&str] = &[
    "```",
    "fn ",
    "def ",
    "class ",
    "#include",
    "import ",
    "function",
    "=>",
    "();",
    "};",
    "select ",
    " from ",
    "console.",
    "println",
    "printf",
    "public static",
    "async ",
    "struct ",
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
    "compile",
    "segfault",
    "stack trace",
    "traceback",
    "exception",
    "bug",
];
const MATH_MARKERS: &[&str] = &[
    "∫",
    "√",
    "∑",
    "π",
    "≤",
    "≥",
    "≠",
    "∞",
    "^",
    "integral",
    "derivative",
    "differentiate",
    "integrate",
    "equation",
    "solve for",
    "solve",
    "probability",
    "theorem",
    "prime",
    "matrix",
    "eigen",
    "limit of",
    "series",
    "polynomial",
    "logarithm",
    "factorial",
    "modulo",
    "geometric",
    "expected value",
    "variance",
    "irrational",
    "induction",
    "combinatori",
    "permutation",
];
const FOREIGN_WORDS: &[&str] = &[
    " der ",
    " die ",
    " und ",
    " ist ",
    " nicht ",
    " le ",
    " la ",
    " les ",
    " est ",
    " une ",
    " pour ",
    " el ",
    " los ",
    " las ",
    " por ",
    " qué ",
    " para ",
    " cómo ",
    " pourquoi ",
    " warum ",
    " explique",
    " explica",
    " erkläre",
    " porque ",
];

impl Router {
    pub fn new(cfg: &RoutingConfig) -> Self {
        let mut cfg = cfg.clone();
        for list in [
            &mut cfg.reasoning_keywords,
            &mut cfg.longform_keywords,
            &mut cfg.simple_keywords,
        ] {
            for k in list.iter_mut() {
                *k = k.to_lowercase();
            }
        }
        Router { cfg }
    }

    /// The feature values of a prompt, in the order of [`FEATURES`].
    pub fn features(&self, prompt: &str, max_tokens: u32) -> [f32; 9] {
        let lower = prompt.to_lowercase();
        let padded = format!(" {lower} ");
        let chars = prompt.chars().count() as f32;
        let length = ((chars - 120.0) / 300.0).clamp(0.0, 1.5);
        let max_tok = ((max_tokens as f32 - 256.0) / 768.0).clamp(0.0, 1.0);
        let count = |list: &[&str]| list.iter().filter(|m| lower.contains(*m)).count() as f32;
        let count_owned =
            |list: &[String]| list.iter().filter(|m| contains_phrase(&padded, m)).count() as f32;
        let code = (count(CODE_MARKERS) / 2.0).min(1.5);
        let math = (count(MATH_MARKERS) / 2.0).min(1.5);
        let reasoning = (count_owned(&self.cfg.reasoning_keywords) / 1.5).min(2.0);
        let longform = count_owned(&self.cfg.longform_keywords).min(1.5);
        let questions = (prompt.matches('?').count().saturating_sub(1) as f32 / 2.0).min(1.0);
        let non_ascii = prompt
            .chars()
            .filter(|c| c.is_alphabetic() && !c.is_ascii())
            .count() as f32;
        let foreign_hits = FOREIGN_WORDS.iter().filter(|w| padded.contains(*w)).count() as f32;
        let non_english = ((non_ascii / chars.max(1.0)) * 10.0 + foreign_hits / 2.0).min(1.0);
        let simple = if chars < 200.0 {
            count_owned(&self.cfg.simple_keywords).min(1.0)
        } else {
            0.0
        };
        [
            length,
            max_tok,
            code,
            math,
            reasoning,
            longform,
            questions,
            non_english,
            simple,
        ]
    }

    fn weights(&self) -> [f32; 9] {
        let c = &self.cfg;
        [
            c.weight_length,
            c.weight_max_tokens,
            c.weight_code,
            c.weight_math,
            c.weight_reasoning,
            c.weight_longform,
            c.weight_questions,
            c.weight_non_english,
            c.weight_simple,
        ]
    }

    /// The complexity score of a prompt.
    pub fn score(&self, prompt: &str, max_tokens: u32) -> (f32, [f32; 9]) {
        let f = self.features(prompt, max_tokens);
        let w = self.weights();
        let contributions: [f32; 9] = std::array::from_fn(|i| f[i] * w[i]);
        (contributions.iter().sum(), contributions)
    }

    /// The pool for a request, and why.
    pub fn decide(&self, req: &GenerateRequest) -> Decision {
        match req.provider {
            ProviderChoice::Local => return explicit(Pool::Local),
            ProviderChoice::Cloud => return explicit(Pool::Cloud),
            ProviderChoice::Auto => {}
        }
        let (score, contrib) = self.score(&req.prompt, req.max_tokens);
        let threshold = self.cfg.threshold - req.route_bias.unwrap_or(0.0) * self.cfg.bias_span;
        let target = if score >= threshold {
            Pool::Cloud
        } else {
            Pool::Local
        };
        let mut order: Vec<usize> = (0..contrib.len())
            .filter(|&i| contrib[i].abs() > 0.01)
            .collect();
        order.sort_by(|&a, &b| contrib[b].abs().total_cmp(&contrib[a].abs()));
        let top: Vec<String> = order
            .iter()
            .take(3)
            .map(|&i| format!("{}{:+.2}", FEATURES[i], contrib[i]))
            .collect();
        let reason_label = match (target, order.iter().find(|&&i| contrib[i] > 0.0)) {
            (Pool::Cloud, Some(&i)) => FEATURES[i],
            _ => "below_threshold",
        };
        let cmp = if target == Pool::Cloud { "≥" } else { "<" };
        let reason = if top.is_empty() {
            format!("score {score:.2} {cmp} {threshold:.2}")
        } else {
            format!("score {score:.2} {cmp} {threshold:.2}: {}", top.join(", "))
        };
        Decision {
            target,
            reason_label,
            reason,
            score,
        }
    }
}

fn explicit(pool: Pool) -> Decision {
    Decision {
        target: pool,
        reason_label: "explicit",
        reason: format!("provider {} requested", pool.as_str()),
        score: 0.0,
    }
}

/// Whether `phrase` occurs in `padded_text` at word boundaries.
fn contains_phrase(padded_text: &str, phrase: &str) -> bool {
    let mut start = 0;
    while let Some(pos) = padded_text[start..].find(phrase) {
        let at = start + pos;
        let before = padded_text[..at].chars().next_back().unwrap_or(' ');
        let after = padded_text[at + phrase.len()..]
            .chars()
            .next()
            .unwrap_or(' ');
        if !before.is_alphanumeric() && !after.is_alphanumeric() {
            return true;
        }
        start = at + phrase.len().max(1);
        if start >= padded_text.len() {
            break;
        }
    }
    false
}

/// The original OptiRoute rule: longer than 60 characters goes to the cloud.
pub fn original_rule(prompt: &str) -> Pool {
    if prompt.chars().count() > 60 {
        Pool::Cloud
    } else {
        Pool::Local
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        Router::new(&RoutingConfig::default())
    }

    fn auto(prompt: &str) -> GenerateRequest {
        GenerateRequest::new(prompt)
    }

    #[test]
    fn simple_prompts_stay_local_and_hard_ones_go_cloud() {
        let r = router();
        assert_eq!(r.decide(&auto("Hello!")).target, Pool::Local);
        assert_eq!(
            r.decide(&auto("What is the capital of France?")).target,
            Pool::Local
        );
        assert_eq!(
            r.decide(&auto("Prove that sqrt(2) is irrational.")).target,
            Pool::Cloud
        );
        assert_eq!(
            r.decide(&auto(
                "Write a Rust LRU cache with O(1) get and put, and explain the design."
            ))
            .target,
            Pool::Cloud
        );
        let d = r.decide(&auto(
            "Compare the trade-offs of Raft and Paxos step by step.",
        ));
        assert_eq!(d.target, Pool::Cloud);
        assert_eq!(d.reason_label, "reasoning");
        assert!(d.reason.starts_with("score"), "{}", d.reason);
    }

    #[test]
    fn explicit_provider_wins_and_bias_moves_the_threshold() {
        let r = router();
        let mut req = auto("Prove that sqrt(2) is irrational.");
        req.provider = ProviderChoice::Local;
        assert_eq!(r.decide(&req).target, Pool::Local);
        assert_eq!(r.decide(&req).reason_label, "explicit");
        let mut req = auto("Explain why the sky is blue.");
        let base = r.decide(&req);
        req.route_bias = Some(1.0);
        let better = r.decide(&req);
        req.route_bias = Some(-1.0);
        let cheaper = r.decide(&req);
        assert_eq!(base.score, better.score);
        assert_eq!(better.target, Pool::Cloud);
        assert_eq!(cheaper.target, Pool::Local);
    }

    #[test]
    fn phrases_match_whole_words_only() {
        assert!(contains_phrase(" say hi there ", "hi"));
        assert!(!contains_phrase(" this is it ", "hi"));
        assert!(contains_phrase(" hello, world ", "hello"));
    }

    #[test]
    fn original_rule_is_sixty_chars() {
        assert_eq!(original_rule(&"a".repeat(60)), Pool::Local);
        assert_eq!(original_rule(&"a".repeat(61)), Pool::Cloud);
    }
}
