#!/usr/bin/env bash
# Release builds on a Redis Cluster, end to end: the tests run debug builds, and a release-only fault
# (a task group's result copy crashed release builds on every multi-node call; Swift 6.3) passed them.
# A 3-master cluster, a voucher with 3 shards, one release quotad selling it out, the books audited.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.build/release}
source scripts/lib.sh
qd_init quotad-smoke
qd_start_cluster 3 0
cat > "$T/q.yaml" <<YAML
host_id: smoke
region: sg
regions:
  sg: { redis: "$CLUSTER" }
socket: { path: $T/q.sock }
durability: journal
journal: { dir: $T/journal }
log_level: warning
YAML
$BIN/quotactl voucher create smoke --limit 3000 --shards 3 --redis "$CLUSTER"
$BIN/quotad --config "$T/q.yaml" > "$T/q.log" 2>&1 &
qpid=$!
pids+=($qpid)
qd_wait_sock "$T/q.sock"
redis-benchmark -s "$T/q.sock" -n 3000 -c 20 -P 8 -q CLAIM smoke user > "$T/bench.log" 2>&1 || { echo "redis-benchmark failed:"; tail -5 "$T/bench.log"; tail -20 "$T/q.log"; exit 1; }
kill -TERM "$qpid"; wait "$qpid" || true
$BIN/quotactl voucher show smoke --redis "$CLUSTER"
$BIN/quotactl audit smoke --journal "$T/journal" --redis "$CLUSTER"
left=$($BIN/quotactl voucher show smoke --json --redis "$CLUSTER" | python3 -c 'import json,sys; j=json.load(sys.stdin)[0]; print(j["pool"], j["leased"]-j["returned"], j["leases_outstanding"])')
echo "pool, sold, open leases: $left"
[ "$left" = "0 3000 0" ] || { echo "release smoke: the voucher did not sell out exactly"; cat "$T/q.log"; exit 1; }
echo "release smoke on a Redis Cluster: sold 3000 of 3000 over 3 shards, books balanced"
