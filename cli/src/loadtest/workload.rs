//! What the load test sends: the original's two prompts, a JSONL file
//! sampled with a Zipf-like popularity, or a unique prompt per request.

use std::path::Path;

use serde::Deserialize;

/// The original Locust scenario's short prompt (routed local), sent 3 times
/// out of 4.
pub const ORIGINAL_SHORT: &str = "What is the capital of France?";
/// The original Locust scenario's complex prompt (routed cloud), sent 1 time
/// out of 4.
pub const ORIGINAL_COMPLEX: &str = "Explain step by step how the Raft consensus algorithm handles leader election and log replication, then compare its trade-offs with Paxos in depth.";

/// SplitMix64: small, fast, good enough for picking prompts and think times,
/// and seedable so runs are reproducible.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// An independent generator for `stream` (a user, an arrival) of a run
    /// seeded with `seed`. The state is hashed: seeds that differ by a multiple
    /// of the increment would give streams that are shifted copies of each other.
    pub fn for_stream(seed: u64, stream: u64) -> Self {
        let mut h = Rng(seed ^ Rng(stream).next_u64());
        Rng(h.next_u64())
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi] (lo when the range is empty).
    pub fn range_f64(&mut self, lo: f64, hi: f64) -> f64 {
        if hi <= lo {
            lo
        } else {
            lo + (hi - lo) * self.next_f64()
        }
    }
}

/// Zipf-like popularity over `n` items: item `k` (0-based rank) is drawn with
/// probability proportional to `1 / (k + 1)^s`. `s = 0` is uniform; `s ≈ 1`
/// is what request logs and web caches usually show.
#[derive(Debug, Clone)]
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    /// `n` is at least 1 (an empty catalogue is refused before this).
    pub fn new(n: usize, s: f64) -> Self {
        let n = n.max(1);
        let mut cdf = Vec::with_capacity(n);
        let mut acc = 0.0;
        for k in 0..n {
            acc += 1.0 / ((k + 1) as f64).powf(s);
            cdf.push(acc);
        }
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf { cdf }
    }

    /// The probability of rank `k`.
    #[cfg(test)]
    pub fn probability(&self, k: usize) -> f64 {
        match k {
            0 => self.cdf.first().copied().unwrap_or(0.0),
            k if k < self.cdf.len() => self.cdf[k] - self.cdf[k - 1],
            _ => 0.0,
        }
    }

    /// A rank in `0..n`.
    pub fn sample(&self, rng: &mut Rng) -> usize {
        let u = rng.next_f64();
        self.cdf
            .partition_point(|&c| c <= u)
            .min(self.cdf.len() - 1)
    }
}

/// One line of a workload file.
#[derive(Debug, Clone, Deserialize)]
pub struct Item {
    pub prompt: String,
    #[serde(default)]
    pub provider: Option<String>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
}

impl Item {
    fn plain(prompt: &str) -> Self {
        Item {
            prompt: prompt.to_string(),
            provider: None,
            max_tokens: None,
        }
    }
}

/// Reads a JSONL workload: one `{"prompt": ...}` object a line, optionally with
/// `provider` and `max_tokens`; blank lines and lines starting with `#` are skipped.
pub fn read_jsonl(path: &Path) -> Result<Vec<Item>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read workload {}: {e}", path.display()))?;
    parse_jsonl(&text).map_err(|e| format!("workload {}: {e}", path.display()))
}

pub fn parse_jsonl(text: &str) -> Result<Vec<Item>, String> {
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let item: Item = serde_json::from_str(line).map_err(|e| format!("line {}: {e}", i + 1))?;
        if item.prompt.trim().is_empty() {
            return Err(format!("line {}: empty prompt", i + 1));
        }
        items.push(item);
    }
    if items.is_empty() {
        return Err("no prompts".into());
    }
    Ok(items)
}

/// Which prompts to send.
#[derive(Debug, Clone)]
pub enum Workload {
    /// The original's two prompts, weighted 3 short : 1 complex.
    Original { items: [Item; 2] },
    /// Items drawn by popularity rank: the first line is the most popular.
    Catalogue { items: Vec<Item>, zipf: Zipf },
    /// A different prompt every time (every request is a cache miss).
    Unique { nonce: u64 },
}

/// One drawn prompt: the item it came from (for per-item accounting, `None`
/// when every prompt is new) and what to send.
#[derive(Debug, Clone)]
pub struct Drawn<'a> {
    pub item: Option<usize>,
    pub prompt: std::borrow::Cow<'a, str>,
    pub provider: Option<&'a str>,
    pub max_tokens: Option<u32>,
}

impl Workload {
    pub fn original() -> Self {
        Workload::Original {
            items: [Item::plain(ORIGINAL_SHORT), Item::plain(ORIGINAL_COMPLEX)],
        }
    }

    pub fn catalogue(items: Vec<Item>, s: f64) -> Self {
        let zipf = Zipf::new(items.len(), s);
        Workload::Catalogue { items, zipf }
    }

    /// How many distinct items, when finite.
    pub fn distinct(&self) -> Option<usize> {
        match self {
            Workload::Original { .. } => Some(2),
            Workload::Catalogue { items, .. } => Some(items.len()),
            Workload::Unique { .. } => None,
        }
    }

    pub fn draw(&self, rng: &mut Rng, seq: u64) -> Drawn<'_> {
        fn pick(items: &[Item], i: usize) -> Drawn<'_> {
            let it = &items[i];
            Drawn {
                item: Some(i),
                prompt: std::borrow::Cow::Borrowed(&it.prompt),
                provider: it.provider.as_deref(),
                max_tokens: it.max_tokens,
            }
        }
        match self {
            Workload::Original { items } => {
                let i = usize::from(rng.next_f64() >= 0.75);
                pick(items, i)
            }
            Workload::Catalogue { items, zipf } => pick(items, zipf.sample(rng)),
            Workload::Unique { nonce } => Drawn {
                item: None,
                prompt: std::borrow::Cow::Owned(format!(
                    "Request {nonce:x}-{seq}: what is the capital of France?"
                )),
                provider: None,
                max_tokens: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_uniform_enough_and_reproducible() {
        let mut a = Rng::for_stream(7, 0);
        let mut b = Rng::for_stream(7, 0);
        assert_eq!(a.next_u64(), b.next_u64());
        let n = 100_000;
        let mean: f64 = (0..n).map(|_| a.next_f64()).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
        for _ in 0..1000 {
            let x = a.range_f64(1.0, 4.0);
            assert!((1.0..=4.0).contains(&x));
        }
        assert_eq!(a.range_f64(2.0, 2.0), 2.0);
    }

    #[test]
    fn streams_do_not_overlap() {
        let draw = |stream| {
            let mut r = Rng::for_stream(42, stream);
            (0..1000).map(|_| r.next_u64()).collect::<Vec<_>>()
        };
        let mut all: Vec<u64> = (0..50).flat_map(draw).collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n, "streams share values");
        assert_ne!(draw(0), Rng::for_stream(43, 0).take_first_1000());
    }

    impl Rng {
        fn take_first_1000(mut self) -> Vec<u64> {
            (0..1000).map(|_| self.next_u64()).collect()
        }
    }

    #[test]
    fn zipf_probabilities_follow_the_power_law() {
        let z = Zipf::new(100, 1.0);
        let h100: f64 = (1..=100).map(|k| 1.0 / k as f64).sum();
        assert!((z.probability(0) - 1.0 / h100).abs() < 1e-12);
        assert!((z.probability(1) - 0.5 / h100).abs() < 1e-12);
        assert!((z.probability(9) - 0.1 / h100).abs() < 1e-12);
        assert_eq!(z.probability(100), 0.0);
        let total: f64 = (0..100).map(|k| z.probability(k)).sum();
        assert!((total - 1.0).abs() < 1e-9);
        // s = 0 is uniform.
        let u = Zipf::new(4, 0.0);
        for k in 0..4 {
            assert!((u.probability(k) - 0.25).abs() < 1e-12);
        }
    }

    #[test]
    fn zipf_samples_match_the_probabilities() {
        let z = Zipf::new(50, 1.0);
        let mut rng = Rng::for_stream(42, 0);
        let n = 200_000;
        let mut counts = [0u32; 50];
        for _ in 0..n {
            counts[z.sample(&mut rng)] += 1;
        }
        for k in [0, 1, 4, 49] {
            let observed = counts[k] as f64 / n as f64;
            let expected = z.probability(k);
            assert!(
                (observed - expected).abs() < 0.01 + expected * 0.05,
                "rank {k}: {observed} vs {expected}"
            );
        }
        assert!(counts[0] > counts[1] && counts[1] > counts[9]);
        // One item: always it.
        let one = Zipf::new(1, 1.0);
        assert!((0..100).all(|_| one.sample(&mut rng) == 0));
    }

    #[test]
    fn original_mix_is_three_to_one() {
        let w = Workload::original();
        let mut rng = Rng::for_stream(1, 0);
        let n = 40_000;
        let short = (0..n)
            .filter(|&i| w.draw(&mut rng, i).prompt == ORIGINAL_SHORT)
            .count();
        let share = short as f64 / n as f64;
        assert!((share - 0.75).abs() < 0.01, "{share}");
        // Across users too: each user's stream draws its own sequence.
        let mut short = 0;
        for user in 0..2000 {
            let mut rng = Rng::for_stream(42, user);
            short += (0..10)
                .filter(|&i| w.draw(&mut rng, i).prompt == ORIGINAL_SHORT)
                .count();
        }
        let share = short as f64 / 20_000.0;
        assert!((share - 0.75).abs() < 0.015, "{share}");
    }

    #[test]
    fn unique_prompts_differ_and_jsonl_parses() {
        let w = Workload::Unique { nonce: 5 };
        let mut rng = Rng::for_stream(1, 0);
        assert_ne!(w.draw(&mut rng, 1).prompt, w.draw(&mut rng, 2).prompt);
        let items = parse_jsonl(
            "# comment\n{\"prompt\":\"hi\"}\n\n{\"prompt\":\"x\",\"provider\":\"cloud\",\"max_tokens\":5}\n",
        )
        .unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[1].provider.as_deref(), Some("cloud"));
        assert_eq!(items[1].max_tokens, Some(5));
        assert!(parse_jsonl("{\"text\":\"no prompt\"}").is_err());
        assert!(parse_jsonl("").is_err());
    }

    #[test]
    fn the_shipped_mixed_workload_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/workloads/mixed.jsonl");
        let items = read_jsonl(&path).unwrap();
        assert!(items.len() >= 150, "{}", items.len());
        let mut prompts: Vec<&str> = items.iter().map(|i| i.prompt.as_str()).collect();
        prompts.sort_unstable();
        prompts.dedup();
        assert_eq!(prompts.len(), items.len(), "prompts are distinct");
    }
}
