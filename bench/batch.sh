#!/usr/bin/env bash
# A large batch end to end: LINES (100,000) jobs submitted over HTTP to the
# ingress, run by WORKERS batch workers through the router on the simulated
# local engine at zero latency, results streamed back. Prints the ingress's
# peak RSS while it reads the upload, the status latency while the batch
# runs (polled every 50 ms from the moment the upload starts: p50, p99,
# max), the time to submit and to finish, and the time to stream the results.
#
# Settings (environment): LINES=100000 WORKERS=2 IN_FLIGHT=64 BENCH_OUT=target/bench
set -euo pipefail
. "$(dirname "$0")/lib.sh"

lines=${LINES:-100000}
workers=${WORKERS:-2}
in_flight=${IN_FLIGHT:-64}

. "$root/scripts/setup.sh"
# setup.sh uses `bin` and `root` for itself.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$root/target/release"
if [ "${BENCH_NO_BUILD:-0}" != 1 ]; then
  echo "bench: building release binaries (cargo build --release --bins -p ...)" >&2
  cargo build --release --bins --quiet -p optiroute-ingress -p optiroute-router -p optiroute-providers -p optiroute-batch
fi
bench_out batch
start_nats
upstream_port=$(free_port) # no cloud pool: every job goes to the local pool
batch_admin=$(free_port)
write_config "[batch]
admin_listen = \"127.0.0.1:$batch_admin\"
max_in_flight = $in_flight
# Within the bench nats-server's 2 GB file store, next to the cache.
max_queue_bytes = 268435456
max_results_bytes = 536870912
[local.simulated]
base_ms = 0
per_token_ms = 0"
for p in optiroute-local optiroute-router optiroute-ingress; do
  spawn "$p" "$bin/$p" --config "$config"
done
for ((i = 0; i < workers; i++)); do
  # One admin port each; the config's is for the first.
  spawn "batch$i" env OPTIROUTE__BATCH__ADMIN_LISTEN="127.0.0.1:$(free_port)" "$bin/optiroute-batch" --config "$config"
done
wait_port "$http_port" ingress
probe '{"prompt":"probe","provider":"local","cache":"off","max_tokens":1}' >/dev/null

python3 - "$lines" >"$work/batch.jsonl" <<'PY'
import json, sys
for i in range(1, int(sys.argv[1]) + 1):
    print(json.dumps({"custom_id": f"l{i}", "prompt": f"batch question number {i}: what is {i} plus {i}?",
                      "provider": "local", "cache": "off", "max_tokens": 16}))
PY
id="bench$(date +%s)"
base="http://127.0.0.1:$http_port/v1/batches"
ingress_pid=$(pid_of optiroute-ingress)
rss_before=$(awk '/VmRSS/ {print $2}' "/proc/$ingress_pid/status")

# The status poller: from before the upload until the batch completes.
python3 - "$base/$id" "$out/status.csv" "$((lines))" <<'PY' &
import json, sys, time, urllib.request, urllib.error
url, path, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
deadline = time.time() + 3600
with open(path, "w") as f:
    f.write("t,latency_ms,http,status,done,submitted\n")
    t0 = time.time()
    while time.time() < deadline:
        start = time.perf_counter()
        try:
            body = urllib.request.urlopen(url, timeout=30).read()
            code, s = 200, json.loads(body)
        except urllib.error.HTTPError as e:
            code, s = e.code, {}
        ms = (time.perf_counter() - start) * 1000
        f.write(f"{time.time() - t0:.3f},{ms:.3f},{code},{s.get('status', '')},{s.get('done', '')},{s.get('submitted', '')}\n")
        f.flush()
        if s.get("status") == "completed":
            break
        time.sleep(0.05)
PY
poller=$!
t0=$(date +%s.%N)
curl -sS --fail-with-body -X POST --data-binary @"$work/batch.jsonl" "$base?id=$id" -o "$out/submit.json"
t_submit=$(date +%s.%N)
rss_peak=$(awk '/VmHWM/ {print $2}' "/proc/$ingress_pid/status")
wait "$poller"
t_done=$(date +%s.%N)
curl -sS --fail "$base/$id/results" -o "$work/results.jsonl"
t_results=$(date +%s.%N)
rss_after=$(awk '/VmHWM/ {print $2}' "/proc/$ingress_pid/status")
result_lines=$(wc -l <"$work/results.jsonl")
ok_lines=$(grep -c '"status":"ok"' "$work/results.jsonl" || true)

echo
echo "== batch: $lines lines, $workers batch workers x $in_flight in flight, simulated local engine at 0 ms"
machine
python3 - "$out/status.csv" "$t0" "$t_submit" "$t_done" "$t_results" "$rss_before" "$rss_peak" "$rss_after" "$result_lines" "$ok_lines" "$(stat -c %s "$work/batch.jsonl")" <<'PY'
import csv, statistics, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r["http"] == "200"]
t0, ts, td, tr = map(float, sys.argv[2:6])
before, peak, after, nres, nok, size = map(int, sys.argv[6:12])
lat = sorted(float(r["latency_ms"]) for r in rows)
p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
print(f"upload             {size / 1e6:.1f} MB, submitted in {ts - t0:.2f} s")
print(f"ingress RSS        {before / 1024:.1f} MiB before, peak {peak / 1024:.1f} MiB while submitting, peak {after / 1024:.1f} MiB after streaming the results")
print(f"batch finished     {td - t0:.2f} s after the upload started ({nres and int(nres / (td - t0))} lines/s)")
print(f"status latency     {len(lat)} polls: p50 {p(0.5):.1f} ms, p99 {p(0.99):.1f} ms, max {lat[-1]:.1f} ms")
print(f"results streamed   {nres} lines ({nok} ok) in {tr - td:.2f} s")
PY
echo "files: $out/"
