#!/usr/bin/env bash
# The original OptiRoute's Locust scenario against this stack, with its
# published figures alongside: 50 users started at 5/s for 60 s, each
# waiting 1–4 s between requests; 75 % short prompts (routed local), 25 %
# complex ones (routed cloud). The local pool is the default simulated
# engine (0.5 s + 20 ms/token, as the original's); the cloud pool calls a
# fake OpenAI-compatible upstream that answers after CLOUD_DELAY_MS.
#
# Settings (environment): USERS=50 SPAWN_RATE=5 DURATION=60 THINK_MIN=1
# THINK_MAX=4 CLOUD_DELAY_MS=800 BENCH_OUT=target/bench
set -euo pipefail
. "$(dirname "$0")/lib.sh"

users=${USERS:-50}
spawn_rate=${SPAWN_RATE:-5}
duration=${DURATION:-60}
think_min=${THINK_MIN:-1}
think_max=${THINK_MAX:-4}
cloud_delay=${CLOUD_DELAY_MS:-800}

bench_build
bench_out original-scenario
start_nats
start_fake_upstream "$cloud_delay"
write_config ""
start_stack

echo "bench: original scenario: $users users at $spawn_rate/s, ${duration}s, think ${think_min}-${think_max}s" >&2
"$bin/optiroute" loadtest --url "http://127.0.0.1:$http_port" --mode original \
  --users "$users" --spawn-rate "$spawn_rate" --duration "$duration" \
  --think-min "$think_min" --think-max "$think_max" --workload original \
  --csv "$out/original" --json "$out/original.json" | tee "$out/summary.txt"

j="$out/original.json"
p50=$(json "$j" 'round(r["latency_ms"]["p50"], 2)')
p95=$(json "$j" 'round(r["latency_ms"]["p95"], 2)')
p99=$(json "$j" 'round(r["latency_ms"]["p99"], 2)')
rps=$(json "$j" 'round(r["requests_per_s"], 2)')
reqs=$(json "$j" 'r["requests"]')
fails=$(json "$j" 'round(100 * r["failures"] / max(r["requests"], 1), 2)')
hit=$(json "$j" 'None if r["cache_hit_rate"] is None else round(100 * r["cache_hit_rate"], 1)')
saved=$(json "$j" 'None if r["cache_saved_pct"] is None else round(r["cache_saved_pct"], 1)')
vs_cloud=$(json "$j" 'None if r["saved_vs_all_cloud_pct"] is None else round(r["saved_vs_all_cloud_pct"], 1)')
local_share=$(json "$j" 'round(100 * r["routed_local"] / max(r["routed_local"] + r["routed_cloud"], 1), 1)')
fallbacks=$(json "$j" 'r["fallbacks"]')

echo
echo "== original scenario: the original OptiRoute (Locust, published) vs this run"
machine
printf '%-30s %-22s %s\n' "" "original (published)" "OptiRoute (this run)"
printf '%-30s %-22s %s\n' "median latency" "3 ms (cached)" "$p50 ms"
printf '%-30s %-22s %s\n' "p95 / p99 latency" "-" "$p95 / $p99 ms"
printf '%-30s %-22s %s\n' "throughput" "18.26 req/s" "$rps req/s ($reqs requests)"
printf '%-30s %-22s %s\n' "failures" "0 %" "$fails %"
printf '%-30s %-22s %s\n' "cache hit rate" "-" "$hit %"
printf '%-30s %-22s %s\n' "cost saved by the cache" "98 %" "$saved %"
printf '%-30s %-22s %s\n' "cost saved vs all-cloud" "-" "$vs_cloud %"
printf '%-30s %-22s %s\n' "routed local" "75 % (by design)" "$local_share %"
printf '%-30s %-22s %s\n' "fallbacks" "-" "$fallbacks"
echo "(throughput is bound by the scenario: 50 users thinking 2.5 s on average give ~20 req/s at most)"
echo "files: $out/original_stats.csv $out/original.json $out/summary.txt"
