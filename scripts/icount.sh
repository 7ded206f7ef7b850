#!/usr/bin/env bash
# Instructions per claim of release quotad builds, counted by valgrind (callgrind), for changes too small
# for CPU time on a shared VM to see (±3 % between runs; this machine has no hardware counters). Each build
# runs under callgrind against its own durable Redis; after a warm-up its counters are zeroed, N claims are
# sent (redis-benchmark -c 50 -P 16), and the user-space instructions of those N claims are read from the
# dump. The kernel's share (syscalls) is not counted. Deterministic to ~0.5 % for one build.
#   BINS="/tmp/base /tmp/new" MODE=none scripts/icount.sh
#   KEEP=/tmp/ic BINS=... scripts/icount.sh; callgrind_annotate /tmp/ic/cg.1.out* | head -40   # where they go
# A build's directory may hold a file `preload` naming a library to LD_PRELOAD (another malloc, say).
# MODE=none (no journal.dir) | journal (a journal, no Kafka) | shipped (journal, shipped to a private Tansu:
# bench-core.sh's `journal` row). Needs valgrind and release builds.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/kafka-env.sh
source scripts/lib.sh
MODE=${MODE:-none}; N=${N:-100000}
qd_init quotad-icount
qd_start_redis
[ "$MODE" = shipped ] && qd_start_tansu
.build/release/quotactl voucher create bench --limit 1000000000000 --redis "unix://$T/redis.sock" >/dev/null
i=0
for bin in ${BINS:-.build/release}; do
  i=$((i + 1))
  j=""; [ "$MODE" != none ] && j="journal: { dir: $T/journal-$i }"
  k=""; [ "$MODE" = shipped ] && k="kafka: { brokers: \"127.0.0.1:$KPORT\", topic: icount.$i }"
  qd_sidecar_yaml "q$i" "$( [ "$MODE" = none ] && echo none || echo journal )" "$j" "$k"
  # valgrind 3.19 cannot read the DWARF 5 of Swift 6's debug info: it runs a copy without it (symbols stay).
  strip --strip-debug -o "$T/quotad.$i" "$bin/quotad"
  pre=""; [ -f "$bin/preload" ] && pre=$(cat "$bin/preload")
  env ${pre:+LD_PRELOAD=$pre} valgrind --tool=callgrind --callgrind-out-file="$T/cg.$i.out" --dump-instr=no --compress-strings=no \
    "$T/quotad.$i" --config "$T/q$i.yaml" 2>>"$T/q$i.log" &
  vpid=$!; pids+=($vpid)
  for _ in $(seq 600); do [ -S "$T/q$i.sock" ] && break; sleep 0.1; done
  redis-benchmark -s "$T/q$i.sock" -n 20000 -c 50 -P 16 -q CLAIM bench user >/dev/null 2>&1
  callgrind_control -z $vpid >/dev/null
  redis-benchmark -s "$T/q$i.sock" -n "$N" -c 50 -P 16 -q CLAIM bench user >/dev/null 2>&1
  callgrind_control -d $vpid >/dev/null
  sleep 1
  f=$(ls -t "$T"/cg.$i.out* | head -1)
  ir=$(awk '/^summary:/ {print $2}' "$f")
  echo "$bin: $(echo "$ir / $N" | bc) instructions per claim ($ir for $N claims; $f)"
  kill $vpid 2>/dev/null || true
  wait $vpid 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP"; cp "$f" "$KEEP/"; fi
done
