#!/usr/bin/env bash
# Two regions (issue 12): region sg on one redis-server, region id on a Redis Cluster of 3 masters with a
# replica each; two quotad sidecars per region sell one voucher at once; mid-sale 3,000 tokens are moved
# from sg to id with `quotactl rebalance`; then every sidecar stops gracefully and the global books are
# shown and audited.   make demo-regions   (or: scripts/demo-regions.sh after `swift build -c release`)
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT=${LIMIT:-200000}
BIN=${BIN:-.build/release}
source scripts/lib.sh
qd_init quotad-regions

echo "== region sg: a redis-server ($T/redis.sock)"
qd_start_redis
echo "== region id: a Redis Cluster, 3 masters + 3 replicas (AOF, fsync always)"
qd_start_cluster 3 1

config() { # host region
  cat <<YAML
host_id: $1
region: $2
regions:
  sg: { redis: "unix://$T/redis.sock" }
  id: { redis: "$CLUSTER" }
socket: { path: $T/$1.sock }
durability: none
log_level: warning
YAML
}
config quotactl sg > "$T/operator.yaml"
echo "== voucher regional-sale: $LIMIT tokens, sg=$((LIMIT * 6 / 10)) id=$((LIMIT * 4 / 10))"
$BIN/quotactl voucher create regional-sale --limit "$LIMIT" --region "sg=$((LIMIT * 6 / 10))" \
  --region "id=$((LIMIT * 4 / 10))" --config "$T/operator.yaml"
for h in sg-a sg-b id-a id-b; do
  config "$h" "${h%-*}" > "$T/$h.yaml"
  $BIN/quotad --config "$T/$h.yaml" > "$T/$h.log" 2>&1 &
  pids+=($!)
done
for h in sg-a sg-b id-a id-b; do qd_wait_sock "$T/$h.sock"; done
qpids=("${pids[@]: -4}")

echo "== both regions sell at once (100 clients each); $((LIMIT / 10)) tokens move from sg to id mid-sale"
$BIN/quota-bench flash --voucher regional-sale --connections 100 --socket "$T/sg-a.sock" --socket "$T/sg-b.sock" \
  --json > "$T/sg.json" &
sgb=$!
$BIN/quota-bench flash --voucher regional-sale --connections 100 --socket "$T/id-a.sock" --socket "$T/id-b.sock" \
  --json > "$T/id.json" &
idb=$!
# Mid-sale: once sg's sidecars have leased a tenth of its pool.
for _ in $(seq 200); do
  pool=$(redis-cli -s "$T/redis.sock" hget "quota:{regional-sale}" pool)
  [ "${pool:-0}" -le $((LIMIT * 6 / 10 - LIMIT / 20)) ] && break
  sleep 0.01
done
$BIN/quotactl rebalance regional-sale --from sg --to id --amount $((LIMIT / 10)) --config "$T/operator.yaml"
wait $sgb; wait $idb
# Clients in id told SOLDOUT before the tokens arrived have left: a second wave sells what id got.
$BIN/quota-bench flash --voucher regional-sale --connections 20 --socket "$T/id-a.sock" --socket "$T/id-b.sock" \
  --json > "$T/id2.json"

echo "== graceful shutdown of the four sidecars (unused tokens go back to each region's pool)"
for p in "${qpids[@]}"; do kill -TERM "$p"; done
for p in "${qpids[@]}"; do wait "$p" || true; done
echo "== quotactl voucher show regional-sale --global"
$BIN/quotactl voucher show regional-sale --global --config "$T/operator.yaml"
echo "== quotactl audit regional-sale"
$BIN/quotactl audit regional-sale --config "$T/operator.yaml"
global=$($BIN/quotactl voucher show regional-sale --global --json --config "$T/operator.yaml")
python3 - "$LIMIT" "$T/sg.json" "$T/id.json" "$T/id2.json" "$global" <<'PY'
import json, sys
limit = int(sys.argv[1])
sg = int(json.load(open(sys.argv[2]))["sold"])
idr = int(json.load(open(sys.argv[3]))["sold"]) + int(json.load(open(sys.argv[4]))["sold"])
g = json.loads(sys.argv[5])
rows = {r["region"]: r for r in g["regions"]}
print()
print(f"  limit {limit}: sold in sg {sg}, in id {idr}, total {sg + idr}")
for r in ("sg", "id"):
    x = rows[r]
    print(f"  {r}: allocation {x['allocation']} (in {x['transfers_in']}, out {x['transfers_out']}), sold {x['sold']}")
ok = (sg + idr == limit and rows["sg"]["sold"] == sg and rows["id"]["sold"] == idr
      and g["allocations"] == limit and g["in_flight"] == 0)
print("  books balance: each region sold its allocation after the move, the total is the limit" if ok else "  BOOKS DO NOT BALANCE")
sys.exit(0 if ok else 1)
PY
