#!/usr/bin/env bash
# Atomic reference-count operations (retains and releases of heap objects) and heap allocations per claim of release quotad builds, counted exactly with
# uprobes (perf probe on swift_retain, swift_release, their bridgeObject and _n forms, and libc's malloc), per
# thread: the event loops (NIO-ELT-*) and the rest (the journal writer, Kafka's threads). Issue 13: a claim's
# retain/release pairs were ~1/6 of its CPU in a profile, and CPU time on this VM moves ±30 % between runs of
# one build, so this count (deterministic to ~1 %) is how a change to them is measured. Each build serves
# N claims after a warm-up (redis-benchmark -c 50 -P 16); a probe hit costs ~1 µs, so N is small.
#   BINS="/tmp/base /tmp/new" MODE=shipped scripts/rcount.sh
# MODE=none | journal | shipped, as in scripts/icount.sh. Needs root (uprobes) and release builds.
# WHERE=1: instead of counting, record each counted operation's call stack (perf record -g, N=3000 is plenty) and print,
# per thread kind and probe, the callers that make them: the first frame that is not runtime glue
# (outlined copies, value witnesses, destroy functions), demangled, with operations per claim.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/kafka-env.sh
source scripts/lib.sh
MODE=${MODE:-shipped}; N=${N:-20000}
qd_init quotad-rcount
qd_start_redis
[ "$MODE" = shipped ] && qd_start_tansu
.build/release/quotactl voucher create bench --limit 1000000000000 --redis "unix://$T/redis.sock" >/dev/null
libc=$(ldd .build/release/quotad | awk '/libc\.so/ {print $3}')
# (swift_bridgeObjectRetain/Release, a string's or an array's, call swift_retain/release with the object: counted
# there. Only an object in a thread's heap arena (0x7f…) is an atomic write: tagged values (small strings) and
# the static empty array return at once, and are left out by the filter.)
fns="swift_retain swift_release swift_retain_n swift_release_n swift_unownedRetainStrong swift_unownedRetain swift_unownedRelease"
heap='obj >= 0x7f0000000000 && obj < 0x800000000000'

i=0
for bin in ${BINS:-.build/release}; do
  i=$((i + 1))
  perf probe -q -d 'probe_quotad*:*' 2>/dev/null || true
  perf probe -q -d 'probe_libc:*' 2>/dev/null || true
  cp "$bin/quotad" "$T/quotad.$i"
  ev=""
  ev=()
  for f in $fns; do perf probe -q -x "$T/quotad.$i" --add "$f obj=%di:u64" && ev+=(-e "probe_quotad:$f" --filter "$heap"); done
  perf probe -q -x "$libc" --add malloc
  ev+=(-e probe_libc:malloc)
  j=""; [ "$MODE" != none ] && j="journal: { dir: $T/journal-$i }"
  k=""; [ "$MODE" = shipped ] && k="kafka: { brokers: \"127.0.0.1:$KPORT\", topic: rcount.$i }"
  qd_sidecar_yaml "q$i" "$( [ "$MODE" = none ] && echo none || echo journal )" "$j" "$k"
  "$T/quotad.$i" --config "$T/q$i.yaml" 2>>"$T/q$i.log" &
  qpid=$!; pids+=($qpid)
  qd_wait_sock "$T/q$i.sock"
  redis-benchmark -s "$T/q$i.sock" -n 20000 -c 50 -P 16 -q CLAIM bench user >/dev/null 2>&1
  if [ -n "${WHERE:-}" ]; then
    perf record -q -g "${ev[@]}" -p $qpid -o "$T/where.$i" >/dev/null 2>&1 &
  else
    perf stat --per-thread -x, "${ev[@]}" -p $qpid -o "$T/stat.$i" &
  fi
  spid=$!
  sleep 1
  redis-benchmark -s "$T/q$i.sock" -n "$N" -c 50 -P 16 -q CLAIM bench user >/dev/null 2>&1
  sleep 1
  kill -INT $spid; wait $spid 2>/dev/null || true
  if [ -n "${WHERE:-}" ]; then
    # (KEEP=/tmp/w: the recording is kept as /tmp/w.1, .2…, for `perf script -i` by hand.)
    if [ -n "${KEEP:-}" ]; then cp "$T/where.$i" "$KEEP.$i"; fi
    echo "== $bin: operations per claim by caller (thread kind, probe, first non-glue frame)"
    perf script -i "$T/where.$i" -F comm,event,ip,sym 2>/dev/null | awk -v n="$N" '
      # A sample: a header line (comm, event), then one frame per line, then a blank line.
      /^[^ \t]/ { comm = $1; ev = ""; for (k = 2; k <= NF; k++) if ($k ~ /probe_/) ev = $k; sub(/:$/, "", ev); sub(/.*:/, "", ev)
                  kind = (comm ~ /^NIO-ELT/) ? "loops" : "other"; want = 1; next }
      /^[ \t]+[0-9a-f]+ / && want {
        sym = $2
        if (sym ~ /^(swift_|_swift_|_ZN5swift|swift::|malloc|\$s.*(WOc|WOe|WOh|WOy|WOs|WOb|Wxx|Wcp|wxx|wcp|WOi|WOr|Tm|fD|fd)$|\$ss23_ContiguousArrayStorage|\$ss12_ArrayBuffer|\$sSa|tuple_|destroy|outlined|\[unknown\])/) next
        c[kind " " ev " " sym]++; want = 0 }
      END { for (k in c) printf "%8.2f %s\n", c[k] / n, k }' | sort -rn | head -${TOP:-40} |
      swift-demangle --simplified | cut -c1-${WIDTH:-220}
    kill $qpid 2>/dev/null || true
    wait $qpid 2>/dev/null || true
    continue
  fi
  # Per thread kind: event loops, and everything else; refcount ops (all probes but malloc) and mallocs.
  awk -F, -v n="$N" -v bin="$bin" '
    /probe_/ {
      split($1, a, "-"); loop = ($1 ~ /^NIO-ELT/) ? "loops" : "other"
      if ($4 ~ /malloc/) m[loop] += $2; else r[loop] += $2
    }
    END {
      printf "%s: heap retains+releases per claim %.1f (event loops %.1f, other threads %.1f); mallocs per claim %.2f (loops %.2f, other %.2f)\n",
        bin, (r["loops"] + r["other"]) / n, r["loops"] / n, r["other"] / n, (m["loops"] + m["other"]) / n, m["loops"] / n, m["other"] / n
    }' "$T/stat.$i"
  kill $qpid 2>/dev/null || true
  wait $qpid 2>/dev/null || true
  perf probe -q -d 'probe_quotad*:*' 2>/dev/null || true
  perf probe -q -d 'probe_libc:*' 2>/dev/null || true
done
