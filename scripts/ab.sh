#!/usr/bin/env bash
# A/B of two release builds side by side: quotad CPU µs per claim (user + system from /proc) and
# claims/s under redis-benchmark, ROUNDS interleaved rounds of N claims, medians. One change at a time.
# Rounds alternate which side runs first (ABBA). MODE=none|journal|peruser (as scripts/prof.sh), NOJ=1: no journal.dir for both; NOKAFKA=1: journal mode without shipping.
# EXTRA_A / EXTRA_B: a YAML line for one side only (one build, two configs: BIN_A=BIN_B, EXTRA_B="event_loops: 1").
#   git worktree add /tmp/base HEAD~1 && (cd /tmp/base && swift build -c release)
#   BIN_A=/tmp/base/.build/release BIN_B=.build/release MODE=none NOJ=1 scripts/ab.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/kafka-env.sh
source scripts/lib.sh
MODE=${MODE:-none}; ROUNDS=${ROUNDS:-5}; N=${N:-500000}
qd_init quotad-ab
qd_start_redis
rpid=${pids[-1]}
qd_start_tansu
.build/release/quotactl voucher create bench --limit 1000000000000 --redis "unix://$T/redis.sock" >/dev/null
.build/release/quotactl voucher create benchu --limit 1000000000000 --per-user 1000000000 --redis "unix://$T/redis.sock" >/dev/null
dm=$MODE; [ "$MODE" = peruser ] && dm=none
declare -A P
for x in A B; do
  bin=BIN_$x; bin=${!bin}
  kafka="kafka: { brokers: \"127.0.0.1:$KPORT\", topic: ab.$x }"; [ "$dm" = none ] && kafka=""; [ -n "${NOKAFKA:-}" ] && kafka=""
  extra=EXTRA_$x
  qd_sidecar_yaml "$x" "$dm" "$( [ -n "${NOJ:-}" ] || echo "journal: { dir: $T/journal-$x }")" "$kafka" "${!extra:-}"
  "$bin/quotad" --config "$T/$x.yaml" 2>>"$T/q$x.log" &
  P[$x]=$!; pids+=($!)
  qd_wait_sock "$T/$x.sock"
done
args="CLAIM bench user"; [ "$MODE" = peruser ] && args="CLAIM benchu u:__rand_int__"
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
for x in A B; do redis-benchmark -s $T/$x.sock -n 200000 -c 50 -P 16 -r 1000000000 -q $args >/dev/null 2>&1; done
for r in $(seq $ROUNDS); do
  # The side run first in a round was ahead whatever the build (both orders showed it): alternate it.
  order="A B"; [ $((r % 2)) = 0 ] && order="B A"
  for x in $order; do
    t0=$(ticks ${P[$x]}); r0=$(ticks $rpid)
    rps=$(redis-benchmark -s $T/$x.sock -n $N -c 50 -P 16 -r 1000000000 -q $args 2>/dev/null | tr '\r' '\n' | grep -oE '[0-9.]+ requests per second' | tail -1 | cut -d' ' -f1)
    t1=$(ticks ${P[$x]}); r1=$(ticks $rpid)
    # columns: build, claims/s, quotad CPU µs per claim, Redis CPU µs per claim (per-user checks run there)
    echo "$x $rps $(echo "($t1 - $t0) * 1000000 / $hz / $N" | bc -l) $(echo "($r1 - $r0) * 1000000 / $hz / $N" | bc -l)" | tee -a $T/ab.txt
  done
done
med() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for x in A B; do
  echo "$x median: quotad cpu $(grep "^$x " $T/ab.txt | awk '{print $3}' | med) us/claim, redis cpu $(grep "^$x " $T/ab.txt | awk '{print $4}' | med) us/claim, $(grep "^$x " $T/ab.txt | awk '{print $2}' | med) claims/s"
done
