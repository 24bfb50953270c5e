#!/usr/bin/env bash
# A 3-node JetStream cluster (every stream and bucket at 3 replicas):
#   1. what `sync_interval: always` (nats/cluster/) costs against
#      nats-server's default, side by side in turns: a batch end to end and
#      a KV compare-and-set (the shape of a spend or budget update);
#   2. the failover scenario of e2e/tests/failover.rs, run longer: the cache
#      stream's leader SIGKILLed under load, 5 s down, restarted; it prints
#      the requests failed, the longest gap without a success and the time
#      to full throughput.
# Settings: BENCH_LINES=2000 BENCH_UPDATES=2000 BENCH_ROUNDS=2
#           FAILOVER_AFTER_SECS=20 (load after the restart)
# Both run in the test (debug) profile, the build ./scripts/test.sh makes.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
log="$(mktemp -t optiroute-cluster-bench.XXXXXX)"
run() {
  if ! "$@" >"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "cluster: failed: $*" >&2
    exit 1
  fi
}
run cargo test --quiet -p optiroute-e2e --test cluster_bench -- --ignored --nocapture
grep -E '^(cluster|sync_interval|2m|always) ' "$log"
run env FAILOVER_AFTER_SECS="${FAILOVER_AFTER_SECS:-20}" cargo test --quiet -p optiroute-e2e --test failover -- --nocapture
grep -E '^failover:' "$log"
rm -f "$log"
