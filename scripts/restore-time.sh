#!/usr/bin/env bash
# How long a restart takes before the socket answers (issue 13): N claims (default 1,000,000) through a
# release quotad with a journal and a 900 s dedupe window, kill -9, then the time from exec to PONG
# (the journal's REQ answers and UNCLAIM book are restored before the socket opens). BIN: another build.
#   scripts/restore-time.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/kafka-env.sh
source scripts/lib.sh
qd_init quotad-restore
qd_start_redis
BIN=${BIN:-.build/release}
$BIN/quotactl voucher create bench --limit 1000000000000 --redis "unix://$T/redis.sock" >/dev/null
qd_sidecar_yaml q none "journal: { dir: $T/journal }" "claims: { dedupe_window_seconds: 900 }"
$BIN/quotad --config "$T/q.yaml" 2>>"$T/q.log" &
qp=$!
qd_wait_sock "$T/q.sock"
redis-benchmark -s $T/q.sock -n ${N:-1000000} -c 10 -P 16 -q CLAIM bench u >/dev/null 2>&1
kill -9 $qp
wait $qp 2>/dev/null || true
rm -f $T/q.sock
s=$(date +%s.%N)
$BIN/quotad --config "$T/q.yaml" 2>>"$T/q2.log" &
pids+=($!)
until redis-cli -s $T/q.sock PING 2>/dev/null | grep -q PONG; do sleep 0.01; done
e=$(date +%s.%N)
echo "${N:-1000000} claims, journal $(du -sh $T/journal | cut -f1): restart to PONG $(echo "$e - $s" | bc) s"
