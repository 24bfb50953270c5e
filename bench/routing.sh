#!/usr/bin/env bash
# The router with each routing kind, closed loop, local engine at 0 ms:
#   miss  a new prompt every request (routing, cache lookup miss, local
#         pool, cache write)
#   hit   the same prompt again and again (routing comes before the cache
#         lookup: the pool is part of the key, so a hit is routed too)
# once with router.routing.kind = "features" and once with "learned"
# (all-MiniLM-L6-v2 embedding of the prompt, then the kernel ridge model).
# Prints req/s, p50/p99 and the router's CPU per request, and the
# route_reason of a probe so the learned router is seen to be in use.
#
# Settings (environment): POINT_SECS=10 CONCURRENCY="1 8" PATHS="miss hit"
# KINDS="features learned" BENCH_NO_BUILD=1 (use target/release as built)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [ -z "${ROUTING_KIND:-}" ]; then
  "$root/scripts/fetch-embed-model.sh"
  out="${BENCH_OUT:-$root/target/bench}/routing-$(date +%Y%m%d-%H%M%S)"
  mkdir -p "$out"
  first=1
  for kind in ${KINDS:-features learned}; do
    # One stack per kind, each started and stopped by its own run.
    BENCH_NO_BUILD=$([ "$first" = 1 ] && echo "${BENCH_NO_BUILD:-0}" || echo 1) \
      ROUTING_KIND=$kind ROUTING_TABLE="$out/routing.tsv" "$0"
    first=0
  done
  echo
  echo "== router by routing kind: closed loop, ${POINT_SECS:-10}s per point, local engine 0 ms"
  if command -v column >/dev/null; then column -t -s $'\t' "$out/routing.tsv"; else cat "$out/routing.tsv"; fi
  echo "router_cpu_us_per_req: CPU microseconds the router process spent per request (user + system)"
  echo "files: $out/"
  exit 0
fi

BENCH_ROUTING_KIND=$ROUTING_KIND
. "$root/bench/lib.sh"
point_secs=${POINT_SECS:-10}
bench_build
out=$(dirname "$ROUTING_TABLE")
start_nats
start_fake_upstream 0
write_config "[router.routing]
kind = \"$ROUTING_KIND\"
[router.embedding]
model_dir = \"$root/models/all-MiniLM-L6-v2\"
[local.simulated]
base_ms = 0
per_token_ms = 0"
start_stack
reason=$(probe '{"prompt":"Why did the Roman Republic fall?","cache":"off"}' | json /dev/stdin 'r["route_reason"]')
hit_prompt="What is the capital of France?"
printf '{"prompt": "%s"}\n' "$hit_prompt" >"$work/hit.jsonl"
probe "{\"prompt\": \"$hit_prompt\"}" >/dev/null
[ -s "$ROUTING_TABLE" ] || printf 'kind\tpath\tconcurrency\treq/s\tp50_ms\tp99_ms\tfailures\trouter_cpu_us_per_req\tprobe route_reason\n' >"$ROUTING_TABLE"
tck=$(getconf CLK_TCK)
machine >&2
for path in ${PATHS:-miss hit}; do
for c in ${CONCURRENCY:-1 8}; do
  case $path in
    miss) workload=unique ;;
    hit) workload="$work/hit.jsonl" ;;
    *) echo "bench: unknown path $path (miss, hit)" >&2; exit 2 ;;
  esac
  name="$ROUTING_KIND-$path-c$c"
  before=$(cpu_ticks "$(pid_of optiroute-router)")
  echo "bench: $ROUTING_KIND, $path path, concurrency $c, ${point_secs}s" >&2
  "$bin/optiroute" loadtest --url "http://127.0.0.1:$http_port" --mode closed \
    --concurrency "$c" --duration "$point_secs" --workload "$workload" --quiet \
    --json "$out/$name.json" >"$out/$name.txt" 2>"$out/$name.err"
  after=$(cpu_ticks "$(pid_of optiroute-router)")
  j="$out/$name.json"
  reqs=$(json "$j" 'max(r["requests"], 1)')
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$ROUTING_KIND" "$path" "$c" \
    "$(json "$j" 'round(r["requests_per_s"], 1)')" \
    "$(json "$j" 'round(r["latency_ms"]["p50"], 2)')" \
    "$(json "$j" 'round(r["latency_ms"]["p99"], 2)')" \
    "$(json "$j" 'r["failures"]')" \
    "$(python3 -c "print(round(($after - $before) * 1e6 / $tck / $reqs))")" \
    "${reason:0:60}" >>"$ROUTING_TABLE"
done
done
