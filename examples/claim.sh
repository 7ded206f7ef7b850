#!/usr/bin/env bash
# Claim with nothing but redis-cli. -e makes redis-cli exit non-zero on an error reply (SOLDOUT, ...).
# usage: claim.sh SOCKET VOUCHER USER
set -euo pipefail
sock=${1:-/run/quotad/quotad.sock}
voucher=${2:-flash-sale}
user=${3:-user-1}
req=$(cat /proc/sys/kernel/random/uuid)   # the same REQ for every retry of this claim
if id=$(redis-cli -e -s "$sock" CLAIM "$voucher" "$user" REQ "$req" 2>&1); then
  echo "claimed: $id"
else
  echo "refused: $id"
  exit 1
fi
redis-cli -s "$sock" AVAIL "$voucher" | sed 's/^/left (approximately): /'
