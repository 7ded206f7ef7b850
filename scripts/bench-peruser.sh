#!/usr/bin/env bash
# Issue-4 figures in one run (release build): one quotad, claims/s and latency with and without a
# per-user limit (every claim a new user, so every check passes), Redis commands per claim.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.build/release}
SECS=${SECS:-8}
source scripts/lib.sh
qd_init quotad-bench
qd_start_redis
$BIN/quotactl voucher create free --limit 1000000000 --redis "unix://$T/redis.sock" >/dev/null
$BIN/quotactl voucher create peruser --limit 1000000000 --per-user 1 --redis "unix://$T/redis.sock" >/dev/null
echo "| voucher | clients | claims/s | latency p50 | latency p99 | Redis commands per claim | user checks per Redis batch |"
echo "|---|---|---:|---:|---:|---:|---:|"
for shape in "50 16" "1 1"; do
  set -- $shape
  for v in free peruser; do
    cat > "$T/q.yaml" <<YAML
host_id: bench
region: sg
regions:
  sg: { redis: "unix://$T/redis.sock" }
socket: { path: $T/q.sock }
durability: none
log_level: warning
YAML
    $BIN/quotad --config "$T/q.yaml" 2>>"$T/quotad.log" &
    qpid=$!
    qd_wait_sock "$T/q.sock"
    $BIN/quota-bench flash --socket "$T/q.sock" --voucher $v --connections $1 --pipeline $2 --unique-users --duration 1 >/dev/null
    s0=$(redis-cli -s "$T/q.sock" info stats | tr -d '\r')
    out=$($BIN/quota-bench flash --socket "$T/q.sock" --voucher $v --connections $1 --pipeline $2 --unique-users \
          --duration "$SECS" --json)
    s1=$(redis-cli -s "$T/q.sock" info stats | tr -d '\r')
    kill -TERM $qpid; wait $qpid || true
    python3 - "$v" "$1" "$2" "$out" "$s0" "$s1" <<'PY'
import json, sys
v, conns, pipe, out = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
def kv(t): return dict(l.split(":", 1) for l in t.splitlines() if ":" in l and not l.startswith("#"))
a, b = kv(sys.argv[5]), kv(sys.argv[6])
d = lambda k: int(b[k]) - int(a[k])
ok = d("claims_ok")
cmds = d("redis_commands") / ok if ok else 0
batches = d("user_check_batches")
per = f"{d('user_checks') / batches:.1f}" if batches else "-"
shape = "1, unpipelined" if pipe == "1" else f"{conns}, pipeline {pipe}"
print(f"| {'1 per user' if v == 'peruser' else 'no per-user limit'} | {shape} | {int(out['claims_per_second']):,} | {int(out['latency_p50_us'])} µs | {int(out['latency_p99_us'])} µs | {cmds:.4f} | {per} |")
PY
  done
done
echo
echo "durability none (isolates the per-user check), $(nproc) cores, $(date -u +%Y-%m-%d), ${SECS}s per row after 1 s warm-up; latency per claim unpipelined, per batch of 16 pipelined"
