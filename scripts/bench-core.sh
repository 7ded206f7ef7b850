#!/usr/bin/env bash
# Issue-2 figures in one run (release build): claims/s of one quotad under redis-benchmark
# beside redis-server's own INCR and an EVALSHA claim script; Redis commands per claim; quotad RSS.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-2000000}
C=${C:-50}
P=${P:-16}
BIN=${BIN:-.build/release}
source scripts/lib.sh
qd_init quotad-bench
qd_start_redis
R="redis-cli -s $T/redis.sock"

rps() { grep -oE '[0-9.]+ requests per second' | tail -1 | cut -d' ' -f1; }

# Baseline 1: redis-server's own INCR (the floor of one Redis round trip per claim).
incr=$(redis-benchmark -s "$T/redis.sock" -n "$N" -c "$C" -P "$P" -q INCR bench:counter 2>/dev/null | rps)
# Baseline 2: a claim as one Lua script on one hot key (the design quotad replaces).
$R set bench:stock 1000000000 >/dev/null
sha=$($R script load "local s = tonumber(redis.call('GET', KEYS[1])) if s and s > 0 then redis.call('DECR', KEYS[1]) return 1 end return 0")
evalsha=$(redis-benchmark -s "$T/redis.sock" -n "$N" -c "$C" -P "$P" -q EVALSHA "$sha" 1 bench:stock 2>/dev/null | rps)

$BIN/quotactl voucher create bench --limit 1000000000 --redis "unix://$T/redis.sock" >/dev/null
cat > "$T/q.yaml" <<YAML
host_id: bench-host
region: sg
regions:
  sg: { redis: "unix://$T/redis.sock" }
socket: { path: $T/quotad.sock }
durability: none
log_level: warning
${EXTRA_YAML:-}
YAML
$BIN/quotad --config "$T/q.yaml" 2>"$T/quotad.log" &
qpid=$!
pids+=($qpid)
qd_wait_sock "$T/quotad.sock"
$R config resetstat >/dev/null
claim=$(redis-benchmark -s "$T/quotad.sock" -n "$N" -c "$C" -P "$P" -q CLAIM bench user 2>/dev/null | rps)
calls=$($R info commandstats | tr -d '\r' | grep -oE 'calls=[0-9]+' | cut -d= -f2 | paste -sd+ | bc)
ok=$(redis-cli -s "$T/quotad.sock" info stats | tr -d '\r' | grep '^claims_ok:' | cut -d: -f2)
leases=$(redis-cli -s "$T/quotad.sock" info stats | tr -d '\r' | grep '^leases_taken:' | cut -d: -f2)
sent=$(redis-cli -s "$T/quotad.sock" info stats | tr -d '\r' | grep '^redis_commands:' | cut -d: -f2)
rss=$(awk '/VmRSS/ {print $2}' /proc/$qpid/status)
hwm=$(awk '/VmHWM/ {print $2}' /proc/$qpid/status)

printf "\nredis-benchmark -n %s -c %s -P %s, %s cores, %s\n\n" "$N" "$C" "$P" "$(nproc)" "$(date -u +%Y-%m-%d)"
printf "| what | requests/s | quotad CLAIM / this |\n|---|---:|---:|\n"
printf "| quotad \`CLAIM bench user\` (Unix socket) | %.0f | 1.00 |\n" "$claim"
printf "| redis-server \`INCR\` | %.0f | %.2f |\n" "$incr" "$(echo "$claim / $incr" | bc -l)"
printf "| redis-server \`EVALSHA\` claim script, one hot key | %.0f | %.2f |\n" "$evalsha" "$(echo "$claim / $evalsha" | bc -l)"
printf "\nclaims ok %s, leases taken %s\n" "$ok" "$leases"
printf "Redis commands sent by quotad (round trips, incl. 1 s refreshes): %s => %.6f per claim\n" \
  "$sent" "$(echo "$sent / $ok" | bc -l)"
printf "Redis command executions (INFO commandstats, incl. commands inside Lua): %s => %.6f per claim\n" \
  "$calls" "$(echo "$calls / $ok" | bc -l)"
printf "quotad RSS %s kB (peak %s kB)\n" "$rss" "$hwm"
