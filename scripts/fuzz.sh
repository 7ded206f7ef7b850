#!/usr/bin/env bash
# Build the libFuzzer target for quotad's RESP decoder and command parser (Fuzz/) and run it for a
# bounded time or number of executions on a copy of Fuzz/corpus. A crash (or a broken invariant) is
# saved under Fuzz/crashes/ and the script exits non-zero.
#
#   scripts/fuzz.sh                      # FUZZ_SECONDS=120
#   FUZZ_SECONDS=600 scripts/fuzz.sh
#   FUZZ_RUNS=10000000 scripts/fuzz.sh   # a number of executions instead of a time
#   scripts/fuzz.sh -only_ascii=1        # extra arguments go to libFuzzer
#   FUZZ_BUILD_ONLY=1 scripts/fuzz.sh    # just build .build-fuzz/fuzz/quotad-fuzz
#
# How it is built: `swift build -c release --target QuotaRESP` in the scratch dir .build-fuzz compiles
# NIOCore and its dependencies; then swiftc compiles Sources/QuotaRESP/*.swift (-sanitize=fuzzer,address)
# and Fuzz/*.swift (-sanitize=address) and links them with NIOCore's objects (not instrumented: the
# ByteBuffer code the decoder uses is @inlinable, so it is compiled, and instrumented, with it).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRATCH="${FUZZ_SCRATCH:-$ROOT/.build-fuzz}"
# Inputs up to 1 KiB: the two small limit sets reach every limit well within it, and longer inputs
# cost ~10x more per execution (FUZZ_MAX_LEN=8192 to also hit the default 4 KiB inline limit).
FUZZ_MAX_LEN="${FUZZ_MAX_LEN:-1024}"
OUT="$SCRATCH/fuzz"
BIN="$OUT/quotad-fuzz"
cd "$ROOT"

mkdir -p "$OUT"
echo "== building NIOCore (swift build -c release --target QuotaRESP --scratch-path $SCRATCH)"
swift build -c release --scratch-path "$SCRATCH" --target QuotaRESP >"$OUT/swift-build.log" 2>&1 || {
  cat "$OUT/swift-build.log"; exit 1; }
REL="$SCRATCH/release"

# The clang module flags (C shims of NIO and swift-atomics) exactly as SwiftPM passed them for QuotaRESP.
mapfile -t XCC < <(python3 - "$SCRATCH/release.yaml" <<'EOF'
import json, sys
text = open(sys.argv[1]).read()
start = text.index('"C.QuotaRESP-')
line = next(l for l in text[start:].splitlines() if l.strip().startswith("args:"))
args = json.loads(line.split("args:", 1)[1])
i = 0
while i < len(args):
    if args[i] == "-Xcc":
        print(args[i]); print(args[i + 1]); i += 2
    else:
        i += 1
EOF
)

# NIOCore's dependency closure (swift-nio Package.swift): its objects are linked into the fuzzer.
OBJS=()
for m in NIOCore NIOConcurrencyHelpers _NIOBase64 _NIODataStructures CNIOAtomics CNIOLinux CNIODarwin \
         CNIOWindows CNIOWASI CNIOOpenBSD CNIOFreeBSD Atomics _AtomicsShims DequeModule \
         InternalCollectionsUtilities ContainersPreview; do
  [ -d "$REL/$m.build" ] || continue
  while IFS= read -r o; do OBJS+=("$o"); done < <(find "$REL/$m.build" -name '*.o' | sort)
done

echo "== compiling the fuzzer ($BIN)"
# QuotaRESP with coverage (-sanitize=fuzzer) and ASan; the harness with ASan only, so that libFuzzer is
# guided by the decoder's and parser's branches, not the harness's own; libFuzzer's main at link time.
COMMON=(-parse-as-library -O -g -wmo -swift-version 6 -enable-upcoming-feature ExistentialAny
        -module-cache-path "$OUT/ModuleCache" -I "$OUT/modules" -I "$REL/Modules" "${XCC[@]}")
mkdir -p "$OUT/modules"
swiftc -sanitize=fuzzer,address "${COMMON[@]}" -module-name QuotaRESP \
  -emit-module -emit-module-path "$OUT/modules/QuotaRESP.swiftmodule" \
  -c "$ROOT"/Sources/QuotaRESP/*.swift -o "$OUT/QuotaRESP.o"
swiftc -sanitize=address "${COMMON[@]}" -module-name QuotaRESPFuzz \
  -c "$ROOT"/Fuzz/*.swift -o "$OUT/QuotaRESPFuzz.o"
swiftc -sanitize=fuzzer,address -use-ld=lld "$OUT/QuotaRESP.o" "$OUT/QuotaRESPFuzz.o" "${OBJS[@]}" -o "$BIN"

[ -n "${FUZZ_BUILD_ONLY:-}" ] && exit 0

WORK="$(mktemp -d /tmp/quotad-fuzz.XXXXXX)"
mkdir -p "$WORK/corpus" "$WORK/artifacts"
cp "$ROOT"/Fuzz/corpus/* "$WORK/corpus/"
LIMIT=()
if [ -n "${FUZZ_RUNS:-}" ]; then
  LIMIT+=("-runs=$FUZZ_RUNS")
  [ -n "${FUZZ_SECONDS:-}" ] && LIMIT+=("-max_total_time=$FUZZ_SECONDS")
else
  LIMIT+=("-max_total_time=${FUZZ_SECONDS:-120}")
fi
CMD=("$BIN" "$WORK/corpus" "${LIMIT[@]}" "-max_len=$FUZZ_MAX_LEN" -timeout=10 -rss_limit_mb=2048
     -print_final_stats=1 "-artifact_prefix=$WORK/artifacts/" "$@")
echo "== ${CMD[*]}"
set +e
# Swift's own crash backtracer would run inside ASan's signal handling: off. ASan: no leak checks (Swift
# runtime caches), and cheaper bookkeeping (no allocation stacks, small quarantine) for ~25 % more exec/s;
# re-run a saved crash input with ASAN_OPTIONS=detect_leaks=0 for full allocation stacks.
export SWIFT_BACKTRACE="${SWIFT_BACKTRACE:-enable=no}"
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0:malloc_context_size=0:detect_stack_use_after_return=0:quarantine_size_mb=16}"
"${CMD[@]}" 2>&1 | tee "$WORK/fuzz.log" | grep -E --line-buffered \
  '^#[0-9]+[[:space:]]+(pulse|DONE|INITED)|ERROR|FUZZ INVARIANT|Fatal error|SUMMARY|Test unit written|^stat::|^Done'
RC=${PIPESTATUS[0]}
set -e

RUNS="$(sed -n 's/^stat::number_of_executed_units: *//p' "$WORK/fuzz.log" | tail -1)"
RATE="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$WORK/fuzz.log" | tail -1)"
CRASHES=0
shopt -s nullglob
for f in "$WORK"/artifacts/*; do
  mkdir -p "$ROOT/Fuzz/crashes"
  cp "$f" "$ROOT/Fuzz/crashes/"
  echo "crash input saved: Fuzz/crashes/$(basename "$f")"
  CRASHES=$((CRASHES + 1))
done
echo "== executions: ${RUNS:-?}  exec/s: ${RATE:-?}  crashes: $CRASHES  (libFuzzer exit $RC; log $WORK/fuzz.log)"
if [ "$RC" -ne 0 ] || [ "$CRASHES" -ne 0 ]; then
  echo "FAILED: see $WORK/fuzz.log; turn each Fuzz/crashes/ input into a corpus seed and a regression test" >&2
  exit 1
fi
rm -rf "$WORK"
