#!/usr/bin/env bash
# Builds the stack's binaries and shows progress while it runs, so a first
# build (a few minutes on 2 cores) never looks like a hang:
#   build: 142/291 crates (48%), 1m10s so far, about 1m15s left; now tokio
#
#   scripts/build.sh [--release] [--tests]
#     (default)  the stack's five binaries, dev profile (what up.sh runs and
#                what the tests reuse: one build serves both)
#     --release  the same binaries, optimised (benchmarks, production)
#     --tests    every binary and test target of the workspace (test.sh)
#
# Every variant resolves features for the whole workspace (`--workspace`), so
# the stack's build and the test build share every compiled crate.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

profile_args=()
targets=(--bin optiroute-ingress --bin optiroute-router --bin optiroute-local
  --bin optiroute-cloud --bin optiroute-batch)
for a in "$@"; do
  case "$a" in
    --release) profile_args=(--release) ;;
    --tests) targets=(--all-targets) ;;
    *) echo "build: unknown option $a" >&2; exit 2 ;;
  esac
done

args=(build --workspace "${profile_args[@]}" "${targets[@]}")
# Roughly how many crates the build compiles: every package in the graph
# (normal and build dependencies), plus a unit per build script.
total="$(cargo tree --workspace -e normal,build --prefix none --format '{p}' 2>/dev/null |
  sed 's/ (\*)$//' | sort -u | wc -l)"
total=$(( total + total / 5 ))

start=$SECONDS
done_n=0
last=0
fmt() { printf '%dm%02ds' $(( $1 / 60 )) $(( $1 % 60 )); }
status=0
# JSON messages on stdout (one per compiled unit), human diagnostics on stderr.
while IFS= read -r line; do
  case "$line" in
    BUILD_FAILED) status=1 ;;
    *'"reason":"compiler-artifact"'*|*'"reason":"build-script-executed"'*)
      done_n=$(( done_n + 1 ))
      if [[ "$line" == *'"fresh":true'* ]]; then continue; fi
      now=$SECONDS
      if (( now - last >= 5 )); then
        last=$now
        name="${line#*\"package_id\":\"}"; name="${name%%\"*}"
        # package_id is a URL like registry+https://...#tokio@1.54.1 or path+file:///...#name@0.1.0
        name="${name##*#}"; name="${name%@*}"; name="${name##*/}"
        n=$done_n; (( n > total )) && total=$(( n + 10 ))
        el=$(( now - start ))
        pct=$(( 100 * n / total ))
        left=""
        if (( pct >= 5 )); then left=", about $(fmt $(( el * (total - n) / n ))) left"; fi
        echo "build: $n/$total crates ($pct%), $(fmt $el) so far$left; now $name" >&2
      fi
      ;;
  esac
done < <(cargo "${args[@]}" --message-format=json-render-diagnostics --quiet || echo "BUILD_FAILED")
# (A process substitution's exit code is lost, hence the BUILD_FAILED line;
# cargo prints the errors itself, on stderr.)
if (( status != 0 )); then echo "build: failed (cargo ${args[*]})" >&2; exit 1; fi
echo "build: done in $(fmt $(( SECONDS - start )))" >&2
