#!/usr/bin/env bash
# What the semantic cache costs, side by side in one run: the embedding
# alone (p50 and p99 of one all-MiniLM-L6-v2 embedding for a 20-token and
# a 300-token prompt, one thread: embed-bench), the index's brute-force
# search at 1k, 10k and 100k entries in a partition, then the miss path of two
# identical stacks on one nats-server, one with `cache.semantic.enabled =
# false` (the default: requests do not ask) and one with it on (every
# request embeds its prompt after the exact miss, searches the index, and
# stores its vector after the answer). The workload is `unique`: a new
# prompt each request, answered by the simulated local engine in 0 ms, so
# the figures are the pipeline's own cost. Measured in turns (ROUNDS times,
# medians kept).
#
# Settings (environment): ROUNDS=3 POINT_SECS=5 CONCURRENCY="1 8" RUNS=100
set -euo pipefail
. "$(dirname "$0")/lib.sh"

rounds=${ROUNDS:-3}
point_secs=${POINT_SECS:-5}
concurrency=${CONCURRENCY:-1 8}
runs=${RUNS:-100}

bench_build
"$root/scripts/fetch-embed-model.sh"
model="$root/models/all-MiniLM-L6-v2"
if [ "${BENCH_NO_BUILD:-0}" != 1 ]; then
  cargo build --release --quiet -p optiroute-embed --bin embed-bench
fi
bench_out semantic

echo "== one embedding, in process, one thread ($runs runs each)"
pinned "$root/target/release/embed-bench" --model "$model" --runs "$runs" | tee "$out/embed.txt"

echo
echo "== brute-force search of one partition (random unit vectors, 200 searches each)"
pinned "$bin/optiroute-semantic-calibrate" --search 1000,10000,100000 | tee "$out/search.txt"

start_nats
start_fake_upstream 0

# The stack's settings with the semantic cache on or off.
semantic_toml() {
  printf '[cache.semantic]\nenabled = %s\n[router.embedding]\nmodel_dir = "%s"\n[local.simulated]\nbase_ms = 0\nper_token_ms = 0\n' "$1" "$model"
}

start_side off "$(semantic_toml false)"
start_side on "$(semantic_toml true)" OPTIROUTE__NATS__PREFIX=semon
# Each side answers once (its pools subscribe shortly after /ready).
for side in off on; do
  port_var="${side}_port"
  for ((i = 0; i < 100; i++)); do
    curl -sf --max-time 5 "http://127.0.0.1:${!port_var}/generate" -d '{"prompt": "warm up", "provider": "local"}' >/dev/null && break
    sleep 0.1
  done
done
# The on side must really embed: its answer says why if it cannot.
answer=$(curl -sf --max-time 5 "http://127.0.0.1:$on_port/generate" -d '{"prompt": "Is the semantic cache on?", "provider": "local"}')
if echo "$answer" | grep -q semantic_miss.*unavailable; then
  echo "bench: the on stack has no embedding model: $answer" >&2
  exit 1
fi

raw="$out/points.tsv"
: >"$raw"
# point SIDE C ROUND
point() {
  local side=$1 c=$2 round=$3 name="$1-c$2-r$3" port_var="${1}_port"
  echo "bench: semantic $side, miss path, concurrency $c, round $round, ${point_secs}s" >&2
  pinned "$bin/optiroute" loadtest --url "http://127.0.0.1:${!port_var}" --mode closed \
    --concurrency "$c" --duration "$point_secs" --quiet --workload unique --provider local \
    --json "$out/$name.json" >"$out/$name.txt" 2>"$out/$name.err"
  local j="$out/$name.json"
  echo "$side"$'\t'"$c"$'\t'"$(json "$j" 'r["requests_per_s"]')"$'\t'"$(json "$j" 'r["latency_ms"]["p50"]')"$'\t'"$(json "$j" 'r["latency_ms"]["p99"]')"$'\t'"$(json "$j" 'r["failures"]')" >>"$raw"
}

for ((round = 1; round <= rounds; round++)); do
  for c in $concurrency; do
    point off "$c" "$round"
    point on "$c" "$round"
  done
done

echo
echo "== miss path, semantic off and on, side by side: closed loop, unique prompts, ${point_secs}s per point, median of $rounds rounds"
machine
python3 - "$raw" <<'PY' | tee "$out/semantic.tsv" | { if command -v column >/dev/null; then column -t -s $'\t'; else cat; fi; }
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    f = line.rstrip("\n").split("\t")
    rows.setdefault((int(f[1]), f[0]), []).append([float(x) for x in f[2:]])
print("concurrency\tsemantic\treq/s\tp50_ms\tp99_ms\tfailures\tthroughput_on/off\tp50_on-off_ms")
for c in sorted({k[0] for k in rows}):
    med = {side: [statistics.median(col) for col in zip(*rows[(c, side)])] for side in ["off", "on"] if (c, side) in rows}
    for side, m in med.items():
        extra = ["", ""]
        if side == "on" and "off" in med:
            extra = [f"{m[0] / med['off'][0]:.3f}", f"{m[1] - med['off'][1]:+.3f}"]
        print("\t".join([str(c), side, f"{m[0]:.0f}", f"{m[1]:.3f}", f"{m[2]:.2f}", f"{m[3]:.0f}"] + extra))
PY
echo "router embedding time (llm_embedding_seconds, on side):"
curl -sf "http://127.0.0.1:$on_router_admin/metrics" | grep -E '^llm_embedding_seconds_(sum|count)|^optiroute_semantic_lookups_total' || true
echo "files: $out/"
