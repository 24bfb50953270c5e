//! The tokenizer, built from the GGUF file's own vocabulary and merges
//! (`tokenizer.ggml.tokens` / `tokenizer.ggml.merges`): byte-level BPE.
//!
//! SmolLM2's pre-tokenizer (`tokenizer.ggml.pre = "smollm"`) isolates every
//! digit and adds no prefix space, then applies the GPT-2 split regex. A plain
//! GPT-2 byte-level pre-tokenizer (prefix space on, digits grouped) tokenizes
//! the chat template differently from what the model was trained on.

use crate::gguf::Content;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

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
    /// Parses special tokens in its input (for template text).
    template: Tokenizer,
    /// Treats special-token strings in its input as plain text, so a user
    /// cannot forge `<|im_start|>` turns.
    plain: Tokenizer,
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
/// vocabulary, inverted (char → byte).
fn char_to_byte() -> std::collections::HashMap<char, u8> {
    let mut map = std::collections::HashMap::with_capacity(256);
    let mut extra = 0u32;
    for b in 0u8..=255 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(256 + extra).unwrap_or('\u{FFFD}');
            extra += 1;
            c
        };
        map.insert(c, b);
    }
    map
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
        let merges: Vec<(String, String)> = string_array(ct, "tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| format!("invalid merge `{m}`"))
            })
            .collect::<Result<_, String>>()?;
        let types: Vec<i64> = match ct.metadata.get("tokenizer.ggml.token_type") {
            Some(_) => ct
                .get_array("tokenizer.ggml.token_type")?
                .iter()
                .map(|t| t.as_i64().unwrap_or(1))
                .collect(),
            None => vec![1; tokens.len()],
        };

        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| format!("building the BPE model: {e}"))?;
        let mut template = Tokenizer::new(bpe);
        // "smollm": isolate digits, then GPT-2's split regex, no prefix space.
        template.with_pre_tokenizer(Some(Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        template.with_decoder(Some(ByteLevel::new(false, true, true)));
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == TOKEN_TYPE_CONTROL)
            .map(|(tok, _)| AddedToken::from(tok.clone(), true))
            .collect();
        template
            .add_special_tokens(specials)
            .map_err(|e| format!("adding special tokens: {e}"))?;
        let mut plain = template.clone();
        plain.set_encode_special_tokens(true);

        let map = char_to_byte();
        let bytes = tokens
            .iter()
            .zip(&types)
            .map(|(tok, t)| {
                if *t == TOKEN_TYPE_CONTROL {
                    return Vec::new();
                }
                let mut out = Vec::with_capacity(tok.len());
                for c in tok.chars() {
                    match map.get(&c) {
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
            template
                .token_to_id(s)
                .ok_or_else(|| format!("the vocabulary has no `{s}` token"))
        };
        let (im_start, im_end, end_of_text) =
            (id("<|im_start|>")?, id("<|im_end|>")?, id("<|endoftext|>")?);
        Ok(ChatTokenizer {
            im_start,
            im_end,
            end_of_text,
            template,
            plain,
            bytes,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.bytes.len()
    }

    /// Encodes text in which special tokens (`<|im_start|>`...) are parsed.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        self.template
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| format!("tokenizing: {e}"))
    }

    /// Encodes text with any special-token strings in it taken literally.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>, String> {
        self.plain
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| format!("tokenizing: {e}"))
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
        self.template.id_to_token(id)
    }
}
