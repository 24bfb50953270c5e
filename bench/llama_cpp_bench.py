#!/usr/bin/env python3
"""llama.cpp (through llama-cpp-python) on the same GGUF file and the same
prompt token ids as embedded-bench: greedy, the same repeat penalty, each
generation run to --max-tokens. Single stream on 1 and 2 threads, and
--concurrency N requests served one after another by one model on all
threads, and the same N generations batched: llama.cpp's own multi-sequence
decoding (what its server's parallel slots run), every sequence's next token
in one llama_decode per step, through the package's low-level API. Writes
JSON."""
import argparse
import json
import resource
import time

import llama_cpp as L
import numpy as np
from llama_cpp import Llama


def generate(llm, ids, max_tokens, repeat_penalty):
    llm.reset()
    started = time.perf_counter()
    first = None
    n = 0
    for _ in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=repeat_penalty, reset=True):
        n += 1
        if first is None:
            first = time.perf_counter() - started
        if n >= max_tokens:
            break
    total = time.perf_counter() - started
    tps = (n - 1) / (total - first) if n > 1 and total > first else 0.0
    return {"tokens": n, "ttft_ms": first * 1000.0, "tps": tps, "total_s": total}


def batched(path, prompts, n, max_tokens, threads):
    """N generations in one llama.cpp context, one sequence id each: the
    prompts read in one batch, then every sequence's next token decoded
    together each step, to max_tokens each (greedy argmax over the logits:
    the sequences run to the limit, so which token wins changes no
    timing). Returns the timings from the start."""
    model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {path}")
    cp = L.llama_context_default_params()
    lens = [len(prompts[i % len(prompts)]) for i in range(n)]
    # Cells per sequence, a multiple of 256 (llama.cpp pads the context).
    per_seq = (max(lens) + max_tokens + 16 + 255) // 256 * 256
    cp.n_seq_max = n
    cp.kv_unified = False  # each sequence its own cells (faster here: 234 against 206 tokens/s at 8)
    cp.n_ctx = per_seq * n
    cp.n_batch = cp.n_ubatch = max(512, sum(lens))
    cp.n_threads = cp.n_threads_batch = threads
    cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        L.llama_model_free(model)
        raise RuntimeError(f"llama.cpp could not make a context for {n} sequences")
    vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    batch = L.llama_batch_init(cp.n_batch, 0, 1)

    def decode(rows):
        """rows: (sequence, token, position, wants logits)."""
        batch.n_tokens = len(rows)
        for i, (s, tok, pos, want) in enumerate(rows):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
            batch.seq_id[i][0], batch.logits[i] = s, int(want)
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        picks = []
        for i, row in enumerate(rows):
            if row[3]:
                logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(vocab,))
                picks.append(int(logits.argmax()))
        return picks

    try:
        decode([(0, prompts[0][0], 0, True)])  # warm-up
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        started = time.perf_counter()
        rows = []
        for s in range(n):
            ids = prompts[s % len(prompts)]
            rows += [(s, t, p, p + 1 == len(ids)) for p, t in enumerate(ids)]
        nxt = decode(rows)
        first = time.perf_counter() - started
        made = [[t] for t in nxt]
        for step in range(1, max_tokens):
            nxt = decode([(s, nxt[s], lens[s] + step - 1, True) for s in range(n)])
            for s, t in enumerate(nxt):
                made[s].append(t)
        wall = time.perf_counter() - started
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        L.llama_model_free(model)
    return {"concurrency": n, "threads": threads, "tokens": n * max_tokens,
            "wall_s": wall, "ttft_ms": first * 1000.0,
            "total_tps": n * max_tokens / wall,
            "decode_tps": n * (max_tokens - 1) / (wall - first), "ids": made}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--ours", required=True, help="embedded-bench --json output (prompt ids)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--concurrency", default="1,2,4,8")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--repeat-penalty", type=float, default=1.1)
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    ours = json.load(open(a.ours))
    prompts, max_tokens = ours["prompts"], ours["max_tokens"]
    out = {"engine": "llama.cpp", "single": [], "sequential": []}
    threads = [int(t) for t in a.threads.split(",")]
    def load(t):
        # Flash attention on, in both of llama.cpp's ways: its faster
        # setting here (two threads, one generation: 108-110 against 98-107
        # tokens/s through generate, 116 against 103 through the low-level
        # API).
        llm = Llama(model_path=a.model, n_ctx=2048, n_batch=512, n_threads=t,
                    n_threads_batch=t, flash_attn=True, verbose=False)
        generate(llm, prompts[0], 4, a.repeat_penalty)  # warm-up
        return llm

    # Runs outermost (loading takes milliseconds: the file is mapped), so
    # a burst of other work on the machine skews no thread count alone.
    for run in range(a.runs):
        for t in threads:
            llm = load(t)
            r = generate(llm, prompts[0], max_tokens, a.repeat_penalty)
            r.update(threads=t, run=run + 1)
            out["single"].append(r)
            print(f"llama.cpp {t} thread(s) run {run + 1}: {r['tokens']} tokens, "
                  f"{r['tps']:.1f} tokens/s, first token {r['ttft_ms']:.0f} ms", flush=True)
            del llm
    t = max(threads)
    llm = load(t)
    for n in [int(c) for c in a.concurrency.split(",") if c]:
        started = time.perf_counter()
        rs = []
        for i in range(n):
            r = generate(llm, prompts[i % len(prompts)], max_tokens, a.repeat_penalty)
            # From submission: every request arrived at the start.
            r["ttft_ms"] += (time.perf_counter() - started - r["total_s"]) * 1000.0
            rs.append(r)
        wall = time.perf_counter() - started
        tokens = sum(r["tokens"] for r in rs)
        row = {"concurrency": n, "threads": t, "tokens": tokens, "wall_s": wall,
               "total_tps": tokens / wall,
               "per_seq_tps": [r["tokens"] / wall for r in rs],
               "ttft_ms": [r["ttft_ms"] for r in rs]}
        out["sequential"].append(row)
        print(f"llama.cpp {n} requests one after another ({t} threads): "
              f"{row['total_tps']:.1f} tokens/s total, first token "
              f"{sum(row['ttft_ms']) / n:.0f} ms mean, {max(row['ttft_ms']):.0f} ms max", flush=True)
    del llm
    out["batched"] = []
    for run in range(a.runs):
        alone = None
        for n in [int(c) for c in a.concurrency.split(",") if c]:
            r = batched(a.model, prompts, n, max_tokens, t)
            r["run"] = run + 1
            # Sequence 0 reads prompts[0] at every N: how many of its first
            # tokens are those it chose alone (a check that the batch is
            # decoded right; float sums in another order may part later).
            ids = r.pop("ids")[0]
            alone = ids if n == 1 else alone
            same = ""
            if alone is not None and n > 1:
                k = next((i for i, (x, y) in enumerate(zip(ids, alone)) if x != y), len(ids))
                r["same_as_alone"] = k
                same = f"; sequence 0's first {k} of {len(ids)} tokens as alone"
            out["batched"].append(r)
            print(f"llama.cpp {n} generations batched ({t} threads) run {run + 1}: "
                  f"{r['total_tps']:.1f} tokens/s total, decoding {r['decode_tps']:.1f}, "
                  f"first tokens after {r['ttft_ms']:.0f} ms{same}", flush=True)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    json.dump(out, open(a.json, "w"))


if __name__ == "__main__":
    main()
