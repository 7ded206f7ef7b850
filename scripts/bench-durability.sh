#!/usr/bin/env bash
# Issue-3 figures in one run (release build): claims/s and latency for durability none, journal
# and kafka, at 1 connection unpipelined and 50 connections pipelined (16), and claims per fsync.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/kafka-env.sh
BIN=${BIN:-.build/release}
SECS=${SECS:-8}
source scripts/lib.sh
qd_init quotad-bench
qd_start_redis
qd_start_tansu
$BIN/quotactl voucher create bench --limit 1000000000 --redis "unix://$T/redis.sock" >/dev/null

echo "| durability | clients | claims/s | latency p50 | latency p99 | claims per fsync |"
echo "|---|---|---:|---:|---:|---:|"
for mode in none journal kafka; do
  for shape in "1 1" "50 16"; do
    set -- $shape
    conns=$1; pipe=$2
    qd_sidecar_yaml q "$mode" "journal: { dir: $T/journal-$mode-$conns }" "kafka: { brokers: \"127.0.0.1:$KPORT\", topic: bench.$mode }"
    $BIN/quotad --config "$T/q.yaml" 2>>"$T/quotad.log" &
    qpid=$!
    qd_wait_sock "$T/q.sock"
    # warm-up (leases, Kafka producer id), then the measured run
    $BIN/quota-bench flash --socket "$T/q.sock" --voucher bench --connections "$conns" --pipeline "$pipe" --duration 1 >/dev/null
    out=$($BIN/quota-bench flash --socket "$T/q.sock" --voucher bench --connections "$conns" --pipeline "$pipe" \
          --duration "$SECS" --json)
    info=$(redis-cli -s "$T/q.sock" info stats | tr -d '\r')
    syncs=$(echo "$info" | grep '^journal_syncs:' | cut -d: -f2)
    recs=$(echo "$info" | grep '^journal_records_synced:' | cut -d: -f2)
    kill -TERM $qpid; wait $qpid || true
    python3 - "$mode" "$conns" "$pipe" "$out" "$syncs" "$recs" <<'PY'
import json, sys
mode, conns, pipe, out, syncs, recs = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
per_sync = f"{recs / syncs:.1f}" if syncs else "-"
shape = "1, unpipelined" if pipe == "1" else f"{conns}, pipeline {pipe}"
lat = "claim" if pipe == "1" else "batch of 16"
print(f"| {mode} | {shape} | {int(out['claims_per_second']):,} | {int(out['latency_p50_us'])} µs | {int(out['latency_p99_us'])} µs | {per_sync} |")
PY
  done
done
echo
echo "latency: per claim at 1 connection; per pipelined batch of 16 at 50 connections (each claim in it waits as long)."
echo "$(nproc) cores, $(date -u +%Y-%m-%d), ${SECS}s per row, release build, redis-server + Tansu + quotad + load on the same machine"
