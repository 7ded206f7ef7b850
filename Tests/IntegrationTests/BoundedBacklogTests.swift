// Found in issue 13's measurements: with `durability: none`, a `journal.dir` and no Kafka, every claim
// waited in the journal for a shipper that does not exist (2 M claims: 440 MB of RSS, the journal never
// deleted); and without a journal, the events a stopped broker had not acknowledged piled up in memory.
import Foundation
import QuotaClient
import QuotaHarness
import Testing

@Suite("Bounded backlogs without Kafka or without a journal", .serialized, .timeLimit(.minutes(3)))
struct BoundedBacklogTests {
    /// redis-benchmark's exit status (it stops at the first error reply) and output.
    private func bench(_ socket: String, _ n: Int, _ voucher: String, dir: TempDir, log: String) async throws -> (Int32, String) {
        let p = try ChildProcess(
            "/usr/bin/redis-benchmark", ["-s", socket, "-n", "\(n)", "-P", "16", "-c", "10", "-q", "CLAIM", voucher, "u"],
            log: dir.file(log))
        let st = try await p.wait(timeout: .seconds(120))
        return (st, p.output)
    }

    @Test func aJournalWithoutKafkaKeepsNothingWaitingAndDeletesItsSegments() async throws {
        let redis = try await RedisServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "nk", limit: 1_000_000, perUser: 0, totalLimit: 1_000_000, region: "sg")
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a", extraYAML: """
            journal: { dir: \(dir.file("journal-host-a")), segment_bytes: 65536 }
            claims: { dedupe_window_seconds: 1 }

            """)
        let (st, out) = try await bench(q.socket, 30_000, "nk", dir: dir, log: "bench.log")
        #expect(st == 0, "\(out)")
        #expect(try await q.stat("claims_ok") == 30_000)
        #expect(try await q.stat("journal_unshipped_claims") == 0, "nothing waits for a Kafka that is not configured")
        #expect(try await q.stat("kafka_enabled") == 0, "and INFO says this host ships nothing")
        // Sealed segments go after the retention (rolled at 64 KiB or 2 s, kept 1 s).
        try await eventually("old segments deleted", timeout: .seconds(20)) {
            try await q.stat("journal_segments") <= 2
        }
        #expect(try await q.stat("journal_backlog_bytes") <= 2 * 65536)
        #expect(try await q.stop() == 0)
        #expect(try await redis.account("nk").pool == 1_000_000 - 30_000, "the stop returned the rest")
        // A restart recovers from what is left and serves again.
        try await q.restart()
        #expect(try await q.stat("journal_unshipped_claims") == 0)
        let c = try await RESPClient.connect(q.socket)
        #expect(try await c.send("CLAIM", "nk", "again").errorCode == nil)
        #expect(try await q.stop() == 0)
    }

    @Test func withoutAJournalAStoppedBrokerCannotGrowTheEventsHeldInMemory() async throws {
        let kafka = try await KafkaBroker()
        let redis = try await RedisServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "nm", limit: 1_000_000, perUser: 0, totalLimit: 1_000_000, region: "sg")
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a", extraYAML: """
            kafka: { brokers: "\(kafka.brokers)", topic: t-nm }

            """)
        let c = try await RESPClient.connect(q.socket)
        #expect(try await c.send("CLAIM", "nm", "before").errorCode == nil)
        kafka.child.signal(SIGSTOP)
        let (_, out) = try await bench(q.socket, 160_000, "nm", dir: dir, log: "bench.log")
        print("bounded: \(out.suffix(300))")
        let ok = try await q.stat("claims_ok")
        let backlog = try await q.stat("kafka_backlog")
        // The bound is checked every 50 ms tick: a tick's claims may pass it.
        #expect(ok < 140_000, "claims were refused once 100,000 events waited in memory: \(ok) served")
        #expect(backlog > 0 && backlog < 140_000, "kafka_backlog \(backlog), claims_ok \(ok)")
        let refused = try await c.send("CLAIM", "nm", "while-full")
        #expect(refused.errorCode == "UNAVAILABLE", "\(refused)")
        #expect(refused.errorMessage?.contains("in memory") == true, "\(refused)")
        kafka.child.signal(SIGCONT)
        try await eventually("Kafka caught up", timeout: .seconds(90)) {
            guard try await q.stat("kafka_backlog") < 100_000 else { return false }
            return try await c.send("CLAIM", "nm", "after").errorCode == nil
        }
        #expect(try await q.stop() == 0)
    }

    /// Found by review: in kafka mode every acknowledgement nobody waits for (lease grants and closes,
    /// cancellations) was kept for a waiter that never comes: a set that grew with every lease.
    @Test func acknowledgementsNobodyWaitsForAreNotKeptForEver() async throws {
        let kafka = try await KafkaBroker()
        let redis = try await RedisServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "ea", limit: 100_000, perUser: 0, totalLimit: 100_000, region: "sg")
        let (st, out) = try await quotactl(["lease", "set", "--voucher", "ea", "--min", "5", "--max", "5", "--redis", redis.url])
        #expect(st == 0, "\(out)")
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a", kafka: kafka, topic: "t-ea", durability: "kafka")
        let c = try await RESPClient.connect(q.socket)
        var ok = 0
        for i in 0..<200 where try await c.send("CLAIM", "ea", "u\(i)").errorCode == nil { ok += 1 }
        #expect(ok == 200)
        // About 40 leases granted and closed: their records were acknowledged with nobody waiting.
        try await eventually("everything acknowledged", timeout: .seconds(30)) { try await q.stat("journal_unshipped_claims") == 0 }
        let kept = try await q.stat("kafka_early_acks")
        #expect(kept > 0, "lease records acknowledged with no waiter: \(kept)")
        try await eventually("dropped after their age", timeout: .seconds(30)) { try await q.stat("kafka_early_acks") == 0 }
        #expect(try await c.send("CLAIM", "ea", "after").errorCode == nil, "claims still get their acknowledgement")
        c.close()
        #expect(try await q.stop() == 0)
    }
}
