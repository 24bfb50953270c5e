#!/usr/bin/env bash
# The cache-hit path against its own floor on this machine. Three targets,
# all on one nats-server, measured in turns (ROUNDS times, medians kept):
#   floor      `optiroute floor`: axum POST /generate → one NATS request →
#              a responder that answers fixed bytes. No validation, ids,
#              deadlines, metrics, logs, cache or routing: the least any
#              implementation of HTTP → ingress → NATS → router → reply costs.
#   floor-kv   the same, the responder reading the answer from JetStream KV
#              for every request (a cache with no in-memory front).
#   optiroute  the real stack (ingress → router → cache) on a cached prompt.
# Same load generator (optiroute loadtest, closed loop) for all three.
# Also prints the CPU each process spent per request.
#
# Settings (environment): ROUNDS=3 POINT_SECS=5 CONCURRENCY="1 64"
# BENCH_CPUS=0 runs every process on CPU 0 only (no cross-CPU wake-ups).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

rounds=${ROUNDS:-3}
point_secs=${POINT_SECS:-5}
concurrency=${CONCURRENCY:-1 64}

bench_build
bench_out floor
start_nats
nats_url="nats://127.0.0.1:$nats_port"
floor_port=$(free_port)
floor_kv_port=$(free_port)
spawn floor-responder "$bin/optiroute" floor responder --nats "$nats_url" --subject optiroute.floor
spawn floor-responder-kv "$bin/optiroute" floor responder --kv --nats "$nats_url" --subject optiroute.floor.kv
spawn floor-ingress "$bin/optiroute" floor ingress --nats "$nats_url" --subject optiroute.floor --listen "127.0.0.1:$floor_port"
spawn floor-ingress-kv "$bin/optiroute" floor ingress --nats "$nats_url" --subject optiroute.floor.kv --listen "127.0.0.1:$floor_kv_port"
wait_port "$floor_port" "floor ingress"
wait_port "$floor_kv_port" "floor ingress (kv)"
start_fake_upstream 0
write_config '[local.simulated]
base_ms = 0
per_token_ms = 0'
start_stack

prompt="What is the capital of France?"
printf '{"prompt": "%s"}\n' "$prompt" >"$work/hit.jsonl"
probe "{\"prompt\": \"$prompt\"}" >/dev/null
for port in "$floor_port" "$floor_kv_port"; do
  curl -sf --max-time 5 "http://127.0.0.1:$port/generate" -d "{\"prompt\": \"$prompt\"}" | grep -q '"cached":true' || {
    echo "bench: the floor on port $port does not answer" >&2
    exit 1
  }
done

tck=$(getconf CLK_TCK)
raw="$out/points.tsv"
: >"$raw"
# point TARGET PORT C ROUND INGRESS RESPONDER
point() {
  local target=$1 port=$2 c=$3 round=$4 ing=$5 resp=$6 name="$1-c$3-r$4"
  local p procs=("$ing" "$resp" nats) before=()
  for p in "${procs[@]}"; do before+=("$(cpu_ticks "$(pid_of "$p")")"); done
  echo "bench: $target, concurrency $c, round $round, ${point_secs}s" >&2
  TIMEFORMAT='%U %S'
  { time pinned "$bin/optiroute" loadtest --url "http://127.0.0.1:$port" --mode closed \
      --concurrency "$c" --duration "$point_secs" --workload "$work/hit.jsonl" --quiet \
      --json "$out/$name.json" >"$out/$name.txt" 2>"$out/$name.err"; } 2>"$out/$name.time"
  local j="$out/$name.json" reqs u s line i=0
  reqs=$(json "$j" 'max(r["requests"], 1)')
  read -r u s <"$out/$name.time"
  line="$target"$'\t'"$c"$'\t'"$(json "$j" 'r["requests_per_s"]')"$'\t'"$(json "$j" 'r["latency_ms"]["p50"]')"$'\t'"$(json "$j" 'r["latency_ms"]["p99"]')"$'\t'"$(json "$j" 'r["failures"]')"
  line+=$'\t'$(python3 -c "print(($u + $s) * 1e6 / $reqs)")
  for p in "${procs[@]}"; do
    line+=$'\t'$(python3 -c "print(($(cpu_ticks "$(pid_of "$p")") - ${before[$i]}) * 1e6 / $tck / $reqs)")
    i=$((i + 1))
  done
  echo "$line" >>"$raw"
}

for ((round = 1; round <= rounds; round++)); do
  for c in $concurrency; do
    point floor "$floor_port" "$c" "$round" floor-ingress floor-responder
    point floor-kv "$floor_kv_port" "$c" "$round" floor-ingress-kv floor-responder-kv
    point optiroute "$http_port" "$c" "$round" optiroute-ingress optiroute-router
  done
done

echo
echo "== the cache-hit path and its floor: closed loop, ${point_secs}s per point, median of $rounds rounds"
machine
[ -n "${BENCH_CPUS:-}" ] && echo "every process pinned to CPU(s) $BENCH_CPUS"
python3 - "$raw" <<'PY' | tee "$out/floor.tsv" | { if command -v column >/dev/null; then column -t -s $'\t'; else cat; fi; }
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    f = line.rstrip("\n").split("\t")
    rows.setdefault((f[0], int(f[1])), []).append([float(x) for x in f[2:]])
print("target\tconcurrency\treq/s\tp50_ms\tp99_ms\tfailures\tcpu_us_per_req:loadgen\tingress\trouter/responder\tnats")
for (target, c), pts in sorted(rows.items(), key=lambda kv: (kv[0][1], ["floor", "floor-kv", "optiroute"].index(kv[0][0]))):
    med = [statistics.median(col) for col in zip(*pts)]
    print("\t".join([target, str(c), f"{med[0]:.0f}", f"{med[1]:.3f}", f"{med[2]:.2f}", f"{med[3]:.0f}"] + [f"{x:.0f}" for x in med[4:]]))
PY
echo "cpu_us_per_req: CPU microseconds each process spent per request (user + system)"
echo "files: $out/"
