#!/usr/bin/env bash
# The claim path's cost in one run (release build), issues 2 and 13: requests/s and the serving
# process's CPU time per request (user + system from /proc/PID/stat) under redis-benchmark, for
# redis-server's own INCR, a claim as one EVALSHA script on one hot key, and quotad's CLAIM in each
# durability mode (journal and kafka ship to a Tansu broker on the same box; none both as configured by
# itself, with no journal, and with a journal.dir), with a per-user limit (none, no journal),
# PING on redis-server and on quotad (each one's connection path without the command's work), and
# (BASE_BIN=dir) an older quotad build side by side. Then one unpipelined connection: p50 of a
# raw Unix-socket round trip (a 20-line C echo server) against quotad's CLAIM and redis's INCR, from
# redis-benchmark (8 µs buckets) and from a small C client timing each round trip. Rounds are interleaved
# and medians reported: the machine is noisy.
#
#   scripts/bench-core.sh                          # N=1000000 C=50 P=16 ROUNDS=3
#   BASE_BIN=/tmp/old/.build/release scripts/bench-core.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/kafka-env.sh
N=${N:-1000000}
C=${C:-50}
P=${P:-16}
ROUNDS=${ROUNDS:-3}
BIN=${BIN:-.build/release}
BASE_BIN=${BASE_BIN:-}
source scripts/lib.sh
qd_init quotad-bench
qd_start_redis
qd_start_tansu
# The baselines run on their own redis-server without AOF (their best case: no fsync per write);
# quotad's Redis is durable as it requires (AOF, fsync always), but quotad calls it ~0.001 times per claim.
redis-server --port 0 --unixsocket "$T/redis-base.sock" --save "" --appendonly no --dir "$T" --logfile "$T/redis-base.log" &
rpid=$!
pids+=($rpid)
qd_wait_sock "$T/redis-base.sock"
R="redis-cli -s $T/redis-base.sock"

rps() { tr '\r' '\n' | grep -oE '[0-9.]+ requests per second' | tail -1 | cut -d' ' -f1; }
p50() { tr '\r' '\n' | grep -oE 'p50=[0-9.]+' | tail -1 | cut -d= -f2; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

$R set bench:stock 1000000000000 >/dev/null
sha=$($R script load "local s = tonumber(redis.call('GET', KEYS[1])) if s and s > 0 then redis.call('DECR', KEYS[1]) return 1 end return 0")
$BIN/quotactl voucher create bench --limit 1000000000000 --redis "unix://$T/redis.sock" >/dev/null
$BIN/quotactl voucher create benchu --limit 1000000000000 --per-user 1000000000 --redis "unix://$T/redis.sock" >/dev/null

# One quotad per row, all running for the whole benchmark (each its own socket, journal and topic).
declare -A QPID QSOCK
start_quotad() { # name bin durability [nojournal]
  local name=$1 bin=$2 mode=$3 kafka="" journal="journal: { dir: $T/journal-$1 }"
  # `none` without journal.dir is what `durability: none` alone configures: no journal at all.
  [ "${4:-}" = nojournal ] && journal=""
  # durability none: nothing recorded (no Kafka section, so no background shipping either)
  [ "$mode" != none ] && kafka="kafka: { brokers: \"127.0.0.1:$KPORT\", topic: bench.$name }"
  qd_sidecar_yaml "$name" "$mode" "$journal" "$kafka" "${EXTRA_YAML:-}"
  "$bin/quotad" --config "$T/$name.yaml" 2>>"$T/quotad-$name.log" &
  QPID[$name]=$!
  pids+=($!)
  QSOCK[$name]=$T/$name.sock
  qd_wait_sock "$T/$name.sock"
}
rows=(none nonejournal journal kafka peruser)
start_quotad none "$BIN" none nojournal
start_quotad nonejournal "$BIN" none
start_quotad journal "$BIN" journal
start_quotad kafka "$BIN" kafka
start_quotad peruser "$BIN" none nojournal
if [ -n "$BASE_BIN" ]; then
  start_quotad base "$BASE_BIN" none nojournal
  start_quotad basenonejournal "$BASE_BIN" none
  start_quotad basejournal "$BASE_BIN" journal
  start_quotad baseperuser "$BASE_BIN" none nojournal
  rows+=(base basenonejournal basejournal baseperuser)
fi

# A raw Unix-socket round trip: read whatever came, answer +OK (one command per read when unpipelined).
cat > "$T/echo.c" <<'C'
#include <sys/socket.h>
#include <sys/un.h>
#include <string.h>
#include <unistd.h>
int main(int argc, char **argv) {
  int s = socket(AF_UNIX, SOCK_STREAM, 0);
  struct sockaddr_un a = {0};
  a.sun_family = AF_UNIX;
  strncpy(a.sun_path, argv[1], sizeof a.sun_path - 1);
  if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 64)) return 1;
  for (;;) {
    int c = accept(s, 0, 0);
    if (c < 0) continue;
    if (fork() == 0) {
      char buf[65536];
      ssize_t n;
      while ((n = read(c, buf, sizeof buf)) > 0) if (write(c, "+OK\r\n", 5) != 5) break;
      _exit(0);
    }
    close(c);
  }
}
C
cc -O2 -o "$T/echo" "$T/echo.c"
# One unpipelined connection, each round trip timed (clock_gettime) and kept: the exact p50 and mean in µs
# (redis-benchmark's latency histogram has 8 µs buckets at these round trips). rtt SOCKET N ARG...
cat > "$T/rtt.c" <<'C'
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
static int cmp(const void *a, const void *b) { double x = *(const double *)a, y = *(const double *)b; return (x > y) - (x < y); }
/* A whole reply is in buf[0..n): a first line ending in CRLF, and for a bulk string ($len) len bytes + CRLF more. */
static int complete(const char *buf, size_t n) {
  const char *e = memmem(buf, n, "\r\n", 2);
  if (!e) return 0;
  if (buf[0] != '$') return 1;
  long len = atol(buf + 1);
  return len < 0 || (size_t)(e - buf) + 2 + (size_t)len + 2 <= n;
}
int main(int argc, char **argv) {
  if (argc < 4) return 2;
  int n = atoi(argv[2]), s = socket(AF_UNIX, SOCK_STREAM, 0);
  struct sockaddr_un a = {0};
  a.sun_family = AF_UNIX;
  strncpy(a.sun_path, argv[1], sizeof a.sun_path - 1);
  if (connect(s, (struct sockaddr *)&a, sizeof a)) return 1;
  char cmd[1024], buf[4096];
  int len = snprintf(cmd, sizeof cmd, "*%d\r\n", argc - 3);
  for (int i = 3; i < argc; i++) len += snprintf(cmd + len, sizeof cmd - len, "$%zu\r\n%s\r\n", strlen(argv[i]), argv[i]);
  double *t = malloc(sizeof(double) * n), sum = 0;
  for (int i = 0; i < n; i++) {
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    if (write(s, cmd, len) != len) return 1;
    size_t got = 0;
    do {
      ssize_t r = read(s, buf + got, sizeof buf - got);
      if (r <= 0) return 1;
      got += r;
    } while (!complete(buf, got));
    clock_gettime(CLOCK_MONOTONIC, &t1);
    t[i] = (t1.tv_sec - t0.tv_sec) * 1e6 + (t1.tv_nsec - t0.tv_nsec) / 1e3;
    sum += t[i];
  }
  qsort(t, n, sizeof(double), cmp);
  printf("%.2f %.2f\n", t[n / 2], sum / n);
  return 0;
}
C
cc -O2 -o "$T/rtt" "$T/rtt.c"
"$T/echo" "$T/echo.sock" &
pids+=($!)
qd_wait_sock "$T/echo.sock"

# Warm-up: leases sized, Kafka producers connected.
for r in "${rows[@]}"; do
  v=bench; args="CLAIM bench user"
  [[ "$r" = *peruser ]] && args="CLAIM benchu u:__rand_int__"
  redis-benchmark -s "${QSOCK[$r]}" -n 200000 -c "$C" -P "$P" -r 1000000000 -q $args >/dev/null 2>&1
done

# run NAME PID SOCKET ARGS...: appends "rps cpu_us_per_request" to $T/res.NAME
run() {
  local name=$1 pid=$2 sock=$3; shift 3
  local t0 t1 out
  t0=$(ticks "$pid")
  out=$(redis-benchmark -s "$sock" -n "$N" -c "$C" -P "$P" -r 1000000000 -q "$@" 2>/dev/null | rps)
  t1=$(ticks "$pid")
  echo "$out $(echo "($t1 - $t0) * 1000000 / $hz / $N" | bc -l)" >> "$T/res.$name"
}
for round in $(seq "$ROUNDS"); do
  run incr "$rpid" "$T/redis-base.sock" INCR bench:counter
  run evalsha "$rpid" "$T/redis-base.sock" EVALSHA "$sha" 1 bench:stock
  # PING on each server: the connection path alone (read, decode, dispatch, reply, write), no claim.
  run redisping "$rpid" "$T/redis-base.sock" PING
  run ping "${QPID[none]}" "${QSOCK[none]}" PING
  # Each row of this build next to its BASE_BIN row, the two in turn first (odd rounds this build, even rounds
  # the base): with every row after the other, the later one paid for what came before it (the shared Tansu
  # holding more, other sidecars' background work): 1e0c8c7's build against itself measured 0.85× in `journal`.
  order=()
  for r in none nonejournal journal kafka peruser; do
    b=""; case $r in none) b=base ;; nonejournal) b=basenonejournal ;; journal) b=basejournal ;; peruser) b=baseperuser ;; esac
    if [ -z "$BASE_BIN" ] || [ -z "$b" ]; then order+=("$r")
    elif [ $((round % 2)) = 1 ]; then order+=("$r" "$b")
    else order+=("$b" "$r"); fi
  done
  for r in "${order[@]}"; do
    if [[ "$r" = *peruser ]]; then run "$r" "${QPID[$r]}" "${QSOCK[$r]}" CLAIM benchu u:__rand_int__
    else run "$r" "${QPID[$r]}" "${QSOCK[$r]}" CLAIM bench user; fi
  done
done
# Unpipelined, one connection: p50 of each (redis-benchmark reports it in ms, 3 decimals, from a histogram
# whose buckets are 8 µs wide here: 0.023, 0.031, 0.039), and the mean round trip (1 / requests per second
# of the one connection), which is not bucketed.
unpiped() { # name socket command...
  local name=$1 sock=$2 out
  shift 2
  out=$(redis-benchmark -s "$sock" -n 100000 -c 1 -P 1 -q "$@" 2>/dev/null | tr '\r' '\n')
  echo "$out" | p50 >> "$T/p50.$name"
  echo "$out" | rps | awk '{printf "%.1f\n", 1000000 / $1}' >> "$T/rtt.$name"
  "$T/rtt" "$sock" 100000 "$@" >> "$T/exact.$name"
}
for round in $(seq "$ROUNDS"); do
  unpiped echo "$T/echo.sock" PING_INLINE
  unpiped claim "${QSOCK[none]}" CLAIM bench user
  unpiped incr "$T/redis-base.sock" INCR bench:counter
done

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
col() { cut -d' ' -f"$2" "$T/res.$1" | median; }
rss=$(awk '/VmRSS/ {print $2}' "/proc/${QPID[none]}/status")
incr_cpu=$(col incr 2)
none_rps=$(col none 1)

printf "\nredis-benchmark -n %s -c %s -P %s, medians of %s interleaved rounds, %s cores, %s\n\n" "$N" "$C" "$P" "$ROUNDS" "$(nproc)" "$(date -u +%Y-%m-%d)"
printf "| what | requests/s | server CPU µs per request | CPU / redis INCR |\n|---|---:|---:|---:|\n"
row() { # label name
  printf "| %s | %.0f | %.2f | %.1f× |\n" "$1" "$(col "$2" 1)" "$(col "$2" 2)" "$(echo "$(col "$2" 2) / $incr_cpu" | bc -l)"
}
row "redis-server \`INCR\` (no AOF)" incr
row "redis-server \`EVALSHA\` claim script, one hot key (no AOF)" evalsha
row "redis-server \`PING\`" redisping
row "quotad \`PING\` (the \`none\` process: its connection path without a claim)" ping
row "quotad \`CLAIM\`, durability \`none\` (no journal: its default)" none
row "quotad \`CLAIM\`, durability \`none\` with a \`journal.dir\`" nonejournal
row "quotad \`CLAIM\`, durability \`journal\` (ships to Tansu)" journal
row "quotad \`CLAIM\`, durability \`kafka\` (Tansu)" kafka
row "quotad \`CLAIM\`, \`none\`, per-user limit, a random user per claim" peruser
if [ -n "$BASE_BIN" ]; then
  row "quotad \`CLAIM\`, \`none\` (no journal), BASE_BIN ($BASE_BIN)" base
  row "quotad \`CLAIM\`, \`none\` with a \`journal.dir\`, BASE_BIN" basenonejournal
  row "quotad \`CLAIM\`, \`journal\`, BASE_BIN" basejournal
  row "quotad \`CLAIM\`, \`none\`, per-user limit, BASE_BIN" baseperuser
fi
printf "\nper round (requests/s, CPU µs):\n"
for f in incr evalsha redisping ping "${rows[@]}"; do printf "  %-8s %s\n" "$f" "$(tr '\n' ' ' < "$T/res.$f")"; done
printf "\nper-user limit / none, requests/s: %.2f\n" "$(echo "$(col peruser 1) / $none_rps" | bc -l)"
printf "quotad CPU µs per claim over its PING (the claim's own work, \`none\`): %.2f; redis INCR over its PING: %.2f\n" \
  "$(echo "$(col none 2) - $(col ping 2)" | bc -l)" "$(echo "$incr_cpu - $(col redisping 2)" | bc -l)"
printf "journal / EVALSHA, requests/s: %.2f\n" "$(echo "$(col journal 1) / $(col evalsha 1)" | bc -l)"
if [ -n "$BASE_BIN" ]; then
  for m in none:base nonejournal:basenonejournal journal:basejournal peruser:baseperuser; do
    printf "this build / BASE_BIN, %s: CPU per claim %.3f, requests/s %.3f\n" "${m%%:*}" \
      "$(echo "$(col "${m%%:*}" 2) / $(col "${m##*:}" 2)" | bc -l)" "$(echo "$(col "${m%%:*}" 1) / $(col "${m##*:}" 1)" | bc -l)"
  done
fi
e=$(median < "$T/p50.echo"); c=$(median < "$T/p50.claim"); i=$(median < "$T/p50.incr")
printf "one unpipelined connection, p50 ms: raw socket echo %s, redis INCR %s, quotad CLAIM %s (%.2f× the echo)\n" \
  "$e" "$i" "$c" "$(echo "$c / $e" | bc -l)"
e=$(median < "$T/rtt.echo"); c=$(median < "$T/rtt.claim"); i=$(median < "$T/rtt.incr")
printf "one unpipelined connection, mean round trip µs: raw socket echo %s, redis INCR %s, quotad CLAIM %s (%.2f× the echo)\n" \
  "$e" "$i" "$c" "$(echo "$c / $e" | bc -l)"
e=$(cut -d' ' -f1 "$T/exact.echo" | median); c=$(cut -d' ' -f1 "$T/exact.claim" | median); i=$(cut -d' ' -f1 "$T/exact.incr" | median)
printf "one unpipelined connection, p50 µs timed per round trip: raw socket echo %s, redis INCR %s, quotad CLAIM %s (%.2f× the echo)\n" \
  "$e" "$i" "$c" "$(echo "$c / $e" | bc -l)"
e=$(cut -d' ' -f2 "$T/exact.echo" | median); c=$(cut -d' ' -f2 "$T/exact.claim" | median); i=$(cut -d' ' -f2 "$T/exact.incr" | median)
printf "one unpipelined connection, mean µs timed per round trip: raw socket echo %s, redis INCR %s, quotad CLAIM %s (%.2f× the echo)\n" \
  "$e" "$i" "$c" "$(echo "$c / $e" | bc -l)"
leases=$(redis-cli -s "${QSOCK[none]}" info stats | tr -d '\r' | grep '^leases_taken:' | cut -d: -f2)
sent=$(redis-cli -s "${QSOCK[none]}" info stats | tr -d '\r' | grep '^redis_commands:' | cut -d: -f2)
ok=$(redis-cli -s "${QSOCK[none]}" info stats | tr -d '\r' | grep '^claims_ok:' | cut -d: -f2)
printf "quotad (none): %s claims, %s leases, %s Redis commands sent => %.6f per claim; RSS %s kB\n" \
  "$ok" "$leases" "$sent" "$(echo "$sent / $ok" | bc -l)" "$rss"
