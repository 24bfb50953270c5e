# shellcheck shell=bash
# Shared by the bench scripts (source it, do not run it). It builds the
# release binaries, and starts on free 127.0.0.1 ports: a nats-server with
# JetStream in a temp dir, the fake OpenAI-compatible upstream, and the four
# OptiRoute processes. Everything it started is stopped on exit, however
# the script ends.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bin="${BENCH_BIN:-$root/target/release}"
# The pipeline benches measure with the feature router (a microsecond a
# decision), as their README figures were taken, whether or not the
# embedding model is on disk; BENCH_ROUTING_KIND=learned measures the
# default router instead (one embedding per new prompt).
export OPTIROUTE__ROUTER__ROUTING__KIND="${BENCH_ROUTING_KIND:-features}"
work="$(mktemp -d -t optiroute-bench.XXXXXX)"
mkdir -p "$work/logs"
pids=()
names=()

bench_cleanup() {
  local status=$?
  trap - EXIT INT TERM
  # Newest first: ingress, router, workers drain before NATS goes.
  local i
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill -TERM "${pids[$i]}" 2>/dev/null || true; done
  for ((i = 0; i < 50; i++)); do
    local alive=0 pid
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ "$status" != 0 ] && [ -d "$work/logs" ]; then
    echo "bench: failed (exit $status); last log lines:" >&2
    tail -n 5 "$work"/logs/*.log >&2 2>/dev/null || true
  fi
  rm -rf "$work"
  exit "$status"
}
trap bench_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Where figures are kept after the run (the temp dir is removed).
bench_out() {
  local name=$1
  out="${BENCH_OUT:-$root/target/bench}/$name-$(date +%Y%m%d-%H%M%S)"
  mkdir -p "$out"
}

# BENCH_NO_BUILD=1 uses the binaries already in target/release.
bench_build() {
  . "$root/scripts/setup.sh"
  # setup.sh uses `bin` and `root` for itself.
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  # BENCH_BIN=<dir> runs other binaries (e.g. an older build, to compare).
  bin="${BENCH_BIN:-$root/target/release}"
# The pipeline benches measure with the feature router (a microsecond a
# decision), as their README figures were taken, whether or not the
# embedding model is on disk; BENCH_ROUTING_KIND=learned measures the
# default router instead (one embedding per new prompt).
export OPTIROUTE__ROUTER__ROUTING__KIND="${BENCH_ROUTING_KIND:-features}"
  if [ "${BENCH_NO_BUILD:-0}" = 1 ] || [ -n "${BENCH_BIN:-}" ]; then
    echo "bench: using the binaries in $bin (no build)" >&2
  else
    # Only the packages the benches run (the workspace has heavier ones).
    echo "bench: building release binaries (cargo build --release --bins -p ...)" >&2
    cargo build --release --bins --quiet \
      -p optiroute-cli -p optiroute-ingress -p optiroute-router -p optiroute-providers
  fi
  local b
  for b in optiroute optiroute-ingress optiroute-router optiroute-local optiroute-cloud; do
    [ -x "$bin/$b" ] || { echo "bench: $bin/$b is missing" >&2; return 1; }
  done
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

wait_port() {
  local port=$1 what=$2 i
  for ((i = 0; i < 100; i++)); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "bench: $what did not open port $port" >&2
  return 1
}

# spawn NAME CMD...: runs CMD in the background, logs in $work/logs/NAME.log.
# BENCH_CPUS=LIST (taskset's list, e.g. 0) runs everything on those CPUs.
spawn() {
  local name=$1
  shift
  # taskset execs the command, so $! stays the command's pid.
  if [ -n "${BENCH_CPUS:-}" ]; then
    taskset -c "$BENCH_CPUS" "$@" >"$work/logs/$name.log" 2>&1 &
  else
    "$@" >"$work/logs/$name.log" 2>&1 &
  fi
  pids+=($!)
  names+=("$name")
}

# pinned CMD...: CMD, on BENCH_CPUS when that is set.
pinned() {
  if [ -n "${BENCH_CPUS:-}" ]; then taskset -c "$BENCH_CPUS" "$@"; else "$@"; fi
}

# The pid of a process started with spawn.
pid_of() {
  local i
  for ((i = 0; i < ${#names[@]}; i++)); do
    [ "${names[$i]}" = "$1" ] && { echo "${pids[$i]}"; return 0; }
  done
  return 1
}

start_nats() {
  nats_port=$(free_port)
  mkdir -p "$work/nats-store"
  cat >"$work/nats.conf" <<EOF
listen: 127.0.0.1:$nats_port
max_payload: 1MB
jetstream {
  max_memory_store: 256MB
  max_file_store: 2GB
}
EOF
  spawn nats "$NATS_SERVER_BIN" -c "$work/nats.conf" --store_dir "$work/nats-store"
  wait_port "$nats_port" nats-server
}

# start_fake_upstream DELAY_MS
start_fake_upstream() {
  upstream_port=$(free_port)
  spawn fake-upstream "$bin/optiroute" fake-upstream --listen "127.0.0.1:$upstream_port" --delay-ms "${1:-0}"
  wait_port "$upstream_port" fake-upstream
}

# write_config EXTRA_TOML: the stack's config with free ports, the cloud pool
# pointed at the fake upstream, and EXTRA_TOML appended (whole sections).
write_config() {
  http_port=$(free_port)
  router_admin=$(free_port)
  local_admin=$(free_port)
  cloud_admin=$(free_port)
  config="$work/optiroute.toml"
  cat >"$config" <<EOF
[nats]
url = "nats://127.0.0.1:$nats_port"
max_reconnect_delay_ms = 200
[ingress]
listen = "127.0.0.1:$http_port"
admin_listen = "127.0.0.1:0"
drain_timeout_ms = 2000
[router]
admin_listen = "127.0.0.1:$router_admin"
drain_timeout_ms = 2000
[cache]
# Within the bench nats-server's 2 GB file store.
max_bytes = 536870912
[cloud]
admin_listen = "127.0.0.1:$cloud_admin"
drain_timeout_ms = 2000
[cloud.upstream]
base_url = "http://127.0.0.1:$upstream_port/v1"
model = "fake"
api_key = "bench"
EOF
  printf '%s\n' "${1:-}" >>"$config"
  # [local] last, so EXTRA_TOML may add [local.simulated].
  cat >>"$config" <<EOF
[local]
admin_listen = "127.0.0.1:$local_admin"
engine = "simulated"
drain_timeout_ms = 2000
EOF
}

# start_side NAME EXTRA_TOML ENV...: one more whole stack (local, cloud,
# router, ingress) beside others on the same nats-server, with its own
# config and ports (`<NAME>_port`, `<NAME>_router_admin`), each process
# run with ENV (e.g. another OPTIROUTE__NATS__PREFIX); waits until ready.
start_side() {
  local side=$1 extra=$2 p i
  shift 2
  write_config "$extra"
  mv "$config" "$work/$side.toml"
  eval "${side}_port=$http_port"
  eval "${side}_router_admin=$router_admin"
  for p in optiroute-local optiroute-cloud optiroute-router optiroute-ingress; do
    spawn "$side-$p" env -u HF_API_TOKEN -u OPTIROUTE_CLOUD_API_KEY "$@" "$bin/$p" --config "$work/$side.toml"
  done
  for ((i = 0; i < 150; i++)); do
    curl -sf --max-time 1 "http://127.0.0.1:$http_port/ready" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "bench: the $side stack is not ready" >&2
  return 1
}

# Sends one request until it answers 200 (the pools subscribe shortly after
# their /ready turns green); prints the answer.
probe() {
  local body=$1 i answer
  for ((i = 0; i < 100; i++)); do
    if answer=$(curl -sf --max-time 5 "http://127.0.0.1:$http_port/generate" -H 'content-type: application/json' -d "$body"); then
      echo "$answer"
      return 0
    fi
    sleep 0.1
  done
  echo "bench: the stack never answered $body" >&2
  return 1
}

start_stack() {
  local p
  for p in optiroute-local optiroute-cloud optiroute-router optiroute-ingress; do
    spawn "$p" env -u HF_API_TOKEN -u OPTIROUTE_CLOUD_API_KEY "$bin/$p" --config "$config"
  done
  local i
  for ((i = 0; i < 150; i++)); do
    curl -sf --max-time 1 "http://127.0.0.1:$http_port/ready" >/dev/null 2>&1 && break
    sleep 0.2
  done
  for p in "$local_admin" "$cloud_admin" "$router_admin"; do
    for ((i = 0; i < 100; i++)); do
      curl -sf --max-time 1 "http://127.0.0.1:$p/ready" >/dev/null 2>&1 && break
      sleep 0.1
    done
  done
  # Both pools answer (cache off so the probes leave nothing behind).
  probe '{"prompt":"probe","provider":"local","cache":"off","max_tokens":1}' >/dev/null
  probe '{"prompt":"probe","provider":"cloud","cache":"off","max_tokens":1}' | grep -q '"provider":"cloud"' || {
    echo "bench: the cloud pool does not answer from the fake upstream" >&2
    return 1
  }
}

# CPU time (clock ticks) used so far by a pid.
cpu_ticks() {
  awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0
}

# json FILE EXPR: a value from a loadtest --json summary (python3 expression on `r`).
json() {
  python3 -c 'import json, sys; r = json.load(open(sys.argv[1])); v = eval(sys.argv[2]); print(v if v is not None else "n/a")' "$1" "$2"
}

machine() {
  echo "machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')), load generator, stack and NATS on the same host"
}
