#!/usr/bin/env bash
# Issue-4 figures in one run (release build): one quotad, claims/s and latency with and without a
# per-user limit (every claim a new user, so every check passes), Redis commands per claim.
# The two vouchers alternate over ROUNDS rounds and the medians are reported (the machine is noisy).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.build/release}
SECS=${SECS:-5}
ROUNDS=${ROUNDS:-3}
source scripts/lib.sh
qd_init quotad-bench
qd_start_redis
$BIN/quotactl voucher create free --limit 1000000000 --redis "unix://$T/redis.sock" >/dev/null
$BIN/quotactl voucher create peruser --limit 1000000000 --per-user 1 --redis "unix://$T/redis.sock" >/dev/null
qd_sidecar_yaml q none
: > "$T/rows"
for shape in "50 16" "1 1"; do
  set -- $shape
  for round in $(seq "$ROUNDS"); do
    for v in free peruser; do
      $BIN/quotad --config "$T/q.yaml" 2>>"$T/quotad.log" &
      qpid=$!
      qd_wait_sock "$T/q.sock"
      $BIN/quota-bench flash --socket "$T/q.sock" --voucher $v --connections $1 --pipeline $2 --unique-users --duration 1 >/dev/null
      s0=$(redis-cli -s "$T/q.sock" info stats | tr -d '\r' | tr '\n' ';')
      out=$($BIN/quota-bench flash --socket "$T/q.sock" --voucher $v --connections $1 --pipeline $2 --unique-users \
            --duration "$SECS" --json)
      s1=$(redis-cli -s "$T/q.sock" info stats | tr -d '\r' | tr '\n' ';')
      kill -TERM $qpid; wait $qpid || true
      echo "$v|$1|$2|$out|$s0|$s1" >> "$T/rows"
    done
  done
done
python3 - "$T/rows" "$ROUNDS" "$SECS" <<'PY'
import json, sys, statistics
rows = [l.rstrip("\n").split("|") for l in open(sys.argv[1])]
def kv(t): return dict(x.split(":", 1) for x in t.split(";") if ":" in x and not x.startswith("#"))
groups = {}
for v, conns, pipe, out, s0, s1 in rows:
    o = json.loads(out); a, b = kv(s0), kv(s1)
    d = lambda k: int(b[k]) - int(a[k])
    ok = d("claims_ok")
    groups.setdefault((conns, pipe, v), []).append(dict(
        cps=float(o["claims_per_second"]), p50=int(o["latency_p50_us"]), p99=int(o["latency_p99_us"]),
        cmds=d("redis_commands") / ok if ok else 0,
        per=(d("user_checks") / d("user_check_batches")) if d("user_check_batches") else None))
print("| voucher | clients | claims/s (median) | latency p50 | latency p99 | Redis commands per claim | user checks per Redis batch |")
print("|---|---|---:|---:|---:|---:|---:|")
ratios = {}
for (conns, pipe, v), rs in groups.items():
    med = lambda k: statistics.median(r[k] for r in rs)
    shape = "1, unpipelined" if pipe == "1" else f"{conns}, pipeline {pipe}"
    per = [r["per"] for r in rs if r["per"] is not None]
    print(f"| {'1 per user' if v == 'peruser' else 'no per-user limit'} | {shape} | {int(med('cps')):,} | {int(med('p50'))} µs | {int(med('p99'))} µs | {med('cmds'):.4f} | {statistics.median(per):.1f} |" if per else
          f"| {'1 per user' if v == 'peruser' else 'no per-user limit'} | {shape} | {int(med('cps')):,} | {int(med('p50'))} µs | {int(med('p99'))} µs | {med('cmds'):.4f} | - |")
    ratios.setdefault(shape, {})[v] = [r["cps"] for r in rs]
print()
for shape, r in ratios.items():
    each = [p / f for p, f in zip(r["peruser"], r["free"])]
    print(f"{shape}: with a per-user limit / without: median {statistics.median(r['peruser']) / statistics.median(r['free']):.2f} "
          f"(per round: {', '.join(f'{x:.2f}' for x in each)})")
print(f"durability none (isolates the per-user check); {sys.argv[2]} alternating rounds of {sys.argv[3]} s after 1 s warm-up; "
      "latency per claim (a pipelined claim waits for its batch of 16)")
PY
