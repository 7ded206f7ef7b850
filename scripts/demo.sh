#!/usr/bin/env bash
# A local flash sale: a private redis-server, one voucher, three quotad sidecars,
# hundreds of concurrent clients until it sells out; then graceful shutdown and the books.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/kafka-env.sh
LIMIT=${LIMIT:-20000}
CLIENTS=${CLIENTS:-300}
BIN=${BIN:-.build/release}
source scripts/lib.sh
qd_init quotad-demo
echo "== starting a private redis-server ($T/redis.sock)"
qd_start_redis
qd_start_tansu
echo "== started a Kafka-compatible broker (Tansu) on 127.0.0.1:$KPORT"

# The operator's config: the region's Redis, the topic, and the ledger (SQLite, embedded).
cat > "$T/operator.yaml" <<YAML
region: sg
regions:
  sg: { redis: "unix://$T/redis.sock" }
durability: none
kafka: { brokers: "127.0.0.1:$KPORT", topic: quota.claims }
ledger: { db: "sqlite://$T/ledger.db" }
YAML
echo "== creating voucher flash-sale with limit $LIMIT"
$BIN/quotactl voucher create flash-sale --limit "$LIMIT" --config "$T/operator.yaml"

for h in a b c; do
  cat > "$T/$h.yaml" <<YAML
host_id: host-$h
region: sg
regions:
  sg: { redis: "unix://$T/redis.sock" }
socket: { path: $T/quotad-$h.sock }
durability: journal
journal: { dir: $T/journal-$h }
kafka: { brokers: "127.0.0.1:$KPORT", topic: quota.claims }
log_level: warning
YAML
  $BIN/quotad --config "$T/$h.yaml" > "$T/quotad-$h.log" 2>&1 &
  pids+=($!)
done
for h in a b c; do qd_wait_sock "$T/quotad-$h.sock"; done
echo "== three quotad sidecars up; $CLIENTS clients claim until SOLDOUT"
$BIN/quota-bench flash --voucher flash-sale --connections "$CLIENTS" \
  --socket "$T/quotad-a.sock" --socket "$T/quotad-b.sock" --socket "$T/quotad-c.sock" --progress --json > "$T/result.json"

echo "== meanwhile, a daily deal (limit 1,000,000) that does not sell out: 100 clients for 2 s"
$BIN/quotactl voucher create daily-deal --limit 1000000 --config "$T/operator.yaml" >/dev/null
$BIN/quota-bench flash --voucher daily-deal --connections 100 --duration 2 \
  --socket "$T/quotad-a.sock" --socket "$T/quotad-b.sock" --socket "$T/quotad-c.sock" --json > "$T/daily.json"
daily_before=$($BIN/quotactl voucher show daily-deal --json --redis "unix://$T/redis.sock")

echo "== per-sidecar counters"
for h in a b c; do
  printf "  host-%s: " "$h"
  redis-cli -s "$T/quotad-$h.sock" info stats | tr -d '\r' | grep -E '^(claims_ok|claims_soldout|leases_taken|redis_commands):' | tr '\n' ' '
  echo
done
before=$($BIN/quotactl voucher show flash-sale --json --redis "unix://$T/redis.sock")
echo "== graceful shutdown (SIGTERM): every unused token goes back"
for i in 2 3 4; do kill -TERM "${pids[$i]}"; done
for i in 2 3 4; do wait "${pids[$i]}" || true; done
after=$($BIN/quotactl voucher show flash-sale --json --redis "unix://$T/redis.sock")
daily_after=$($BIN/quotactl voucher show daily-deal --json --redis "unix://$T/redis.sock")
echo "== reading the claims back from Kafka topic quota.claims"
$BIN/quota-bench stream --brokers "127.0.0.1:$KPORT" --topic quota.claims --voucher flash-sale --json > "$T/stream.json"

echo "== the ledger: the whole topic into SQLite ($T/ledger.db), then reconciliation against Redis"
$BIN/quota-ledger --config "$T/operator.yaml" --once --quiet
$BIN/quotactl reconcile --config "$T/operator.yaml"

python3 - "$T/result.json" "$LIMIT" "$before" "$after" "$T/stream.json" "$T/daily.json" "$daily_before" "$daily_after" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); limit = int(sys.argv[2])
b = json.loads(sys.argv[3])[0]; a = json.loads(sys.argv[4])[0]
k = json.load(open(sys.argv[5]))
d = json.load(open(sys.argv[6])); db = json.loads(sys.argv[7])[0]; da = json.loads(sys.argv[8])[0]
dsold = int(d["sold"])
sold = int(r["sold"])
print()
print(f"  limit            {limit}")
print(f"  sold             {sold}   (distinct claim ids {r['distinct_claim_ids']}, duplicates {r['duplicate_claim_ids']})")
print(f"  oversold         {max(0, sold - limit)}")
print(f"  claims/s         {r['claims_per_second']}   over {r['seconds']} s")
print(f"  replies          {r['errors']}")
print(f"  tokens returned at shutdown  {a['returned'] - b['returned']}")
print(f"  redis pool after shutdown    {a['pool']}   leases outstanding {a['leases_outstanding']}")
print(f"  on Kafka         {k['distinct_claimed']} claims ({k['events']} events, {k['resent_duplicates']} re-sends, {k['unclaimed']} cancellations)")
print()
print(f"  daily-deal       sold {dsold} of {da['limit']} in 2 s; in leases still open at SIGTERM (served or not): {db['tokens_outstanding']}")
print(f"  tokens returned at shutdown  {da['returned'] - db['returned']}   pool after {da['pool']}   leases outstanding {da['leases_outstanding']}")
ok = (sold <= limit and sold + a['pool'] == limit and a['leases_outstanding'] == 0 and r['duplicate_claim_ids'] == '0'
      and k['net_claims'] == sold and dsold + da['pool'] == da['limit'] and da['leases_outstanding'] == 0)
print("  books balance: sold + pool == limit for both, nothing stranded, and Kafka has every flash-sale claim" if ok else "  BOOKS DO NOT BALANCE")
sys.exit(0 if ok else 1)
PY
