import ArgumentParser
import Foundation
import Logging
import NIOConcurrencyHelpers
import QuotaClient
import QuotaHarness
import QuotaKafka
import QuotaLedger
import QuotaRedis

/// The ledger in numbers: rows/s into SQLite and PostgreSQL, and how long reconciliation takes.
struct LedgerBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ledger",
        abstract: "Ledger rows/s into SQLite and PostgreSQL (batched), and quotactl reconcile time for many vouchers.")

    @Option(name: .long, help: "Claim events written to the topic and read into each database.") var events = 200_000
    @Option(name: .long, help: "Vouchers for the reconcile timing.") var vouchers = 1000
    @Option(name: .long, help: "Messages per database transaction.") var batch = 1000
    @Flag(name: .long) var json = false

    struct Result: Codable {
        var events: Int
        var sqliteRowsPerSecond: Double
        var postgresRowsPerSecond: Double
        var reconcileVouchers: Int
        var reconcileSeconds: Double
    }

    func run() async throws {
        var logger = Logger(label: "bench")
        logger.logLevel = .error
        let kafka = try await KafkaBroker()
        // Synthetic claims as quotad writes them (one voucher per 1,000 claims, one lease per 100).
        let topic = "bench-ledger"
        var msgs: [(key: String, value: [UInt8])] = []
        msgs.reserveCapacity(events)
        for i in 0..<events {
            let v = "v\(i / 1000)"
            let json = "{\"type\":\"claimed\",\"claim_id\":\"sg.h.b.\(i)\",\"voucher\":\"\(v)\",\"user\":\"u\(i)\",\"qty\":1,"
                + "\"region\":\"sg\",\"host\":\"h\",\"leases\":[{\"id\":\"\(i / 100)\",\"qty\":1}],\"ts_ms\":\(1_700_000_000_000 + i)}"
            msgs.append((v, Array(json.utf8)))
        }
        try produce(kafka.brokers, topic, msgs)
        let dir = TempDir()
        let sqlite = try await rowsPerSecond(url: "sqlite://\(dir.file("bench.db"))", kafka: kafka, topic: topic, logger: logger)
        let pg = try await PostgresServer()
        let postgres = try await rowsPerSecond(url: pg.url, kafka: kafka, topic: topic, logger: logger)
        try await pg.stop()
        let reconcile = try await reconcileSeconds(kafka: kafka, dir: dir)
        let r = Result(events: events, sqliteRowsPerSecond: sqlite, postgresRowsPerSecond: postgres,
                       reconcileVouchers: vouchers, reconcileSeconds: reconcile)
        if json { return try printJSON(r) }
        print("| ledger | claims/s written (batches of \(batch), offsets in the same transaction) |")
        print("|---|---:|")
        print(String(format: "| SQLite (WAL, synchronous=FULL) | %.0f |", sqlite))
        print(String(format: "| PostgreSQL 15 (libpq, Unix socket) | %.0f |", postgres))
        print(String(format: "\nquotactl reconcile of %d vouchers (1 sidecar's leases and claims each): %.2f s", vouchers, reconcile))
    }

    private func produce(_ brokers: String, _ topic: String, _ msgs: [(key: String, value: [UInt8])]) throws {
        let acked = NIOLockedValueBox(0)
        var logger = Logger(label: "bench")
        logger.logLevel = .error
        let p = try KafkaProducer(brokers: brokers, topic: topic, logger: logger,
                                  onDelivery: { rs in acked.withLockedValue { $0 += rs.count } })
        for (i, m) in msgs.enumerated() {
            while true {
                do {
                    try p.produce(key: m.key, value: m.value, sequence: UInt64(i + 1))
                    break
                } catch {
                    _ = p.flush(timeout: .milliseconds(100))
                }
            }
        }
        _ = p.flush(timeout: .seconds(120))
        p.close(flushTimeout: .zero)
    }

    /// Read the whole topic into a fresh database; rows per second of the writing.
    private func rowsPerSecond(url: String, kafka: KafkaBroker, topic: String, logger: Logger) async throws -> Double {
        let db = try await openLedgerDatabase(url: url, logger: logger)
        var o = LedgerConsumer.Options(brokers: kafka.brokers, topic: topic)
        o.batch = batch
        o.idleExit = .seconds(2)
        let consumer = LedgerConsumer(ledger: Ledger(db: db), options: o, logger: logger)
        let t0 = ContinuousClock.now
        try await consumer.run()
        let secs = Double((ContinuousClock.now - t0 - .seconds(2)).components.attoseconds) / 1e18
            + Double((ContinuousClock.now - t0 - .seconds(2)).components.seconds)
        let n = try await Ledger(db: db).counts().claims
        await db.close()
        guard n == events else { throw ValidationError("\(url): \(n) claims written, \(events) on the topic") }
        return Double(n) / max(secs, 0.001)
    }

    /// `vouchers` vouchers with leases and claims from a real sidecar, then `quotactl reconcile` timed.
    private func reconcileSeconds(kafka: KafkaBroker, dir: TempDir) async throws -> Double {
        let redis = try await RedisServer()
        let topic = "bench-reconcile"
        for i in 0..<vouchers {
            _ = try await redis.store.createVoucher(id: "r\(i)", limit: 100, perUser: 0, totalLimit: 100, region: "sg")
        }
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a", kafka: kafka, topic: topic)
        let c = try await RESPClient.connect(q.socket)
        for chunk in stride(from: 0, to: vouchers, by: 100) {
            _ = try await c.pipeline((chunk..<min(vouchers, chunk + 100)).map { ["CLAIM", "r\($0)", "u"] })
        }
        c.close()
        _ = try await q.stop()
        let cfg = dir.file("reconcile.yaml")
        try """
            region: sg
            regions: { sg: { redis: "\(redis.url)" } }
            durability: none
            kafka: { brokers: "\(kafka.brokers)", topic: \(topic) }
            ledger: { db: "sqlite://\(dir.file("reconcile.db"))" }
            """.write(toFile: cfg, atomically: true, encoding: .utf8)
        let ledger = try ChildProcess(Bin.path("quota-ledger"), ["--config", cfg, "--once", "--quiet"], log: dir.file("l.log"))
        _ = try await ledger.wait(timeout: .seconds(300))
        let t0 = ContinuousClock.now
        let r = try ChildProcess(Bin.path("quotactl"), ["reconcile", "--config", cfg, "--no-catch-up", "--json"], log: dir.file("r.log"))
        let st = try await r.wait(timeout: .seconds(600))
        let d = ContinuousClock.now - t0
        guard st == 0 else { throw ValidationError("reconcile of \(vouchers) vouchers did not balance:\n\(r.output.suffix(2000))") }
        return Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
    }
}
