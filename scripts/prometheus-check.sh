#!/usr/bin/env bash
# Scrapes the running stack (./scripts/up.sh) with a real Prometheus and checks
# that it sees OptiRoute: starts Prometheus with deploy/prometheus/prometheus.yml
# and a temporary TSDB, waits until `optiroute_build_info` has series, prints
# them, and stops Prometheus on exit.
# Settings: PROM_LISTEN (default 127.0.0.1:9090), PROM_WAIT_SECS (default 60).
set -euo pipefail
cd "$(dirname "$0")/.."

listen="${PROM_LISTEN:-127.0.0.1:9090}"
wait_secs="${PROM_WAIT_SECS:-60}"
config="deploy/prometheus/prometheus.yml"
query="optiroute_build_info"

if ! command -v prometheus >/dev/null 2>&1; then
  echo "prometheus-check: installing prometheus (apt-get)" >&2
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq prometheus >/dev/null
fi
command -v curl >/dev/null 2>&1 || { echo "prometheus-check: curl is required" >&2; exit 1; }

if ! curl -fsS -o /dev/null http://127.0.0.1:8000/health; then
  echo "prometheus-check: nothing answers on 127.0.0.1:8000; start the stack with ./scripts/up.sh" >&2
fi

tsdb="$(mktemp -d -t optiroute-prom.XXXXXX)"
log="$tsdb.log"
prom_pid=""
cleanup() {
  if [ -n "$prom_pid" ]; then
    kill -TERM "$prom_pid" 2>/dev/null || true
    wait "$prom_pid" 2>/dev/null || true
  fi
  rm -rf "$tsdb" "$log"
}
trap cleanup EXIT INT TERM

prometheus --config.file="$config" --storage.tsdb.path="$tsdb" \
  --web.listen-address="$listen" >"$log" 2>&1 &
prom_pid=$!
echo "prometheus-check: prometheus pid $prom_pid on http://$listen (config $config)"

# Series in a Prometheus API answer.
count() { { grep -o '"__name__"' <<<"$1" || true; } | wc -l; }
jobs=4 # optiroute-ingress, -router, -local, -cloud

result=""
for ((i = 1; i <= wait_secs; i++)); do
  if ! kill -0 "$prom_pid" 2>/dev/null; then
    echo "prometheus-check: prometheus exited:" >&2
    cat "$log" >&2
    exit 1
  fi
  answer="$(curl -fsS "http://$listen/api/v1/query" --data-urlencode "query=$query" 2>/dev/null || true)"
  [[ "$answer" == *'"status":"success"'* ]] && result="$answer"
  # Wait for every job; at the deadline, one is enough.
  n="$(count "$result")"
  if [ "$n" -ge "$jobs" ] || { [ "$i" -eq "$wait_secs" ] && [ "$n" -ge 1 ]; }; then
    echo "prometheus-check: $query ($n series):"
    sed 's/},{"metric"/},\n{"metric"/g' <<<"$result"
    echo "prometheus-check: up by job:"
    curl -fsS "http://$listen/api/v1/query" --data-urlencode 'query=up{job=~"optiroute-.*"}' \
      | grep -o '"job":"[^"]*"},"value":\[[^]]*\]' || true
    exit 0
  fi
  sleep 1
done
echo "prometheus-check: no $query series after ${wait_secs}s; last answer: ${result:-none}" >&2
exit 1
