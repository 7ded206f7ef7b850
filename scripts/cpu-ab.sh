#!/usr/bin/env bash
# CPU a claim of release quotad builds side by side, rounds alternating between builds (issue 13): each round
# starts a fresh Redis, Tansu (shipped mode) and sidecar, warms up, sends N claims (redis-benchmark -c 50 -P 16),
# and reads the sidecar's and Tansu's CPU (user + system, /proc/PID/stat), its claims/s, journal syncs and RSS.
# Quicker than bench-core.sh for an A/B of one mode; the machine's noise still needs several rounds.
#   BINS="/tmp/base /tmp/new" ROUNDS=4 MODE=journal scripts/cpu-ab.sh
# MODE=journal (ships to Tansu: bench-core.sh's `journal` row) | none (no journal). A build's directory may hold
# a file `preload` naming a library to LD_PRELOAD (another malloc, say). ENV="K=V ..." is passed to quotad.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/kafka-env.sh
source scripts/lib.sh
MODE=${MODE:-journal}; N=${N:-1500000}; ROUNDS=${ROUNDS:-3}
tck=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
declare -A sum
round() {  # $1: the build's directory
  local bin=$1
  qd_init quotad-cpuab
  qd_start_redis
  local kafka="" journal=""
  if [ "$MODE" = journal ]; then
    qd_start_tansu
    kafka="kafka: { brokers: \"127.0.0.1:$KPORT\", topic: cpuab }"
    journal="journal: { dir: $T/journal }"
  fi
  .build/release/quotactl voucher create bench --limit 1000000000000 --redis "unix://$T/redis.sock" >/dev/null
  qd_sidecar_yaml q "$MODE" "$journal" "$kafka"
  local pre=""; [ -f "$bin/preload" ] && pre=$(cat "$bin/preload")
  env ${pre:+LD_PRELOAD=$pre} ${ENV:-} "$bin/quotad" --config "$T/q.yaml" 2>>"$T/q.log" &
  local qpid=$!
  pids+=($qpid)
  qd_wait_sock "$T/q.sock"
  local tpid=""; [ "$MODE" = journal ] && tpid=$(pgrep -n -f "tcp://127.0.0.1:$KPORT")
  redis-benchmark -s "$T/q.sock" -n 200000 -c 50 -P 16 -q CLAIM bench user >/dev/null 2>&1
  local q0 t0=0 q1 t1=0 out
  q0=$(cpu $qpid); [ -n "$tpid" ] && t0=$(cpu $tpid)
  out=$(redis-benchmark -s "$T/q.sock" -n "$N" -c 50 -P 16 -q CLAIM bench user 2>/dev/null | tr '\r' '\n' | grep "requests per" | tail -1)
  q1=$(cpu $qpid); [ -n "$tpid" ] && t1=$(cpu $tpid)
  local rate us tus syncs rss
  rate=$(echo "$out" | awk '{print $4}')
  us=$(echo "scale=3; ($q1 - $q0) * 1000000 / $tck / $N" | bc)
  tus=$(echo "scale=3; ($t1 - $t0) * 1000000 / $tck / $N" | bc)
  syncs=$(redis-cli -s "$T/q.sock" INFO 2>/dev/null | tr -d '\r' | awk -F: '/^journal_syncs:/ {print $2}')
  rss=$(awk '/VmRSS/ {print $2}' "/proc/$qpid/status")
  printf '%-28s claims/s %9.0f  quotad %6.3f µs a claim  tansu %6.3f  syncs %6s  RSS %6s kB\n' \
    "$bin" "$rate" "$us" "$tus" "${syncs:--}" "$rss"
  sum[$bin]=$(echo "${sum[$bin]:-0} + $us" | bc)
  qd_cleanup
  trap - EXIT
}
for r in $(seq "$ROUNDS"); do
  for bin in ${BINS:-.build/release}; do round "$bin"; done
done
for bin in ${BINS:-.build/release}; do
  printf 'mean %-23s quotad %6.3f µs a claim over %d rounds\n' "$bin" "$(echo "scale=3; ${sum[$bin]} / $ROUNDS" | bc)" "$ROUNDS"
done
