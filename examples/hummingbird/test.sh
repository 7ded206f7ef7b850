#!/usr/bin/env bash
# End to end: build the example app, start a private redis-server and quotad, run the app, claim over HTTP
# and check each answer's status (201, then 409 when sold out, 404, 403, 400, 204, 503 + Retry-After).
# quotad and quotactl come from the main package's build: $QUOTAD_BIN_DIR, else .build/debug.
# The app builds in its own scratch path ($HB_SCRATCH, default .build-hummingbird), away from the main build,
# at low priority (nice) so that tests running beside it keep their timing.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
pkg="$here/quota-claim-app"
BIN=${QUOTAD_BIN_DIR:-$root/.build/debug}
SCRATCH=${HB_SCRATCH:-$root/.build-hummingbird}
for b in quotad quotactl; do
  [ -x "$BIN/$b" ] || { echo "no $BIN/$b: build the main package first (swift build) or set QUOTAD_BIN_DIR" >&2; exit 1; }
done

echo "== building the example app (the first build takes minutes)"
mkdir -p "$SCRATCH"
if ! nice -n 10 swift build --package-path "$pkg" --scratch-path "$SCRATCH" > "$SCRATCH/example-build.log" 2>&1; then
  tail -50 "$SCRATCH/example-build.log"
  echo "the example did not build" >&2
  exit 1
fi
APP="$(swift build --package-path "$pkg" --scratch-path "$SCRATCH" --show-bin-path)/QuotaClaimApp"
[ -x "$APP" ] || { echo "the example did not build" >&2; exit 1; }

source "$root/scripts/lib.sh"
qd_init quotad-hb
# stop PID...: SIGTERM, then SIGKILL for any still running 10 s later (a test runner may start this script with
# SIGTERM blocked, and children inherit that).
stop() {
  local p alive
  kill -TERM "$@" 2>/dev/null || true
  for _ in $(seq 100); do
    alive=0
    for p in "$@"; do ps -o stat= -p "$p" 2>/dev/null | grep -qv Z && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  kill -KILL "$@" 2>/dev/null || true
  wait "$@" 2>/dev/null || true
}
stop_all() {
  stop "${pids[@]}"
  rm -rf "$T"
}
trap stop_all EXIT
qd_start_redis
ctl() { "$BIN/quotactl" "$@" --redis "unix://$T/redis.sock" >/dev/null; }
ctl voucher create hb-sale --limit 3
ctl voucher create hb-once --limit 100 --per-user 1
ctl voucher create hb-paused --limit 100
ctl voucher pause hb-paused

cat > "$T/quotad.yaml" <<YAML
host_id: host-hb
region: sg
regions:
  sg: { redis: "unix://$T/redis.sock" }
socket: { path: $T/quotad.sock }
durability: journal
journal: { dir: $T/journal }
log_level: warning
YAML
"$BIN/quotad" --config "$T/quotad.yaml" > "$T/quotad.log" 2>&1 &
quotad_pid=$!
pids+=("$quotad_pid")
qd_wait_sock "$T/quotad.sock"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$APP" --socket "$T/quotad.sock" --port "$port" --deadline-ms 500 > "$T/app.log" 2>&1 &
pids+=($!)
url="http://127.0.0.1:$port"
for _ in $(seq 100); do curl -sf "$url/health" >/dev/null 2>&1 && break; sleep 0.1; done
curl -sf "$url/health" >/dev/null || { echo "the app does not answer on $url"; cat "$T/app.log"; exit 1; }

failures=0
# expect STATUS METHOD PATH [curl args...]: the answer's status must be STATUS; its body is in $T/body.
expect() {
  local want=$1 method=$2 path=$3
  shift 3
  local got
  got=$(curl -s -o "$T/body" -D "$T/headers" -w '%{http_code}' -X "$method" "$url$path" "$@" || true)
  if [ "$got" = "$want" ]; then
    echo "  ok   $method $path -> $got $(head -c 200 "$T/body")"
  else
    echo "  FAIL $method $path: wanted $want, got $got $(head -c 300 "$T/body")"
    failures=$((failures + 1))
  fi
}
# expect_soon STATUS METHOD PATH [curl args...]: the same, allowed 10 s to come true (each try is a new claim).
expect_soon() {
  local want=$1 method=$2 path=$3 got=""
  shift 3
  for _ in $(seq 100); do
    got=$(curl -s -o "$T/body" -D "$T/headers" -w '%{http_code}' -X "$method" "$url$path" "$@" || true)
    [ "$got" = "$want" ] && break
    sleep 0.1
  done
  if [ "$got" = "$want" ]; then
    echo "  ok   $method $path -> $got $(head -c 200 "$T/body")"
  else
    echo "  FAIL $method $path: wanted $want within 10 s, got $got $(head -c 300 "$T/body")"
    failures=$((failures + 1))
  fi
}
field() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$T/body" "$1" 2>/dev/null || true; }

echo "== claims over HTTP on $url (voucher hb-sale, limit 3)"
expect 201 POST /claim/hb-sale -H 'X-User-ID: u1'
first=$(field claim_id)
case "$first" in sg.host-hb.*) ;; *) echo "  FAIL claim id '$first'"; failures=$((failures + 1)) ;; esac
expect 201 POST /claim/hb-sale -H 'Content-Type: application/json' -d '{"user":"u2","request_id":"order-2"}'
second=$(field claim_id)
expect 201 POST /claim/hb-sale -H 'X-User-ID: u2' -H 'Idempotency-Key: order-2'
[ "$(field claim_id)" = "$second" ] || { echo "  FAIL the same Idempotency-Key got another claim"; failures=$((failures + 1)); }
expect 201 POST /claim/hb-sale -d '{"user":"u3"}'
expect 409 POST /claim/hb-sale -H 'X-User-ID: u4'
[ "$(field error)" = SOLDOUT ] || { echo "  FAIL wanted SOLDOUT"; failures=$((failures + 1)); }
expect 204 DELETE "/claims/$first"
expect 204 DELETE "/claims/$first"
# The cancelled token goes back to stock; quotad's sold-out answer is lifted at its next refresh (about 1 s).
expect_soon 201 POST /claim/hb-sale -H 'X-User-ID: u4'
expect 409 POST /claim/hb-sale -H 'X-User-ID: u5'
expect 200 GET /vouchers/hb-sale/available

echo "== refusals"
expect 201 POST /claim/hb-once -H 'X-User-ID: u1'
expect 409 POST /claim/hb-once -H 'X-User-ID: u1'
[ "$(field error)" = USERLIMIT ] || { echo "  FAIL wanted USERLIMIT"; failures=$((failures + 1)); }
expect 404 POST /claim/no-such-voucher -H 'X-User-ID: u1'
expect 403 POST /claim/hb-paused -H 'X-User-ID: u1'
expect 400 POST /claim/hb-sale
expect 400 POST /claim/hb-sale -d 'not json'
expect 404 DELETE /claims/sg.nobody.0.1

echo "== quotad stopped: 503 with Retry-After"
stop "$quotad_pid"
expect 503 POST /claim/hb-once -H 'X-User-ID: u9'
grep -qi '^retry-after: 1' "$T/headers" || { echo "  FAIL no Retry-After"; failures=$((failures + 1)); }
expect 503 GET /health

if [ "$failures" -ne 0 ]; then
  echo "== $failures check(s) failed; the app's log:"
  tail -50 "$T/app.log"
  exit 1
fi
echo "hummingbird example: all checks passed"
