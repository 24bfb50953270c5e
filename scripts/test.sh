#!/usr/bin/env bash
# The second README command: runs every test. Installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
echo "test: using $NATS_SERVER_BIN ($("$NATS_SERVER_BIN" --version))"

cargo test --workspace --all-targets "$@"
