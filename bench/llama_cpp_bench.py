#!/usr/bin/env python3
"""llama.cpp (through llama-cpp-python) on the same GGUF file and the same
prompt token ids as embedded-bench: greedy, the same repeat penalty, each
generation run to --max-tokens. Single stream on 1 and 2 threads, and
--concurrency N requests served one after another by one model on all
threads (llama-cpp-python has no parallel slots). Writes JSON."""
import argparse
import json
import resource
import time

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
        llm = Llama(model_path=a.model, n_ctx=2048, n_batch=512, n_threads=t,
                    n_threads_batch=t, verbose=False)
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
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    json.dump(out, open(a.json, "w"))


if __name__ == "__main__":
    main()
