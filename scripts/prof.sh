#!/usr/bin/env bash
# A CPU profile of release quotad under redis-benchmark (-c 50 -P 16), for issue 13's work: where a
# claim's CPU goes. MODE=journal (ships to a private Tansu) | none | peruser (none, a random user per
# claim); NOJ=1: no journal.dir (what `durability: none` alone configures); NOKAFKA=1: journal mode without
# shipping. Needs a release build.
#   MODE=none NOJ=1 scripts/prof.sh
#   MODE=none NOJ=1 ARGS=PING OUT=/tmp/ping scripts/prof.sh    # another command (here quotad's connection path alone)
#   perf report -i /tmp/perf.none.data --no-children -g none --sort comm    # per thread
#   perf report -i /tmp/perf.none.data --children -g none --sort symbol     # per function, callees included
#   PERFARGS="-F 299 --call-graph dwarf,16384" MODE=none NOJ=1 scripts/prof.sh   # stacks through libc (malloc)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/kafka-env.sh
source scripts/lib.sh
MODE=${MODE:-journal}
qd_init quotad-prof
qd_start_redis
qd_start_tansu
BIN=.build/release
$BIN/quotactl voucher create bench --limit 1000000000000 --redis "unix://$T/redis.sock" >/dev/null
$BIN/quotactl voucher create benchu --limit 1000000000000 --per-user 1000000000 --redis "unix://$T/redis.sock" >/dev/null
dm=$MODE; [ "$MODE" = peruser ] && dm=none
kafka="kafka: { brokers: \"127.0.0.1:$KPORT\", topic: bench.prof }"
[ "$dm" = none ] && kafka=""; [ -n "${NOKAFKA:-}" ] && kafka=""
qd_sidecar_yaml q "$dm" "$( [ -n "${NOJ:-}" ] || echo "journal: { dir: $T/journal }")" "$kafka" "${EXTRA:-}"
$BIN/quotad --config "$T/q.yaml" 2>>"$T/q.log" &
qpid=$!
pids+=($qpid)
qd_wait_sock "$T/q.sock"
args="CLAIM bench user"; [ "$MODE" = peruser ] && args="CLAIM benchu u:__rand_int__"
args=${ARGS:-$args}
redis-benchmark -s $T/q.sock -n 200000 -c 50 -P 16 -r 1000000000 -q $args >/dev/null 2>&1
perf record ${PERFARGS:--F 999 -g} -p $qpid -o ${OUT:-/tmp}/perf.$MODE.data -- sleep 8 >/dev/null 2>&1 &
ppid=$!
redis-benchmark -s $T/q.sock -n ${N:-600000} -c 50 -P 16 -r 1000000000 -q $args 2>/dev/null | tr '\r' '\n' | tail -2
wait $ppid || true
