#!/usr/bin/env bash
# Memory of release quotad (issue 13): VmRSS, RssAnon (its own memory) and RssFile (mapped code, shared
# with other processes) idle, after 10 claims and after N claims (default 2,000,000: the UNCLAIM book of
# the default claims.max_tracked, 1,000,000, full twice over). durability none, no journal unless J=1;
# USERARG: the user of each claim (default user__rand_int__: 16-byte ids, each its own heap string in the
# book; `user` or `u__rand_int__` fit in a String's 15 inline bytes). BIN: another build.
#   USERARG=user scripts/rss.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/kafka-env.sh
source scripts/lib.sh
qd_init quotad-rss
qd_start_redis
BIN=${BIN:-.build/release}
$BIN/quotactl voucher create bench --limit 1000000000000 --redis "unix://$T/redis.sock" >/dev/null
qd_sidecar_yaml q none "$( [ -n "${J:-}" ] && echo "journal: { dir: $T/journal }")" "${EXTRA_YAML:-}"
$BIN/quotad --config "$T/q.yaml" 2>>"$T/q.log" &
qp=$!; pids+=($qp)
qd_wait_sock "$T/q.sock"
rss() { awk '/VmRSS|RssAnon|RssFile/{printf "%s %.1f MiB  ", $1, $2/1024} END {print ""}' /proc/$qp/status; }
echo "idle $(rss)"
redis-benchmark -s $T/q.sock -n 10 -c 1 -q CLAIM bench user >/dev/null 2>&1
echo "after 10 claims $(rss)"
redis-benchmark -s $T/q.sock -n ${N:-2000000} -c 50 -P 16 -q -r 100000000 CLAIM bench ${USERARG:-user__rand_int__} >/dev/null 2>&1
echo "after ${N:-2000000} claims $(rss)"
