#!/usr/bin/env bash
# What a fallback to the local pool adds to a request's latency, closed loop
# at concurrency 1 (cache off, local engine at 0 ms, so the difference is
# the fallback itself). Rounds alternate the direct and the fallback runs.
#   local          provider local: ingress → router → local pool
#   circuit_open   provider cloud with the upstream gone and the breaker open:
#                  router → cloud worker (answers circuit_open at once) → local pool
#   no_responders  provider cloud with no cloud worker at all: router → (no
#                  responders) → local pool
# Settings (environment): ROUNDS=3 SECS=5 BENCH_OUT=target/bench
set -euo pipefail
. "$(dirname "$0")/lib.sh"

rounds=${ROUNDS:-3}
secs=${SECS:-5}

bench_build
bench_out fallback
start_nats
start_fake_upstream 0
write_config '[local.simulated]
base_ms = 0
per_token_ms = 0'
start_stack

run() { # NAME PROVIDER ROUND
  "$bin/optiroute" loadtest --url "http://127.0.0.1:$http_port" --mode closed --concurrency 1 \
    --duration "$secs" --workload unique --cache-off --provider "$2" --quiet --json "$out/$1-$3.json" >/dev/null
}
p() { # FILE FIELD
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d$2)" "$1"
}

# The upstream goes away: three failures open the cloud breaker.
kill "$(pid_of fake-upstream)"
for i in 1 2 3 4; do probe '{"prompt":"open it '"$i"'","provider":"cloud","cache":"off","max_tokens":1}' >/dev/null; done

for r in $(seq 1 "$rounds"); do
  run local local "$r"
  run circuit_open cloud "$r"
done
kill -TERM "$(pid_of optiroute-cloud)"
sleep 1
for r in $(seq 1 "$rounds"); do
  run local2 local "$r"
  run no_responders cloud "$r"
done

machine
python3 - "$out" "$rounds" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def load(name):
    return [json.load(open(f"{out}/{name}-{r}.json")) for r in range(1, rounds + 1)]
def med(runs, key):
    return statistics.median(r["latency_ms"][key] for r in runs)
rows = [("local (direct)", load("local") + load("local2")), ("fallback: circuit_open", load("circuit_open")), ("fallback: no_responders", load("no_responders"))]
base50, base99 = med(rows[0][1], "p50"), med(rows[0][1], "p99")
print(f"{'path':26} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} {'+p99 ms':>8}  fallbacks")
for name, runs in rows:
    p50, p99 = med(runs, "p50"), med(runs, "p99")
    fb = sum(r.get("fallbacks", 0) for r in runs)
    n = sum(r.get("requests", 0) for r in runs)
    print(f"{name:26} {p50:8.3f} {p99:8.3f} {p50-base50:8.3f} {p99-base99:8.3f}  {fb}/{n}")
PY
