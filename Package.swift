// swift-tools-version:6.1
import PackageDescription

let strict: [SwiftSetting] = [
    .swiftLanguageMode(.v6),
    .enableUpcomingFeature("ExistentialAny"),
]

let package = Package(
    name: "quotad",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "quotad", targets: ["quotad"]),
        .executable(name: "quotactl", targets: ["quotactl"]),
        .executable(name: "quota-bench", targets: ["quota-bench"]),
        .executable(name: "quota-ledger", targets: ["quota-ledger"]),
        .library(name: "QuotaClient", targets: ["QuotaClient"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.0"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.0"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/jpsim/Yams.git", from: "6.2.0"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift.git", from: "0.2.0"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.0"),
        .package(url: "https://github.com/vapor/sqlite-nio.git", from: "1.13.0"),
    ],
    targets: [
        // C library, owned by QuotaRedis only.
        // (No pkgConfig: hiredis.pc's Cflags carry -D_FILE_OFFSET_BITS=64, which SwiftPM refuses with a warning on every
        // build; off_t is 64 bits on the 64-bit platforms quotad builds for, and the shim includes <hiredis/hiredis.h>
        // from the default include path.)
        .systemLibrary(
            name: "CHiredis",
            providers: [.apt(["libhiredis-dev"])]
        ),
        // C library, owned by QuotaKafka only.
        .systemLibrary(
            name: "CRdKafka",
            pkgConfig: "rdkafka",
            providers: [.apt(["librdkafka-dev"])]
        ),
        // The only importer of CRdKafka: idempotent producer, consumer, mock cluster.
        .target(
            name: "QuotaKafka",
            dependencies: [
                "CRdKafka",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ]
        ),
        // C library, owned by QuotaPostgres only.
        .systemLibrary(name: "CLibPQ", pkgConfig: "libpq", providers: [.apt(["libpq-dev"])]),
        // The only importer of CLibPQ: a blocking PostgreSQL connection (benchmark baseline).
        .target(name: "QuotaPostgres", dependencies: ["CLibPQ"]),
        // CRC-32C with the CPU's instructions (SSE 4.2, ARMv8 CRC), for the journal's checksums. Owned by QuotaCore.
        .target(name: "CCRC32C"),
        // The domain: stock, leases, fencing, sizing. No I/O.
        .target(name: "QuotaCore", dependencies: ["CCRC32C"]),
        // The local write-ahead journal: segments, group commit, recovery.
        .target(
            name: "QuotaJournal",
            dependencies: [
                "QuotaCore",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ]
        ),
        // RESP2 framing with hard limits.
        .target(name: "QuotaRESP", dependencies: [.product(name: "NIOCore", package: "swift-nio")]),
        // The only importer of CHiredis: connection owner thread, Lua scripts, key layout.
        .target(
            name: "QuotaRedis",
            dependencies: [
                "CHiredis", "QuotaCore",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ]
        ),
        // A RESP client over a Unix socket (tests, quota-bench).
        .target(
            name: "QuotaClient",
            dependencies: ["QuotaRESP", .product(name: "NIOCore", package: "swift-nio"),
                           .product(name: "NIOPosix", package: "swift-nio"),
                           .product(name: "Logging", package: "swift-log")]
        ),
        // Starts and stops the real servers tests and benchmarks need (redis-server, quotad, Tansu).
        .target(
            name: "QuotaHarness",
            dependencies: [
                "QuotaClient", "QuotaRedis", "QuotaKafka", "QuotaRESP", "QuotaCore", "QuotaJournal",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ]
        ),
        // `GET /metrics` over HTTP/1.1 (quotad and quota-ledger).
        .target(
            name: "QuotaMetricsHTTP",
            dependencies: [.product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOPosix", package: "swift-nio"),
                           .product(name: "NIOHTTP1", package: "swift-nio")]
        ),
        // The chaos checker: a run's history (client ops, faults, the claim stream) and every invariant checked on it.
        .target(name: "QuotaChaos", dependencies: ["QuotaCore"]),
        // The ledger: the claim stream written into a database (SQLite or PostgreSQL), and the queries
        // reconciliation and rehydration ask of it.
        .target(
            name: "QuotaLedger",
            dependencies: [
                "QuotaCore", "QuotaKafka", "QuotaPostgres",
                .product(name: "SQLiteNIO", package: "sqlite-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // YAML configuration as validated value types.
        .target(name: "QuotaConfig", dependencies: ["QuotaCore", .product(name: "Yams", package: "Yams")]),
        // The sidecar: Unix socket server, dispatch, lease manager.
        .target(
            name: "QuotaServer",
            dependencies: [
                "QuotaCore", "QuotaRESP", "QuotaRedis", "QuotaConfig", "QuotaJournal", "QuotaKafka", "QuotaMetricsHTTP",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        .executableTarget(
            name: "quotad",
            dependencies: [
                "QuotaServer", "QuotaConfig",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        .executableTarget(
            name: "quota-ledger",
            dependencies: [
                "QuotaLedger", "QuotaConfig", "QuotaKafka", "QuotaMetricsHTTP",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ]
        ),
        .executableTarget(
            name: "quotactl",
            dependencies: [
                "QuotaRedis", "QuotaConfig", "QuotaCore", "QuotaJournal", "QuotaLedger", "QuotaKafka",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "quota-bench",
            dependencies: [
                "QuotaClient", "QuotaRESP", "QuotaKafka", "QuotaHarness", "QuotaPostgres", "QuotaRedis", "QuotaChaos",
                "QuotaCore", "QuotaJournal", "QuotaLedger",
                .product(name: "Histogram", package: "hdrhistogram-swift"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ]
        ),
        .testTarget(name: "QuotaServerTests", dependencies: ["QuotaServer", "QuotaCore", "QuotaChaos", "QuotaHarness"]),
        .testTarget(name: "QuotaCoreTests", dependencies: ["QuotaCore", "QuotaConfig", "QuotaJournal", "QuotaChaos"]),
        .testTarget(
            name: "QuotaRESPTests",
            dependencies: ["QuotaRESP", .product(name: "NIOCore", package: "swift-nio"),
                           .product(name: "NIOTestUtils", package: "swift-nio")]
        ),
        .testTarget(
            name: "IntegrationTests",
            dependencies: [
                "QuotaRESP", "QuotaRedis", "QuotaCore", "QuotaClient", "QuotaKafka", "QuotaHarness", "QuotaJournal", "QuotaLedger",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ]
        ),
    ]
)

// (C targets take no Swift settings.)
let cTargets: Set<String> = ["CCRC32C"]
for target in package.targets where target.type != .system && !cTargets.contains(target.name) {
    target.swiftSettings = (target.swiftSettings ?? []) + strict
}

// Binaries that load librdkafka look first in .build/rdkafka (relative to .build/<triple>/<config>/),
// where `make` links the librdkafka 2.16 that can talk to Tansu; without it the system library is used.
for target in package.targets where target.type == .executable || target.type == .test {
    target.linkerSettings = (target.linkerSettings ?? []) + [
        .unsafeFlags(["-Xlinker", "-rpath", "-Xlinker", "$ORIGIN/../../rdkafka"])
    ]
}

// Release executables (quotad above all) carry the Swift runtime and Foundation in their binary (`-static-stdlib`): calls into the
// runtime (retain/release, exclusivity, allocation) are direct instead of through the PLT, and only the pages
// it uses are mapped. `ab.sh MODE=none NOJ=1`, 3 × 10 rounds: 1.97 → 1.78–1.89 µs of CPU per claim; RSS 3 MiB
// less (README, issue 13). A host then needs no Swift toolchain, only the C libraries (`ldd quotad`).
// Release builds of our modules also use full cross-module optimization (`-cross-module-optimization`: their
// non-generic code and generics become inlinable across our module boundaries, e.g. the voucher machine into the
// connection handler): `ab.sh MODE=none NOJ=1` 1.89 → 1.81 and 1.91 → 1.80 µs per claim, ahead in 8 of 10 paired rounds.
// They are linked by lld, which the Swift toolchain ships (gold warned about `mktemp` in the static Foundation's
// objects, on every link; lld also links the four executables in ~4 s).
// (What `swift build --static-swift-stdlib` does: modules compiled against the static runtime's modules, so their
// autolink names its libraries, and executables linked with it.)
for target in package.targets where target.type != .system && !cTargets.contains(target.name) {
    target.swiftSettings = (target.swiftSettings ?? []) + [.unsafeFlags(["-static-stdlib", "-cross-module-optimization"], .when(configuration: .release))]
    if target.type == .executable {
        target.linkerSettings = (target.linkerSettings ?? []) + [.unsafeFlags(["-static-stdlib", "-use-ld=lld"], .when(configuration: .release))]
    }
}

// The claim path's own modules skip the run-time exclusivity checks in release builds (~4 % of a claim's
// CPU in `perf`: swift_beginAccess on the voucher machine and the engine's tables; README, issue 13). QuotaRESP
// too: the decoder's and the command-name compare's two checks were ~230 of a claim's ~7,500 instructions
// (`scripts/icount.sh`). QuotaJournal too: `Journal.append` (two checks a claim, on the event loops) and the
// writer's `write` were ~320 of a durable claim's ~13,000 (fourteenth pass). Debug builds, which run the tests,
// keep them: a violation still traps there.
for target in package.targets where ["QuotaCore", "QuotaServer", "QuotaRESP", "QuotaJournal"].contains(target.name) {
    target.swiftSettings = (target.swiftSettings ?? []) + [
        .unsafeFlags(["-enforce-exclusivity=unchecked"], .when(configuration: .release))
    ]
}
