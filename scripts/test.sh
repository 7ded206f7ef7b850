#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds, runs unit and integration tests
# (integration tests start their own redis-server processes on private Unix sockets).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
source scripts/kafka-env.sh
swift build --build-tests
swift test 2>&1 | tee .build/test-output.txt
