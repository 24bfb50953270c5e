#!/usr/bin/env bash
# The embedded local model on its own (no NATS): tokens/s, first-token
# latency and resident memory (VmRSS / VmHWM) for 1 and 2 generations at
# once, each on one core. Fetches the model file when missing.
#
#   bench/embedded.sh                        # 128 tokens, concurrency 1 and 2, 2 runs each
#   bench/embedded.sh --max-tokens 256 --concurrency 1,2,4 --runs 3 --show
#
# The build is portable (no -C target-cpu): the AVX2+FMA kernels are picked
# at run time when the CPU has them, the portable loops otherwise.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/fetch-model.sh
cargo build --release --quiet -p optiroute-local-model --bin embedded-bench
exec "$root/target/release/embedded-bench" "$@"
