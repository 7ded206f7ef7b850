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

$R set bench:stock 1000000000 >/dev/null
sha=$($R script load "local s = tonumber(redis.call('GET', KEYS[1])) if s and s > 0 then redis.call('DECR', KEYS[1]) return 1 end return 0")
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
# The three are interleaved over ROUNDS rounds and the medians reported (the machine is noisy):
# redis-server's own INCR (one Redis round trip per claim at best), a claim as one Lua script on
# one hot key (the design quotad replaces), and quotad's CLAIM.
incrs=(); evals=(); claims=()
calls=0; sent=0; ok=0
for round in $(seq "${ROUNDS:-3}"); do
  incrs+=($(redis-benchmark -s "$T/redis.sock" -n "$N" -c "$C" -P "$P" -q INCR bench:counter 2>/dev/null | rps))
  evals+=($(redis-benchmark -s "$T/redis.sock" -n "$N" -c "$C" -P "$P" -q EVALSHA "$sha" 1 bench:stock 2>/dev/null | rps))
  $R config resetstat >/dev/null
  s0=$(redis-cli -s "$T/quotad.sock" info stats | tr -d '\r')
  claims+=($(redis-benchmark -s "$T/quotad.sock" -n "$N" -c "$C" -P "$P" -q CLAIM bench user 2>/dev/null | rps))
  s1=$(redis-cli -s "$T/quotad.sock" info stats | tr -d '\r')
  calls=$((calls + $($R info commandstats | tr -d '\r' | grep -oE 'calls=[0-9]+' | cut -d= -f2 | paste -sd+ | bc)))
  d() { echo $(( $(echo "$s1" | grep "^$1:" | cut -d: -f2) - $(echo "$s0" | grep "^$1:" | cut -d: -f2) )); }
  sent=$((sent + $(d redis_commands))); ok=$((ok + $(d claims_ok)))
done
median() { printf "%s\n" "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
incr=$(median "${incrs[@]}"); evalsha=$(median "${evals[@]}"); claim=$(median "${claims[@]}")
leases=$(redis-cli -s "$T/quotad.sock" info stats | tr -d '\r' | grep '^leases_taken:' | cut -d: -f2)
rss=$(awk '/VmRSS/ {print $2}' /proc/$qpid/status)
hwm=$(awk '/VmHWM/ {print $2}' /proc/$qpid/status)

printf "\nredis-benchmark -n %s -c %s -P %s, medians of %s interleaved rounds, %s cores, %s\n\n" "$N" "$C" "$P" "${ROUNDS:-3}" "$(nproc)" "$(date -u +%Y-%m-%d)"
printf "| what | requests/s | quotad CLAIM / this |\n|---|---:|---:|\n"
printf "| quotad \`CLAIM bench user\` (Unix socket) | %.0f | 1.00 |\n" "$claim"
printf "| redis-server \`INCR\` | %.0f | %.2f |\n" "$incr" "$(echo "$claim / $incr" | bc -l)"
printf "| redis-server \`EVALSHA\` claim script, one hot key | %.0f | %.2f |\n" "$evalsha" "$(echo "$claim / $evalsha" | bc -l)"
printf "\nper round: quotad %s | INCR %s | EVALSHA %s\n" "${claims[*]}" "${incrs[*]}" "${evals[*]}"
printf "claims ok %s, leases taken %s\n" "$ok" "$leases"
printf "Redis commands sent by quotad (round trips, incl. 1 s refreshes): %s => %.6f per claim\n" \
  "$sent" "$(echo "$sent / $ok" | bc -l)"
printf "Redis command executions (INFO commandstats, incl. commands inside Lua): %s => %.6f per claim\n" \
  "$calls" "$(echo "$calls / $ok" | bc -l)"
printf "quotad RSS %s kB (peak %s kB)\n" "$rss" "$hwm"
