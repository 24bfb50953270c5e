//! BERT's WordPiece tokenizer, built from a Hugging Face `tokenizer.json`
//! (model `WordPiece`, normalizer `BertNormalizer`, pre-tokenizer
//! `BertPreTokenizer`), giving the ids the `tokenizers` library gives.
//!
//! The steps, in the library's order:
//! 1. Added tokens (`[CLS]`, `[MASK]`, ...) written in the text are split
//!    out first and map to their ids, as the library does.
//! 2. Normalizer: clean text (drop NUL, U+FFFD and control/format/private/
//!    unassigned characters, every whitespace character becomes a space),
//!    put spaces around CJK ideographs, strip accents (NFD then drop the
//!    nonspacing marks, from a table made from the Unicode database), then
//!    lowercase character by character.
//! 3. Pre-tokenizer: split on whitespace and make every punctuation
//!    character (Unicode `P*` or ASCII punctuation) a word of its own.
//! 4. WordPiece: greedy longest match from the start of each word, pieces
//!    after the first prefixed `##`; a word with an unknown piece, or longer
//!    than `max_input_chars_per_word`, is one `[UNK]`.
//!
//! `[CLS]` and `[SEP]` frame the sequence, truncated to `max_tokens` in all
//! (sentence-transformers' `max_seq_length`, 256 for this model).

use std::collections::HashMap;

use aho_corasick::{AhoCorasick, MatchKind};
use regex::Regex;
use serde_json::Value;

/// The accent-stripping table: see `data/make_strip_accents.py`.
const STRIP_ACCENTS: &str = include_str!("data/strip_accents.tsv");

#[derive(Debug, thiserror::Error)]
#[error("tokenizer.json: {0}")]
pub struct TokenizerError(pub String);

fn err(msg: impl Into<String>) -> TokenizerError {
    TokenizerError(msg.into())
}

pub struct WordPiece {
    vocab: HashMap<String, u32>,
    /// Added tokens, matched in the raw text, and their ids.
    added: AhoCorasick,
    added_ids: Vec<u32>,
    unk: u32,
    cls: u32,
    sep: u32,
    prefix: String,
    max_chars_per_word: usize,
    clean_text: bool,
    chinese_chars: bool,
    strip_accents: bool,
    lowercase: bool,
    accents: HashMap<char, Box<str>>,
    control: Regex,
    words: Regex,
}

fn flag(v: &Value, key: &str, default: bool) -> Result<bool, TokenizerError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(err(format!(
            "normalizer.{key} is {other}, expected a boolean"
        ))),
    }
}

fn parse_accents() -> Result<HashMap<char, Box<str>>, TokenizerError> {
    let hex = |s: &str| {
        u32::from_str_radix(s, 16)
            .ok()
            .and_then(char::from_u32)
            .ok_or_else(|| err(format!("strip_accents.tsv: bad code point {s:?}")))
    };
    let mut table = HashMap::new();
    for line in STRIP_ACCENTS.lines().filter(|l| !l.starts_with('#')) {
        let (from, to) = line
            .split_once('\t')
            .ok_or_else(|| err(format!("strip_accents.tsv: bad line {line:?}")))?;
        let to: String = to.split_whitespace().map(hex).collect::<Result<_, _>>()?;
        table.insert(hex(from)?, to.into_boxed_str());
    }
    Ok(table)
}

fn is_chinese_char(c: char) -> bool {
    matches!(c as u32,
        0x4E00..=0x9FFF
        | 0x3400..=0x4DBF
        | 0x20000..=0x2A6DF
        | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F
        | 0x2B920..=0x2CEAF
        | 0xF900..=0xFAFF
        | 0x2F800..=0x2FA1F)
}

/// Hangul syllables decompose by the Unicode algorithm (NFD).
fn push_hangul(c: char, out: &mut String) -> bool {
    const S_BASE: u32 = 0xAC00;
    const COUNT: u32 = 11172;
    let s = c as u32;
    if !(S_BASE..S_BASE + COUNT).contains(&s) {
        return false;
    }
    let i = s - S_BASE;
    let jamo = [
        Some(0x1100 + i / 588),
        Some(0x1161 + (i % 588) / 28),
        (!i.is_multiple_of(28)).then_some(0x11A7 + i % 28),
    ];
    for j in jamo.into_iter().flatten().filter_map(char::from_u32) {
        out.push(j);
    }
    true
}

impl WordPiece {
    /// Builds the tokenizer from the text of a `tokenizer.json`.
    pub fn from_json(json: &str) -> Result<Self, TokenizerError> {
        let doc: Value = serde_json::from_str(json).map_err(|e| err(e.to_string()))?;
        let model = doc.get("model").ok_or_else(|| err("no model"))?;
        let kind = |v: &Value| v.get("type").and_then(Value::as_str).map(str::to_owned);
        if kind(model).as_deref() != Some("WordPiece") {
            return Err(err(format!(
                "model type {:?}, expected WordPiece",
                kind(model)
            )));
        }
        let vocab_json = model
            .get("vocab")
            .and_then(Value::as_object)
            .ok_or_else(|| err("model.vocab is not an object"))?;
        let mut vocab = HashMap::with_capacity(vocab_json.len());
        for (piece, id) in vocab_json {
            let id = id
                .as_u64()
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| err(format!("model.vocab[{piece:?}] is not an id")))?;
            vocab.insert(piece.clone(), id);
        }
        let get_str = |key: &str, default: &str| -> String {
            model
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or(default)
                .to_owned()
        };
        let id_of = |tok: &str| {
            vocab
                .get(tok)
                .copied()
                .ok_or_else(|| err(format!("{tok} is not in the vocabulary")))
        };
        let unk = id_of(&get_str("unk_token", "[UNK]"))?;
        let (cls, sep) = (id_of("[CLS]")?, id_of("[SEP]")?);
        let prefix = get_str("continuing_subword_prefix", "##");
        let max_chars_per_word = model
            .get("max_input_chars_per_word")
            .and_then(Value::as_u64)
            .map_or(100, |n| usize::try_from(n).unwrap_or(usize::MAX));

        let norm = doc.get("normalizer").unwrap_or(&Value::Null);
        if kind(norm).as_deref() != Some("BertNormalizer") {
            return Err(err(format!(
                "normalizer {:?}, expected BertNormalizer",
                kind(norm)
            )));
        }
        let lowercase = flag(norm, "lowercase", true)?;
        let pre = doc.get("pre_tokenizer").unwrap_or(&Value::Null);
        if kind(pre).as_deref() != Some("BertPreTokenizer") {
            return Err(err(format!(
                "pre_tokenizer {:?}, expected BertPreTokenizer",
                kind(pre)
            )));
        }

        let mut added = Vec::new();
        for t in doc
            .get("added_tokens")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let content = t.get("content").and_then(Value::as_str);
            let id = t
                .get("id")
                .and_then(Value::as_u64)
                .and_then(|i| u32::try_from(i).ok());
            match (content, id) {
                (Some(c), Some(id)) if !c.is_empty() => added.push((c.to_owned(), id)),
                _ => return Err(err(format!("bad added token {t}"))),
            }
        }
        let (patterns, added_ids): (Vec<String>, Vec<u32>) = added.into_iter().unzip();
        let added = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&patterns)
            .map_err(|e| err(format!("added tokens: {e}")))?;

        // ASCII punctuation counts as punctuation for BERT even where
        // Unicode calls it a symbol ($, +, <, =, >, ^, `, |, ~).
        let punct = r"\p{P}\x21-\x2F\x3A-\x40\x5B-\x60\x7B-\x7E";
        let words =
            Regex::new(&format!(r"[{punct}]|[^\s{punct}]+")).map_err(|e| err(e.to_string()))?;
        let control =
            Regex::new(r"[\x{FFFD}[\p{C}&&[^\t\n\r]]]").map_err(|e| err(e.to_string()))?;
        Ok(WordPiece {
            vocab,
            added,
            added_ids,
            unk,
            cls,
            sep,
            prefix,
            max_chars_per_word,
            clean_text: flag(norm, "clean_text", true)?,
            chinese_chars: flag(norm, "handle_chinese_chars", true)?,
            strip_accents: flag(norm, "strip_accents", lowercase)?,
            lowercase,
            accents: parse_accents()?,
            control,
            words,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// The largest id this tokenizer can give.
    pub fn max_id(&self) -> u32 {
        let vocab = self.vocab.values().copied().max().unwrap_or(0);
        let added = self.added_ids.iter().copied().max().unwrap_or(0);
        vocab.max(added)
    }

    /// The ids of `text`, framed by `[CLS]` and `[SEP]`, at most
    /// `max_tokens` in all (at least the two frame tokens).
    pub fn encode(&self, text: &str, max_tokens: usize) -> Vec<u32> {
        let budget = max_tokens.saturating_sub(2);
        let mut ids = vec![self.cls];
        let mut at = 0;
        // One pass over the text for the added tokens (leftmost, longest
        // first, as the library matches them).
        for m in self.added.find_iter(text) {
            if ids.len() > budget {
                break;
            }
            self.encode_plain(&text[at..m.start()], budget, &mut ids);
            if ids.len() <= budget {
                ids.push(self.added_ids[m.pattern().as_usize()]);
            }
            at = m.end();
        }
        if ids.len() <= budget {
            self.encode_plain(&text[at..], budget, &mut ids);
        }
        ids.push(self.sep);
        ids
    }

    fn encode_plain(&self, text: &str, budget: usize, ids: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let normalized = self.normalize(text);
        let mut piece = String::new();
        for word in self.words.find_iter(&normalized) {
            if ids.len() > budget {
                break;
            }
            self.word_pieces(word.as_str(), &mut piece, ids);
        }
        ids.truncate(budget + 1);
    }

    /// BertNormalizer, in the library's order.
    pub fn normalize(&self, text: &str) -> String {
        let cleaned;
        let mut s = text;
        if self.clean_text {
            cleaned = self
                .control
                .replace_all(s, "")
                .chars()
                .map(|c| if c.is_whitespace() { ' ' } else { c })
                .collect::<String>();
            s = &cleaned;
        }
        let mut out = String::with_capacity(s.len() + 8);
        let push = |out: &mut String, c: char| {
            if self.lowercase {
                out.extend(c.to_lowercase());
            } else {
                out.push(c);
            }
        };
        let mut jamo = String::new();
        for c in s.chars() {
            let pad = self.chinese_chars && is_chinese_char(c);
            if pad {
                out.push(' ');
            }
            jamo.clear();
            if !self.strip_accents {
                push(&mut out, c);
            } else if push_hangul(c, &mut jamo) {
                jamo.chars().for_each(|j| push(&mut out, j));
            } else if let Some(to) = self.accents.get(&c) {
                to.chars().for_each(|d| push(&mut out, d));
            } else {
                push(&mut out, c);
            }
            if pad {
                out.push(' ');
            }
        }
        out
    }

    /// WordPiece on one pre-tokenized word.
    fn word_pieces(&self, word: &str, buf: &mut String, ids: &mut Vec<u32>) {
        if word.chars().count() > self.max_chars_per_word {
            ids.push(self.unk);
            return;
        }
        let mark = ids.len();
        let mut start = 0;
        while start < word.len() {
            let mut end = word.len();
            let mut found = None;
            while start < end {
                buf.clear();
                if start > 0 {
                    buf.push_str(&self.prefix);
                }
                buf.push_str(&word[start..end]);
                if let Some(&id) = self.vocab.get(buf.as_str()) {
                    found = Some(id);
                    break;
                }
                // Back off one character.
                end = word[..end]
                    .char_indices()
                    .next_back()
                    .map_or(start, |(i, _)| i);
            }
            match found {
                Some(id) => ids.push(id),
                None => {
                    ids.truncate(mark);
                    ids.push(self.unk);
                    return;
                }
            }
            start = end;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn tiny() -> WordPiece {
        let vocab: serde_json::Map<String, Value> = [
            "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "##aff", "##able", "hello", "!",
            "cafe", "a", "##b", "的", ",", "ᄋ", "ᅡ", "ᆫ",
        ]
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), Value::from(i)))
        .collect();
        let doc = serde_json::json!({
            "added_tokens": [{"id": 4, "content": "[MASK]"}, {"id": 2, "content": "[CLS]"}],
            "normalizer": {"type": "BertNormalizer", "clean_text": true,
                "handle_chinese_chars": true, "strip_accents": null, "lowercase": true},
            "pre_tokenizer": {"type": "BertPreTokenizer"},
            "model": {"type": "WordPiece", "unk_token": "[UNK]",
                "continuing_subword_prefix": "##", "max_input_chars_per_word": 9,
                "vocab": vocab},
        });
        WordPiece::from_json(&doc.to_string()).unwrap()
    }

    #[test]
    fn word_pieces_unknowns_and_specials() {
        let t = tiny();
        assert_eq!(t.encode("unaffable", 256), [2, 5, 6, 7, 3]);
        assert_eq!(t.encode("Hello!", 256), [2, 8, 9, 3]);
        // One unknown piece makes the whole word [UNK].
        assert_eq!(t.encode("unaffx", 256), [2, 1, 3]);
        // Past max_input_chars_per_word (9).
        assert_eq!(t.encode("abbbbbbbbb ab", 256), [2, 1, 11, 12, 3]);
        assert_eq!(t.encode("a[MASK]a", 256), [2, 11, 4, 11, 3]);
        // Added tokens side by side, and inside punctuation ("[", "]" are
        // not in this vocabulary).
        assert_eq!(
            t.encode("[MASK][CLS]x [[MASK]]", 256),
            [2, 4, 2, 1, 1, 4, 1, 3]
        );
        assert_eq!(t.encode("", 256), [2, 3]);
    }

    #[test]
    fn normalizer_cleans_splits_cjk_strips_accents_and_lowercases() {
        let t = tiny();
        assert_eq!(t.normalize("Ca\u{0301}fé\tX\u{200b}\u{0}y"), "cafe xy");
        assert_eq!(t.normalize("a的b"), "a 的 b");
        assert_eq!(t.normalize("ÅNGSTRÖM"), "angstrom");
        assert_eq!(t.normalize("안"), "\u{110B}\u{1161}\u{11AB}");
        assert_eq!(t.encode("CAFÉ,的", 256), [2, 10, 14, 13, 3]);
    }

    #[test]
    fn truncates_to_max_tokens_with_the_frame() {
        let t = tiny();
        let ids = t.encode("a a a a a a a a", 5);
        assert_eq!(ids, [2, 11, 11, 11, 3]);
        let ids = t.encode("a [MASK] a [MASK]", 4);
        assert_eq!(ids, [2, 11, 4, 3]);
        assert_eq!(t.encode("a a", 0), [2, 3]);
        // The limit falls inside a word, and more words follow.
        assert_eq!(
            t.encode("unaffable unaffable unaffable", 6),
            [2, 5, 6, 7, 5, 3]
        );
    }

    #[test]
    fn rejects_other_tokenizers() {
        let doc = serde_json::json!({"model": {"type": "BPE", "vocab": {}}});
        assert!(WordPiece::from_json(&doc.to_string()).is_err());
        assert!(WordPiece::from_json("{").is_err());
    }
}
