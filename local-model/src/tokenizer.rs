//! The tokenizer, built from the GGUF file's own vocabulary and merges
//! (`tokenizer.ggml.tokens` / `tokenizer.ggml.merges`): byte-level BPE.
//!
//! SmolLM2's pre-tokenizer (`tokenizer.ggml.pre = "smollm"`) isolates every
//! digit and adds no prefix space, then applies the GPT-2 split regex. A plain
//! GPT-2 byte-level pre-tokenizer (prefix space on, digits grouped) tokenizes
//! the chat template differently from what the model was trained on.
//!
//! The pipeline is Hugging Face `tokenizers`' for this model, written out:
//! split off control tokens (template text only), isolate numeric chars,
//! split each piece with GPT-2's regex, map bytes to GPT-2's byte alphabet,
//! then apply the merges lowest rank first (leftmost on ties).
//! `tests/data/tokenizer-reference.json` holds that library's ids for a few
//! hundred strings, and a test holds this code to them.

use std::collections::{BinaryHeap, HashMap};

use regex::Regex;

use crate::gguf::Content;

/// The system line SmolLM2's chat template uses when a conversation has none.
pub const DEFAULT_SYSTEM: &str =
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

/// A chat role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One chat turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Turn<'a> {
    pub role: Role,
    pub content: &'a str,
}

impl<'a> Turn<'a> {
    pub fn new(role: Role, content: &'a str) -> Self {
        Turn { role, content }
    }

    pub fn user(content: &'a str) -> Self {
        Turn::new(Role::User, content)
    }
}

/// GGUF `tokenizer.ggml.token_type` of control tokens (`<|im_start|>`...).
const TOKEN_TYPE_CONTROL: i64 = 3;

pub struct ChatTokenizer {
    /// Vocabulary entry → id.
    vocab: HashMap<String, u32>,
    /// Vocabulary entries by id (byte-level spelling).
    tokens: Vec<String>,
    /// (left id, right id) → (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Control tokens (`<|im_start|>`...) by spelling, for template text.
    specials: Vec<(String, u32)>,
    /// GPT-2's split regex without its `\s+(?!\S)` branch (the regex crate
    /// has no look-ahead; [`ChatTokenizer::pieces`] applies that rule).
    split: Regex,
    /// Byte → its char in GPT-2's byte-level alphabet.
    byte_char: [char; 256],
    /// The raw bytes of each token (byte-level decoded); empty for control tokens.
    bytes: Vec<Vec<u8>>,
    pub im_start: u32,
    pub im_end: u32,
    pub end_of_text: u32,
}

fn string_array<'a>(ct: &'a Content, key: &str) -> Result<Vec<&'a str>, String> {
    ct.get_array(key)?
        .iter()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| format!("GGUF metadata `{key}` holds a non-string"))
        })
        .collect()
}

/// GPT-2's byte-level alphabet: the char each byte is written as in the
/// vocabulary.
fn byte_chars() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0u8..=255 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        map[usize::from(b)] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(256 + extra).unwrap_or('\u{FFFD}');
            extra += 1;
            c
        };
    }
    map
}

/// A merge waiting in the queue: lowest rank first, then leftmost.
#[derive(PartialEq, Eq)]
struct Merge {
    rank: u32,
    pos: usize,
    new_id: u32,
}

impl Ord for Merge {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other
            .rank
            .cmp(&self.rank)
            .then_with(|| other.pos.cmp(&self.pos))
    }
}

impl PartialOrd for Merge {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// One symbol of a word being merged, in a linked list over a vector.
#[derive(Clone, Copy)]
struct Symbol {
    id: u32,
    prev: Option<usize>,
    next: Option<usize>,
    alive: bool,
}

impl ChatTokenizer {
    pub fn from_gguf(ct: &Content) -> Result<Self, String> {
        let model = ct.get_str("tokenizer.ggml.model").unwrap_or("");
        if model != "gpt2" {
            return Err(format!(
                "tokenizer.ggml.model is `{model}`, expected `gpt2` (byte-level BPE)"
            ));
        }
        let tokens: Vec<String> = string_array(ct, "tokenizer.ggml.tokens")?
            .into_iter()
            .map(str::to_string)
            .collect();
        let types: Vec<i64> = match ct.metadata.get("tokenizer.ggml.token_type") {
            Some(_) => ct
                .get_array("tokenizer.ggml.token_type")?
                .iter()
                .map(|t| t.as_i64().unwrap_or(1))
                .collect(),
            None => vec![1; tokens.len()],
        };
        let vocab: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut merges = HashMap::new();
        for (rank, m) in string_array(ct, "tokenizer.ggml.merges")?
            .into_iter()
            .enumerate()
        {
            let (a, b) = m
                .split_once(' ')
                .ok_or_else(|| format!("invalid merge `{m}`"))?;
            let id = |s: &str| {
                vocab
                    .get(s)
                    .copied()
                    .ok_or_else(|| format!("merge `{m}`: `{s}` is not in the vocabulary"))
            };
            let merged = id(&format!("{a}{b}"))?;
            // A pair listed twice keeps its last rank, as the reference does.
            merges.insert((id(a)?, id(b)?), (rank as u32, merged));
        }
        let mut specials: Vec<(String, u32)> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (_, t))| **t == TOKEN_TYPE_CONTROL)
            .map(|(i, (tok, _))| (tok.clone(), i as u32))
            .collect();
        // Longest first: at one position the longest control token wins.
        specials.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        let split = Regex::new(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+")
            .map_err(|e| format!("the split regex: {e}"))?;

        let byte_char = byte_chars();
        let char_byte: HashMap<char, u8> = byte_char
            .iter()
            .enumerate()
            .map(|(b, c)| (*c, b as u8))
            .collect();
        let bytes = tokens
            .iter()
            .zip(&types)
            .map(|(tok, t)| {
                if *t == TOKEN_TYPE_CONTROL {
                    return Vec::new();
                }
                let mut out = Vec::with_capacity(tok.len());
                for c in tok.chars() {
                    match char_byte.get(&c) {
                        Some(b) => out.push(*b),
                        None => {
                            let mut buf = [0u8; 4];
                            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                        }
                    }
                }
                out
            })
            .collect();
        let id = |s: &str| {
            vocab
                .get(s)
                .copied()
                .ok_or_else(|| format!("the vocabulary has no `{s}` token"))
        };
        let (im_start, im_end, end_of_text) =
            (id("<|im_start|>")?, id("<|im_end|>")?, id("<|endoftext|>")?);
        Ok(ChatTokenizer {
            vocab,
            tokens,
            merges,
            specials,
            split,
            byte_char,
            bytes,
            im_start,
            im_end,
            end_of_text,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.bytes.len()
    }

    /// Encodes text in which special tokens (`<|im_start|>`...) are parsed.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        let mut ids = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            // The leftmost control token, the longest at that position.
            let found = self
                .specials
                .iter()
                .filter_map(|(s, id)| rest.find(s.as_str()).map(|at| (at, s.len(), *id)))
                .min_by_key(|(at, len, _)| (*at, std::cmp::Reverse(*len)));
            match found {
                Some((at, len, id)) => {
                    self.encode_text(&rest[..at], &mut ids);
                    ids.push(id);
                    rest = &rest[at + len..];
                }
                None => {
                    self.encode_text(rest, &mut ids);
                    break;
                }
            }
        }
        Ok(ids)
    }

    /// Encodes text with any special-token strings in it taken literally.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>, String> {
        let mut ids = Vec::new();
        self.encode_text(text, &mut ids);
        Ok(ids)
    }

    /// Numeric chars alone, then GPT-2's split inside each run between them.
    fn encode_text(&self, text: &str, ids: &mut Vec<u32>) {
        let mut start = 0;
        for (i, c) in text.char_indices() {
            if c.is_numeric() {
                self.pieces(&text[start..i], ids);
                let end = i + c.len_utf8();
                self.word(&text[i..end], ids);
                start = end;
            }
        }
        self.pieces(&text[start..], ids);
    }

    /// GPT-2's regex split. A run of whitespace followed by more text leaves
    /// its last char to the next piece (the original's `\s+(?!\S)`), so
    /// `"a  b"` splits as `a`, ` `, ` b`.
    fn pieces(&self, text: &str, ids: &mut Vec<u32>) {
        let mut at = 0;
        while at < text.len() {
            let Some(m) = self.split.find_at(text, at) else {
                break;
            };
            let mut end = m.end();
            let matched = m.as_str();
            if end < text.len() && matched.chars().all(char::is_whitespace) {
                if let Some((last, _)) = matched.char_indices().last() {
                    if last > 0 {
                        end = m.start() + last;
                    }
                }
            }
            self.word(&text[m.start()..end], ids);
            at = end;
        }
    }

    /// Byte-level BPE of one pre-tokenized word.
    fn word(&self, word: &str, ids: &mut Vec<u32>) {
        if word.is_empty() {
            return;
        }
        let mut buf = [0u8; 4];
        let mut symbols: Vec<Symbol> = Vec::with_capacity(word.len());
        for b in word.bytes() {
            let c = self.byte_char[usize::from(b)].encode_utf8(&mut buf);
            // Every byte's char is in a byte-level vocabulary; the original
            // drops one that is not (no unknown token), and so do we.
            if let Some(id) = self.vocab.get(&*c) {
                let n = symbols.len();
                symbols.push(Symbol {
                    id: *id,
                    prev: n.checked_sub(1),
                    next: None,
                    alive: true,
                });
                if let Some(p) = n.checked_sub(1) {
                    symbols[p].next = Some(n);
                }
            }
        }
        let mut queue: BinaryHeap<Merge> = symbols
            .windows(2)
            .enumerate()
            .filter_map(|(pos, w)| {
                self.merges
                    .get(&(w[0].id, w[1].id))
                    .map(|&(rank, new_id)| Merge { rank, pos, new_id })
            })
            .collect();
        while let Some(top) = queue.pop() {
            let cur = symbols[top.pos];
            let Some(next) = cur.next.filter(|_| cur.alive) else {
                continue;
            };
            let right = symbols[next];
            // A stale entry: one of the pair was merged since.
            if self.merges.get(&(cur.id, right.id)).map(|m| m.1) != Some(top.new_id) {
                continue;
            }
            symbols[top.pos].id = top.new_id;
            symbols[top.pos].next = right.next;
            symbols[next].alive = false;
            if let Some(n) = right.next {
                symbols[n].prev = Some(top.pos);
            }
            if let Some(p) = cur.prev {
                if let Some(&(rank, new_id)) = self.merges.get(&(symbols[p].id, top.new_id)) {
                    queue.push(Merge {
                        rank,
                        pos: p,
                        new_id,
                    });
                }
            }
            if let Some(n) = right.next {
                if let Some(&(rank, new_id)) = self.merges.get(&(top.new_id, symbols[n].id)) {
                    queue.push(Merge {
                        rank,
                        pos: top.pos,
                        new_id,
                    });
                }
            }
        }
        ids.extend(symbols.iter().filter(|s| s.alive).map(|s| s.id));
    }

    /// The ChatML prompt for `turns`, ending with the assistant's turn
    /// opened: `<|im_start|>role\ncontent<|im_end|>\n`... then
    /// `<|im_start|>assistant\n`. Without a system turn first, the model's
    /// default system line leads.
    pub fn chat_prompt(&self, turns: &[Turn<'_>]) -> Result<Vec<u32>, String> {
        let mut ids = Vec::new();
        let newline = self.encode_plain("\n")?;
        let push = |ids: &mut Vec<u32>, role: Role, content: &str| -> Result<(), String> {
            ids.push(self.im_start);
            ids.extend(self.encode_plain(&format!("{}\n{content}", role.as_str()))?);
            ids.push(self.im_end);
            ids.extend_from_slice(&newline);
            Ok(())
        };
        if turns.first().is_none_or(|t| t.role != Role::System) {
            push(&mut ids, Role::System, DEFAULT_SYSTEM)?;
        }
        for t in turns {
            push(&mut ids, t.role, t.content)?;
        }
        ids.push(self.im_start);
        ids.extend(self.encode_plain("assistant\n")?);
        Ok(ids)
    }

    /// The ChatML prompt as text (for display and tests).
    pub fn chat_prompt_text(turns: &[Turn<'_>]) -> String {
        let mut s = String::new();
        if turns.first().is_none_or(|t| t.role != Role::System) {
            s.push_str(&format!("<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"));
        }
        for t in turns {
            s.push_str(&format!(
                "<|im_start|>{}\n{}<|im_end|>\n",
                t.role.as_str(),
                t.content
            ));
        }
        s.push_str("<|im_start|>assistant\n");
        s
    }

    /// The bytes a token stands for (empty for control tokens).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.bytes.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// Decodes ids to text, skipping control tokens.
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|id| self.token_bytes(*id).iter().copied())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The vocabulary entry of a token (its byte-level spelling).
    pub fn token(&self, id: u32) -> Option<String> {
        self.tokens.get(id as usize).cloned()
    }
}
