#!/usr/bin/env bash
# The sentence embedder on its own (all-MiniLM-L6-v2, in-process, one
# thread): p50 and p99 latency of one embedding for a 20-token and a
# 300-token prompt (the model reads the first 256), load time and resident
# memory. Fetches the model when missing.
#
#   bench/embed.sh                 # 100 runs each
#   bench/embed.sh --runs 300
#
# The build is portable (no -C target-cpu): the AVX2+FMA kernel is picked at
# run time when the CPU has it, the portable loop otherwise.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/fetch-embed-model.sh
cargo build --release --quiet -p optiroute-embed --bin embed-bench
exec "$root/target/release/embed-bench" "$@"
