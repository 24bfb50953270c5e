#!/usr/bin/env bash
# What keys, rate limits and budgets cost, side by side in one run: two
# identical stacks on one nats-server, one with auth off, one with
# `auth.mode = "required"` and a key that has a budget, an rpm and a tpm
# limit (all far above the load, so every request passes all three
# checks). Measured in turns (ROUNDS times, medians kept), on the
# cache-hit path (one cached prompt) and the cache-off path (the same
# prompt with "cache": "off", answered by the simulated local engine in
# 0 ms: the whole pipeline with no model time).
#
# Settings (environment): ROUNDS=3 POINT_SECS=5 CONCURRENCY="1 64"
set -euo pipefail
. "$(dirname "$0")/lib.sh"

rounds=${ROUNDS:-3}
point_secs=${POINT_SECS:-5}
concurrency=${CONCURRENCY:-1 64}
admin_key="bench-admin-key-0123456789"

bench_build
bench_out auth
start_nats
start_fake_upstream 0

fast='[local.simulated]
base_ms = 0
per_token_ms = 0'
start_side off "$fast"
start_side on "$fast" OPTIROUTE__NATS__PREFIX=authon OPTIROUTE__AUTH__MODE=required OPTIROUTE_ADMIN_KEY="$admin_key"

# The key: every limit on, none reached.
key=""
for ((i = 0; i < 100; i++)); do
  if created=$(curl -sf --max-time 5 "http://127.0.0.1:$on_port/admin/keys" \
      -H "authorization: Bearer $admin_key" -H 'content-type: application/json' \
      -d '{"name": "bench", "budget_usd": 1000000, "budget_period": "month", "rpm": 100000000, "tpm": 2000000000}'); then
    key=$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["key"])' "$created")
    break
  fi
  sleep 0.1
done
[ -n "$key" ] || { echo "bench: cannot create a key on the auth stack" >&2; exit 1; }

prompt="What is the capital of France?"
printf '{"prompt": "%s"}\n' "$prompt" >"$work/hit.jsonl"
printf '{"prompt": "%s", "provider": "local"}\n' "$prompt" >"$work/miss.jsonl"
# Each side answers (the key is known to the router once its watch has it) and caches the prompt.
for side in off on; do
  port_var="${side}_port"
  auth=()
  [ "$side" = on ] && auth=(-H "authorization: Bearer $key")
  for ((i = 0; i < 100; i++)); do
    curl -sf --max-time 5 "${auth[@]}" "http://127.0.0.1:${!port_var}/generate" -d "{\"prompt\": \"$prompt\"}" >/dev/null && break
    sleep 0.1
  done
  for ((i = 0; i < 100; i++)); do
    curl -sf --max-time 5 "${auth[@]}" "http://127.0.0.1:${!port_var}/generate" -d "{\"prompt\": \"$prompt\"}" | grep -q '"cached":true' && break
    sleep 0.1
  done
done

raw="$out/points.tsv"
: >"$raw"
# point SIDE PATH C ROUND
point() {
  local side=$1 path=$2 c=$3 round=$4 name="$1-$2-c$3-r$4" port_var="${1}_port" extra=()
  [ "$side" = on ] && extra+=(--api-key "$key")
  [ "$path" = cache-off ] && extra+=(--cache-off --workload "$work/miss.jsonl") || extra+=(--workload "$work/hit.jsonl")
  echo "bench: auth $side, $path, concurrency $c, round $round, ${point_secs}s" >&2
  pinned "$bin/optiroute" loadtest --url "http://127.0.0.1:${!port_var}" --mode closed \
    --concurrency "$c" --duration "$point_secs" --quiet "${extra[@]}" \
    --json "$out/$name.json" >"$out/$name.txt" 2>"$out/$name.err"
  local j="$out/$name.json"
  echo "$side"$'\t'"$path"$'\t'"$c"$'\t'"$(json "$j" 'r["requests_per_s"]')"$'\t'"$(json "$j" 'r["latency_ms"]["p50"]')"$'\t'"$(json "$j" 'r["latency_ms"]["p99"]')"$'\t'"$(json "$j" 'r["failures"]')" >>"$raw"
}

for ((round = 1; round <= rounds; round++)); do
  for path in cache-hit cache-off; do
    for c in $concurrency; do
      point off "$path" "$c" "$round"
      point on "$path" "$c" "$round"
    done
  done
done

echo
echo "== auth off and on, side by side: closed loop, ${point_secs}s per point, median of $rounds rounds"
machine
python3 - "$raw" <<'PY' | tee "$out/auth.tsv" | { if command -v column >/dev/null; then column -t -s $'\t'; else cat; fi; }
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    f = line.rstrip("\n").split("\t")
    rows.setdefault((f[1], int(f[2]), f[0]), []).append([float(x) for x in f[3:]])
print("path\tconcurrency\tauth\treq/s\tp50_ms\tp99_ms\tfailures\tthroughput_on/off\tp50_on-off_ms")
for path in ["cache-hit", "cache-off"]:
    for c in sorted({k[1] for k in rows}):
        med = {side: [statistics.median(col) for col in zip(*rows[(path, c, side)])] for side in ["off", "on"] if (path, c, side) in rows}
        for side, m in med.items():
            extra = ["", ""]
            if side == "on" and "off" in med:
                extra = [f"{m[0] / med['off'][0]:.3f}", f"{m[1] - med['off'][1]:+.3f}"]
            print("\t".join([path, str(c), side, f"{m[0]:.0f}", f"{m[1]:.3f}", f"{m[2]:.2f}", f"{m[3]:.0f}"] + extra))
PY
echo "target (issue 16): throughput on/off >= 0.90 at concurrency 64; p50 +0.05 ms at most at concurrency 1"
echo "files: $out/"
