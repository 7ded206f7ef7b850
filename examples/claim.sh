#!/usr/bin/env bash
# Claim from a running quotad with nothing but redis-cli.
SOCK=${SOCK:-/run/quotad/quotad.sock}
redis-cli -s "$SOCK" CLAIM "${1:-flash-sale}" "${2:-user-1}"
redis-cli -s "$SOCK" AVAIL "${1:-flash-sale}"
