//! Turning logits into tokens (greedy or seeded sampling, repeat penalty)
//! and tokens into streamed text (whole characters, stop strings held back).

use crate::GenerateParams;

/// Divides positive logits (multiplies negative ones) of recently seen
/// tokens by `penalty`, as llama.cpp's repeat penalty does.
pub(crate) fn apply_repeat_penalty(logits: &mut [f32], penalty: f32, recent: &[u32]) {
    if (penalty - 1.0).abs() < f32::EPSILON || recent.is_empty() {
        return;
    }
    let mut seen: Vec<u32> = recent.to_vec();
    seen.sort_unstable();
    seen.dedup();
    for id in seen {
        if let Some(l) = logits.get_mut(id as usize) {
            *l = if *l >= 0.0 {
                *l / penalty
            } else {
                *l * penalty
            };
        }
    }
}

/// Greedy, or temperature with optional nucleus (top-p) sampling.
pub(crate) struct Sampler {
    temperature: Option<f32>,
    top_p: f32,
    state: u64,
}

impl Sampler {
    pub(crate) fn new(p: &GenerateParams) -> Self {
        Sampler {
            temperature: p.temperature.filter(|t| *t > 1e-6),
            top_p: p.top_p.unwrap_or(1.0).clamp(0.0, 1.0),
            state: p.seed,
        }
    }

    /// splitmix64, as a float in [0, 1).
    fn uniform(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    pub(crate) fn sample(&mut self, logits: &[f32]) -> u32 {
        let argmax = crate::quant::vectorized(crate::mathf::Argmax(logits)) as u32;
        let Some(t) = self.temperature else {
            return argmax;
        };
        let max = logits[argmax as usize];
        // Weights relative to the best token (which gets 1.0); tokens below
        // 1e-7 of it never make a difference and are left out.
        let mut cands: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .filter_map(|(i, l)| {
                let w = f64::from((l - max) / t).exp();
                (w >= 1e-7).then_some((i as u32, w))
            })
            .collect();
        if self.top_p < 1.0 {
            cands.sort_by(|a, b| b.1.total_cmp(&a.1));
            let total: f64 = cands.iter().map(|c| c.1).sum();
            let mut cum = 0.0;
            let mut keep = 0;
            for c in &cands {
                cum += c.1;
                keep += 1;
                if cum >= f64::from(self.top_p) * total {
                    break;
                }
            }
            cands.truncate(keep.max(1));
        }
        let total: f64 = cands.iter().map(|c| c.1).sum();
        let mut r = self.uniform() * total;
        for (id, w) in &cands {
            if r < *w {
                return *id;
            }
            r -= w;
        }
        cands.last().map_or(argmax, |c| c.0)
    }
}

/// Turns token bytes into text: whole UTF-8 characters only, and never a
/// piece that might be the start of a stop string.
pub(crate) struct TextStream {
    stops: Vec<String>,
    pending: Vec<u8>,
    text: String,
    emitted: usize,
    max_stop: usize,
}

impl TextStream {
    pub(crate) fn new(stops: Vec<String>) -> Self {
        TextStream {
            max_stop: stops.iter().map(String::len).max().unwrap_or(0),
            stops,
            pending: Vec::new(),
            text: String::new(),
            emitted: 0,
        }
    }

    /// Adds a token's bytes; returns the text now safe to show and whether
    /// a stop string ended the answer.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> (String, bool) {
        self.pending.extend_from_slice(bytes);
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    self.text.push_str(s);
                    self.pending.clear();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // `valid` bytes are valid UTF-8 by definition.
                    self.text
                        .push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    match e.error_len() {
                        // An invalid sequence: show it as U+FFFD and go on.
                        Some(n) => {
                            self.text.push('\u{FFFD}');
                            self.pending.drain(..valid + n);
                        }
                        // An incomplete character: wait for the next token.
                        None => {
                            self.pending.drain(..valid);
                            break;
                        }
                    }
                }
            }
        }
        if self.stops.is_empty() {
            let piece = self.text[self.emitted..].to_string();
            self.emitted = self.text.len();
            return (piece, false);
        }
        let mut from = self.emitted.saturating_sub(self.max_stop);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.text[from..].find(s.as_str()))
            .min();
        if let Some(at) = hit {
            self.text.truncate(from + at);
            let piece = self.text.get(self.emitted..).unwrap_or("").to_string();
            self.emitted = self.emitted.max(self.text.len());
            return (piece, true);
        }
        // Hold back the longest tail that could still become a stop string.
        let hold = self
            .stops
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(move |k| s.is_char_boundary(*k))
                    .map(move |k| &s[..k])
            })
            .filter(|prefix| self.text.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let safe = (self.text.len() - hold).max(self.emitted);
        let piece = self.text[self.emitted..safe].to_string();
        self.emitted = safe;
        (piece, false)
    }

    /// The rest of the text, and the whole answer.
    pub(crate) fn finish(mut self) -> (String, String) {
        if !self.pending.is_empty() {
            self.text.push_str(&String::from_utf8_lossy(&self.pending));
        }
        let piece = self.text[self.emitted..].to_string();
        (piece, self.text)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn stream(stops: &[&str], pieces: &[&[u8]]) -> (Vec<String>, String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut t = TextStream::new(stops);
        let mut out = Vec::new();
        let mut stopped = false;
        for p in pieces {
            let (piece, s) = t.push(p);
            if !piece.is_empty() {
                out.push(piece);
            }
            if s {
                stopped = true;
                break;
            }
        }
        let (rest, text) = t.finish();
        if !rest.is_empty() {
            out.push(rest);
        }
        (out, text, stopped)
    }

    #[test]
    fn multibyte_characters_are_never_split() {
        let e = "é".as_bytes(); // 2 bytes
        let (out, text, _) = stream(&[], &[b"caf", &e[..1], &e[1..], b"!"]);
        assert_eq!(text, "café!");
        assert_eq!(out, vec!["caf", "é", "!"]);
        let euro = "€".as_bytes(); // 3 bytes
        let (out, text, _) = stream(&[], &[&euro[..1], &euro[1..2], &euro[2..]]);
        assert_eq!(text, "€");
        assert_eq!(out, vec!["€"]);
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let (_, text, _) = stream(&[], &[b"a", &[0xFF], b"b"]);
        assert_eq!(text, "a\u{FFFD}b");
    }

    #[test]
    fn stop_strings_end_the_text_and_are_never_streamed() {
        let (out, text, stopped) = stream(&["END"], &[b"hello E", b"N", b"D more"]);
        assert!(stopped);
        assert_eq!(text, "hello ");
        assert_eq!(out.concat(), "hello ");
        // A held-back prefix that does not complete is released.
        let (out, text, stopped) = stream(&["END"], &[b"an E", b"ND", b"x"]);
        assert!(stopped);
        assert_eq!(text, "an ");
        assert_eq!(out.concat(), "an ");
        let (out, text, stopped) = stream(&["END"], &[b"an E", b"gg"]);
        assert!(!stopped);
        assert_eq!(text, "an Egg");
        assert_eq!(out.concat(), "an Egg");
    }

    #[test]
    fn repeat_penalty_scales_toward_zero() {
        let mut l = vec![2.0, -2.0, 1.0];
        apply_repeat_penalty(&mut l, 2.0, &[0, 1, 0]);
        assert_eq!(l, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn sampling_is_greedy_by_default_and_seeded_otherwise() {
        let logits = vec![0.1, 3.0, 2.9, -1.0];
        let mut s = Sampler::new(&GenerateParams::default());
        assert_eq!(s.sample(&logits), 1);
        let p = GenerateParams {
            temperature: Some(1.0),
            top_p: Some(0.9),
            ..GenerateParams::default()
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(&p);
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(&p);
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b, "same seed, same draws");
        assert!(a.contains(&1) && a.contains(&2), "{a:?}");
        // top_p tiny: only the best token survives.
        let p = GenerateParams {
            temperature: Some(1.0),
            top_p: Some(0.01),
            ..GenerateParams::default()
        };
        let mut s = Sampler::new(&p);
        assert!((0..20).all(|_| s.sample(&logits) == 1));
    }
}
