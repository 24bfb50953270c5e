#!/usr/bin/env bash
# The second README command: runs every test. Installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
echo "test: using $NATS_SERVER_BIN ($("$NATS_SERVER_BIN" --version))"

# The stack's binaries first: the same build `up.sh` makes (a no-op after it),
# which e2e/tests/processes.rs starts as separate processes.
./scripts/build.sh
# The Python clients the e2e tests run (openai, nats-py, msgpack), in .tools/venv.
bash scripts/py-deps.sh
cargo test --workspace --all-targets "$@"
