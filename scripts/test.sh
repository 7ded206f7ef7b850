#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds, runs unit and integration tests
# (integration tests start their own redis-server processes on private Unix sockets).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
source scripts/kafka-env.sh
swift build --build-tests
# The Hummingbird example (its own package, tested end to end by QuotaClientTests) is built here, before
# the tests, so that its minutes of compiling do not run beside timing-sensitive tests.
swift build --package-path examples/hummingbird/quota-claim-app --scratch-path .build-hummingbird
# Three passes: everything else in parallel; then the Redis Cluster suites (six redis-servers and several
# sidecars each; beside the rest they starved the throughput- and deadline-bound fault tests on 2 cores);
# then the suites that load the machine on purpose (a peer flooding quotad, hundreds of pooled callers, the
# example app, a producer recreated under four writers, a peer pipelining 60,000 commands unread), each group on
# its own so that its load does not change the timing the others depend on.
heavy="AbuseTests|QuotaClientTests|ProducingRunReviewTests|LateReaderTests"
cluster="RedisClusterTests|RedisClusterReviewTests|RedisClusterShardTests"
status=0
swift test --skip "$heavy|$cluster" 2>&1 | tee .build/test-output.txt || status=1
swift test --filter "$cluster" 2>&1 | tee -a .build/test-output.txt || status=1
swift test --filter "$heavy" 2>&1 | tee -a .build/test-output.txt || status=1
# Release builds on a Redis Cluster (everything above runs debug builds; a release-only crash once passed them).
{ swift build -c release --product quotad && swift build -c release --product quotactl && scripts/release-smoke.sh; } 2>&1 \
  | tee -a .build/test-output.txt || status=1
exit $status
