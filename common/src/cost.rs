//! The cost model: cloud by tokens, local by compute time.

use crate::config::CloudConfig;
use crate::wire::Usage;

/// Cloud cost in USD: prompt tokens × input price + completion tokens × output price,
/// with per-model prices when configured.
pub fn cloud_cost(cfg: &CloudConfig, model: &str, usage: &Usage) -> f64 {
    let (input, output) = match cfg.prices.get(model) {
        Some(p) => (p.input_per_1k, p.output_per_1k),
        None => (cfg.input_price_per_1k, cfg.output_price_per_1k),
    };
    let cost = f64::from(usage.prompt_tokens) / 1000.0 * input
        + f64::from(usage.completion_tokens) / 1000.0 * output;
    // Prices are checked finite and non-negative at startup; counts are at
    // most u32::MAX, so this only guards a price near f64::MAX.
    if cost.is_finite() {
        cost.max(0.0)
    } else {
        f64::MAX
    }
}

/// Local cost in USD: compute seconds × price per second.
pub fn local_cost(price_per_second: f64, compute_seconds: f64) -> f64 {
    compute_seconds.max(0.0) * price_per_second
}

/// A rough token count for text without a tokenizer: about four bytes a token.
pub fn estimate_tokens(text: &str) -> u32 {
    let n = text.len().div_ceil(4);
    u32::try_from(n)
        .unwrap_or(u32::MAX)
        .max(u32::from(!text.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelPrice;

    #[test]
    fn cloud_cost_uses_model_prices_when_present() {
        let mut cfg = CloudConfig::default();
        let u = Usage::new(1000, 500, false);
        assert!((cloud_cost(&cfg, "m", &u) - 0.0003).abs() < 1e-12);
        cfg.prices.insert(
            "m".into(),
            ModelPrice {
                input_per_1k: 0.01,
                output_per_1k: 0.02,
            },
        );
        assert!((cloud_cost(&cfg, "m", &u) - 0.02).abs() < 1e-12);
    }

    #[test]
    fn local_cost_and_estimates() {
        assert!((local_cost(0.000005, 2.0) - 0.00001).abs() < 1e-15);
        assert_eq!(estimate_tokens(""), 0);
        assert_eq!(estimate_tokens("a"), 1);
        assert_eq!(estimate_tokens("abcdefgh"), 2);
    }
}
