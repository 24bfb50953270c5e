"""Makes embed/tests/data/tokenizer_ids.json: 400 texts and the ids the
Hugging Face `tokenizers` library gives for them with the model's
tokenizer.json (truncated to 256 tokens, no padding, as sentence-transformers
encodes), for embed/tests/reference.rs to match. The texts are random mixes
(fixed seed) of words, scripts, marks, whitespace, control characters,
punctuation, emoji and special tokens, where tokenizers differ.

    scripts/fetch-embed-model.sh
    python3 -m venv .tools/embed-tok-venv
    .tools/embed-tok-venv/bin/pip install tokenizers
    .tools/embed-tok-venv/bin/python embed/tests/data/make_tokenizer_ids.py
"""

import json
import os
import random

from tokenizers import Tokenizer

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
MODEL = os.path.join(ROOT, "models", "all-MiniLM-L6-v2")
OUT = os.path.join(os.path.dirname(__file__), "tokenizer_ids.json")

PIECES = [
    # words and sentences
    "hello", "World", "the", "tokenization", "unbelievable", "GPU", "iPhone", "McDonald's",
    "don't", "e-mail", "state-of-the-art", "C++", "Rust", "NATS", "JetStream", "OpenAI",
    "What is the capital of France?", "Route this to the cheapest model.",
    # numbers
    "3.14159", "1,000,000", "42", "2026-12-01", "10:45", "$99.99", "50%", "1e-12", "0x1F",
    # punctuation and symbols (ASCII ones count as punctuation for BERT)
    "!", "?", "...", "—", "–", "«", "»", "„", "“", "”", "‘", "’", "¿", "¡", "§", "¶", "•",
    "$", "+", "<", "=", ">", "^", "`", "|", "~", "€", "£", "¥", "©", "®", "™", "°", "±",
    "×", "÷", "→", "∑", "√", "∞", "≠", "≤", "★", "♥", "✓",
    # accents, precomposed and combining
    "café", "naïve", "Ångström", "Straße", "façade", "résumé", "Zoë", "São Paulo",
    "Ñandú", "crème brûlée", "e\u0301", "a\u0308\u0304", "o\u0328", "Ḱ", "ǅ", "ﬁ", "Ⅻ",
    "İstanbul", "ΣΊΣΥΦΟΣ", "Ωμέγα", "Привет", "Ёлка", "щи", "Україна", "ქართული",
    # right-to-left and marks
    "مَرْحَبًا", "العربية", "שָׁלוֹם", "עברית",
    # Indic, Thai
    "नमस्ते", "हिन्दी", "বাংলা", "தமிழ்", "ภาษาไทย", "สวัสดี",
    # CJK, kana, Hangul
    "日本語", "東京", "中文", "你好世界", "漢字", "𠀋", "豈", "ひらがな", "カタカナ", "ｶﾀｶﾅ",
    "안녕하세요", "한국어", "ᄀ", "ㄱ",
    # emoji and joiners
    "🍕", "👍🏽", "👨‍👩‍👧", "🇫🇷", "❤️", "😀😃",
    # whitespace and controls
    " ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2028", "\u200b", "\u200d", "\u00ad",
    "\ufeff", "\x07", "\x00", "\x0b", "\x0c", "\x85", "\ufffd", "\ue000", "\U000f0000",
    # special tokens written in the text
    "[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]", "[mask]", "[ MASK ]", "##ing", "##",
    # code
    "fn main() {}", "x => x * 2", "a[i] += b[j];", "<div class=\"x\">", "SELECT * FROM t;",
    "#include <stdio.h>", "http://example.com/a?b=c&d=e", "user@example.com", "snake_case_name",
    "camelCaseName", "ALL_CAPS", "path/to/file.rs",
]


def text(rng):
    n = rng.randint(1, 12)
    parts = []
    for _ in range(n):
        p = rng.choice(PIECES)
        if rng.random() < 0.1:
            p = p.upper()
        parts.append(p)
        parts.append(rng.choice(["", " ", " ", " ", "  ", "\n", ", "]))
    return "".join(parts)


def main():
    tok = Tokenizer.from_file(os.path.join(MODEL, "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(256)
    rng = random.Random(20261201)
    texts = [p for p in PIECES] + [text(rng) for _ in range(400 - len(PIECES))]
    texts.append("x" * 100)
    texts.append("x" * 101)
    texts.append(" ".join(["supercalifragilistic"] * 120))
    cases = [{"text": t, "ids": tok.encode(t).ids} for t in texts]
    with open(OUT, "w") as f:
        json.dump({"made_by": "embed/tests/data/make_tokenizer_ids.py", "max_tokens": 256, "cases": cases},
                  f, ensure_ascii=False)
        f.write("\n")
    print(f"{len(cases)} texts")


if __name__ == "__main__":
    main()
