#!/usr/bin/env bash
# What the pipeline itself can carry, closed loop (no think time), at
# several concurrencies, on three paths:
#   hit     the same prompt again and again: cache hits (ingress → router → KV get)
#   miss    a new prompt every request, cache on: lookup miss, in-flight
#           marker, local pool, cache write
#   bypass  a new prompt every request with "cache": "off": ingress → router → local pool
# The local pool is the simulated engine set to 0 ms, so the figures are
# the pipeline's own cost (HTTP, NATS hops, JetStream KV, serialisation).
# Also prints the CPU each process spent per request.
#
# Settings (environment): POINT_SECS=10 (seconds per point)
# CONCURRENCY="1 8 32 64" PATHS="hit miss bypass" BENCH_OUT=target/bench
set -euo pipefail
. "$(dirname "$0")/lib.sh"

point_secs=${POINT_SECS:-10}
concurrency=${CONCURRENCY:-1 8 32 64}
paths=${PATHS:-hit miss bypass}

bench_build
bench_out capacity
start_nats
start_fake_upstream 0
write_config '[local.simulated]
base_ms = 0
per_token_ms = 0'
start_stack

hit_prompt="What is the capital of France?"
printf '{"prompt": "%s"}\n' "$hit_prompt" >"$work/hit.jsonl"
# Put the answer in the cache.
probe "{\"prompt\": \"$hit_prompt\"}" >/dev/null

procs=(optiroute-ingress optiroute-router optiroute-local nats)
tck=$(getconf CLK_TCK)
table="$out/capacity.tsv"
printf 'path\tconcurrency\treq/s\tp50_ms\tp99_ms\tfailures\tcache_hit_%%\tcpu_us_per_req:loadgen\tingress\trouter\tlocal\tnats\n' >"$table"

for path in $paths; do
  case $path in
    hit) flags=(--workload "$work/hit.jsonl") ;;
    miss) flags=(--workload unique) ;;
    bypass) flags=(--workload unique --cache-off) ;;
    *) echo "bench: unknown path $path (hit, miss, bypass)" >&2; exit 2 ;;
  esac
  for c in $concurrency; do
    name="$path-c$c"
    declare -A before=()
    for p in "${procs[@]}"; do before[$p]=$(cpu_ticks "$(pid_of "$p")"); done
    echo "bench: $path, concurrency $c, ${point_secs}s" >&2
    TIMEFORMAT='%U %S'
    { time "$bin/optiroute" loadtest --url "http://127.0.0.1:$http_port" --mode closed \
        --concurrency "$c" --duration "$point_secs" "${flags[@]}" --quiet \
        --csv "$out/$name" --json "$out/$name.json" >"$out/$name.txt" 2>"$out/$name.err"; } 2>"$out/$name.time"
    j="$out/$name.json"
    reqs=$(json "$j" 'max(r["requests"], 1)')
    read -r u s <"$out/$name.time"
    cpu_line=$(python3 -c "print(round(($u + $s) * 1e6 / $reqs))")
    for p in "${procs[@]}"; do
      after=$(cpu_ticks "$(pid_of "$p")")
      cpu_line+=$'\t'$(python3 -c "print(round(($after - ${before[$p]}) * 1e6 / $tck / $reqs))")
    done
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$path" "$c" \
      "$(json "$j" 'round(r["requests_per_s"], 1)')" \
      "$(json "$j" 'round(r["latency_ms"]["p50"], 2)')" \
      "$(json "$j" 'round(r["latency_ms"]["p99"], 2)')" \
      "$(json "$j" 'r["failures"]')" \
      "$(json "$j" 'None if r["cache_hit_rate"] is None else round(100 * r["cache_hit_rate"], 1)')" \
      "$cpu_line" >>"$table"
  done
done

echo
echo "== capacity: closed loop, ${point_secs}s per point, local engine 0 ms"
machine
if command -v column >/dev/null; then column -t -s $'\t' "$table"; else cat "$table"; fi
echo "cpu_us_per_req: CPU microseconds each process spent per request during the point (user + system)"
echo "files: $out/"
