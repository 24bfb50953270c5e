#!/usr/bin/env bash
# What OptiRoute adds in front of a cloud model: the same chat completion
# sent straight to a fast fake OpenAI-compatible upstream ("direct") and
# through OptiRoute with provider cloud and the cache off ("via": HTTP
# ingress → NATS → router → NATS → cloud worker → HTTP upstream and back).
# Direct and via runs alternate (and swap order every round), so both see
# the same machine state; the medians over the rounds are compared.
#
# Settings (environment): ROUNDS=5 SECS=3 (per run) CONCURRENCY="1 16"
# UPSTREAM_DELAY_MS=0 BENCH_OUT=target/bench
set -euo pipefail
. "$(dirname "$0")/lib.sh"

rounds=${ROUNDS:-5}
secs=${SECS:-3}
concurrency=${CONCURRENCY:-1 16}
delay=${UPSTREAM_DELAY_MS:-0}

bench_build
bench_out overhead
start_nats
start_fake_upstream "$delay"
write_config ""
start_stack

prompt="What is the capital of France?"
printf '{"prompt": "%s", "max_tokens": 64}\n' "$prompt" >"$work/one.jsonl"

run() { # run direct|via CONCURRENCY ROUND
  local kind=$1 c=$2 round=$3 name="$1-c$2-r$3"
  local target=(--api openai --url "http://127.0.0.1:$upstream_port" --model fake)
  [ "$kind" = via ] && target=(--url "http://127.0.0.1:$http_port" --provider cloud --cache-off)
  "$bin/optiroute" loadtest "${target[@]}" --mode closed --concurrency "$c" --duration "$secs" \
    --workload "$work/one.jsonl" --quiet --json "$out/$name.json" >"$out/$name.txt" 2>"$out/$name.err"
}

for c in $concurrency; do
  for ((r = 1; r <= rounds; r++)); do
    echo "bench: concurrency $c, round $r/$rounds" >&2
    if ((r % 2)); then run direct "$c" "$r"; run via "$c" "$r"; else run via "$c" "$r"; run direct "$c" "$r"; fi
  done
done

echo
echo "== overhead: direct to the fake upstream vs through OptiRoute (provider cloud, cache off)"
machine
echo "$rounds alternating rounds of ${secs}s per path and concurrency; figures are medians over the rounds"
python3 - "$out" "$rounds" $concurrency <<'EOF'
import json, statistics, sys
out, rounds, concs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
def load(kind, c, r):
    return json.load(open(f"{out}/{kind}-c{c}-r{r}.json"))
rows = []
print(f"{'conc':>4}  {'path':<7} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>9} {'failures':>8}")
for c in concs:
    med = {}
    for kind in ("direct", "via"):
        runs = [load(kind, c, r) for r in range(1, rounds + 1)]
        m = {
            "p50": statistics.median(x["latency_ms"]["p50"] for x in runs),
            "p99": statistics.median(x["latency_ms"]["p99"] for x in runs),
            "rps": statistics.median(x["requests_per_s"] for x in runs),
            "fail": sum(x["failures"] for x in runs),
        }
        med[kind] = m
        print(f"{c:>4}  {kind:<7} {m['p50']:>8.3f} {m['p99']:>8.3f} {m['rps']:>9.1f} {m['fail']:>8}")
    d, v = med["direct"], med["via"]
    print(f"{c:>4}  {'ratio':<7} {v['p50'] / d['p50']:>7.1f}x {v['p99'] / d['p99']:>7.1f}x {v['rps'] / d['rps']:>8.2f}x"
          f"   (OptiRoute adds {v['p50'] - d['p50']:.3f} ms at the median)")
EOF
echo "files: $out/"
