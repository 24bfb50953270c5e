#!/usr/bin/env bash
# What a newcomer waits for, measured from a fresh clone with empty caches:
#   1. `./scripts/up.sh` until the first answer to POST /generate
#   2. then `./scripts/test.sh` until it passes
# The clone goes to a temp dir; cargo, pip and npm get empty caches of their
# own (crates are downloaded as on a new machine). Debian packages the tests
# install (Chromium) are not removed first: say so when quoting the figures.
#
#   bench/first-run.sh            # clones this repository's HEAD
#   KEEP=1 bench/first-run.sh     # keep the temp dir (its logs) afterwards
set -euo pipefail
src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$(mktemp -d /tmp/optiroute-first-run.XXXXXX)"
cleanup() {
  [ -n "${up_pid:-}" ] && kill -INT "$up_pid" 2>/dev/null && wait "$up_pid" 2>/dev/null || true
  [ "${KEEP:-0}" = 1 ] || rm -rf "$work"
}
trap cleanup EXIT
for port in 4222 8000; do
  if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
    echo "first-run: 127.0.0.1:$port is in use; stop the stack first" >&2; exit 1
  fi
done
git clone -q "$src" "$work/repo"
export CARGO_HOME="$work/cargo" PIP_CACHE_DIR="$work/pip" npm_config_cache="$work/npm"
# The toolchain stays the machine's (rustup's proxies find it through RUSTUP_HOME).
export RUSTUP_HOME="${RUSTUP_HOME:-$HOME/.rustup}"
export PATH="$(dirname "$(command -v cargo)"):$PATH"
cd "$work/repo"
echo "first-run: $(git log --oneline -1) in $work (nproc $(nproc))"

t0=$SECONDS
./scripts/up.sh >"$work/up.log" 2>&1 &
up_pid=$!
answer=""
while kill -0 "$up_pid" 2>/dev/null; do
  if answer="$(curl -sf --max-time 30 localhost:8000/generate -H 'content-type: application/json' \
      -d '{"prompt":"Hello"}' 2>/dev/null)"; then break; fi
  answer=""
  sleep 1
done
t_up=$(( SECONDS - t0 ))
[ -n "$answer" ] || { echo "first-run: up.sh exited without answering; log:" >&2; tail -30 "$work/up.log" >&2; exit 1; }
echo "first-run: up.sh answered after ${t_up}s: ${answer:0:120}..."
grep '^build: done' "$work/up.log" || true
kill -INT "$up_pid"; wait "$up_pid" 2>/dev/null || true; up_pid=""

t1=$SECONDS
if ./scripts/test.sh >"$work/test.log" 2>&1; then result=passed; else result=FAILED; fi
t_test=$(( SECONDS - t1 ))
passed=$(grep -o '[0-9]* passed' "$work/test.log" | awk '{s+=$1} END {print s+0}')
failed=$(grep -o '[0-9]* failed' "$work/test.log" | awk '{s+=$1} END {print s+0}')
echo "first-run: test.sh $result after ${t_test}s ($passed passed, $failed failed)"
printf '\n| step | seconds |\n| --- | --- |\n| up.sh to the first answer | %d |\n| then test.sh | %d |\n' "$t_up" "$t_test"
[ "$result" = passed ] || { tail -40 "$work/test.log" >&2; exit 1; }
