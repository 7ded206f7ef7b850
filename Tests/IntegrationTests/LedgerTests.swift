import Foundation
import Glibc
import NIOCore
import QuotaClient
import QuotaHarness
import QuotaLedger
import QuotaRESP
import QuotaRedis
import Testing

/// A config for quotactl and quota-ledger: the region's Redis, the topic, the ledger database.
func operatorConfig(_ dir: TempDir, redis: RedisServer, kafka: KafkaBroker, topic: String, ledger: String? = nil) throws -> String {
    let path = dir.file("operator.yaml")
    try """
        host_id: operator
        region: sg
        regions: { sg: { redis: "\(redis.url)" } }
        socket: { path: \(dir.file("operator.sock")) }
        durability: none
        kafka: { brokers: "\(kafka.brokers)", topic: \(topic) }
        ledger: { db: "\(ledger ?? "sqlite://\(dir.file("ledger.db"))")" }
        """.write(toFile: path, atomically: true, encoding: .utf8)
    return path
}

/// Claim `n` tokens of `voucher` through `socket` (distinct users): the claim ids.
func claimN(_ socket: String, _ voucher: String, _ n: Int, prefix: String) async throws -> [String] {
    let c = try await RESPClient.connect(socket)
    defer { c.close() }
    var ids: [String] = []
    for i in 0..<n {
        if let id = try await c.send("CLAIM", voucher, "\(prefix)\(i)").string, !id.contains(" ") { ids.append(id) }
    }
    return ids
}

@Suite("Ledger, reconciliation, rehydration", .serialized, .timeLimit(.minutes(6)))
struct LedgerTests {
    @Test func aKafkaModeHostThatNeverComesBackIsReclaimedExactlyAndTheSaleReachesItsLimit() async throws {
        let kafka = try await KafkaBroker()
        let redis = try await RedisServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "gone", limit: 200, perUser: 0, totalLimit: 200, region: "sg")
        let a = try await Quotad(redis: redis, dir: dir, host: "host-a",
                                 extraYAML: "lease: { ttl: 2, safety_margin: 1, min: 50, max: 50 }\n", kafka: kafka, topic: "t-gone",
                                 durability: "kafka")
        let sold = try await claimN(a.socket, "gone", 30, prefix: "a")
        #expect(sold.count == 30)
        try await a.kill9()  // and it never comes back
        let cfg = try operatorConfig(dir, redis: redis, kafka: kafka, topic: "t-gone")
        let held = try await redis.account("gone")
        #expect(held.leases >= 1, "the dead host's lease is still out")
        // Not before its expiry plus the grace: then exactly what it did not sell comes back.
        var out = ""
        try await eventually("every lease of the dead host is reclaimed", timeout: .seconds(30)) {
            let (st, o) = try await quotactl(["reconcile", "--repair", "--grace", "1", "--config", cfg])
            if o.contains("reclaimed:") { out = o }
            let open = try await redis.account("gone").leases
            return st == 0 && open == 0
        }
        #expect(out.contains("proven by durability kafka"), "\(out)")
        let after = try await redis.account("gone")
        #expect(after.leases == 0 && after.pool == 170, "pool \(after.pool): exactly the unserved tokens came back")
        // A fresh sidecar sells the rest: the sale ends exactly at the limit.
        let b = try await Quotad(redis: redis, dir: dir, host: "host-b", kafka: kafka, topic: "t-gone")
        let c = try await RESPClient.connect(b.socket)
        let rest = try await claimUntilSoldOut(c, voucher: "gone", user: "b")
        c.close()
        #expect(sold.count + rest.ids.count == 200)
        #expect(try await b.stop() == 0)
        let s = try await streamed(kafka, topic: "t-gone")
        #expect(s.net == 200)
        #expect(try await redis.audit("gone", netClaimed: 200) == [])
        let (st, o) = try await quotactl(["reconcile", "--config", cfg])
        #expect(st == 0 && o.contains("balanced"), "\(o)")
    }

    @Test func aJournalModeHostIsUnprovenUntilItsJournalIsShippedThenRepairedExactly() async throws {
        let kafka = try await KafkaBroker()
        let redis = try await RedisServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "ship", limit: 200, perUser: 0, totalLimit: 200, region: "sg")
        let a = try await Quotad(redis: redis, dir: dir, host: "host-a",
                                 extraYAML: "lease: { ttl: 2, safety_margin: 1, min: 50, max: 50 }\n", kafka: kafka, topic: "t-ship")
        let sold = try await claimN(a.socket, "ship", 30, prefix: "a")
        try await a.kill9()
        let cfg = try operatorConfig(dir, redis: redis, kafka: kafka, topic: "t-ship")
        try await Task.sleep(for: .seconds(4))
        let (st1, o1) = try await quotactl(["reconcile", "--repair", "--grace", "1", "--config", cfg])
        #expect(st1 == 0 && o1.contains("UNPROVEN"), "journal mode: Kafka may lack claims of a dead host\n\(o1)")
        #expect(try await redis.account("ship").leases >= 1, "left alone")
        let (st2, o2) = try await quotactl(["journal", "ship", "--dir", a.journalDir, "--config", cfg])
        #expect(st2 == 0, "\(o2)")
        var o3 = ""
        try await eventually("every lease of the dead host is reclaimed", timeout: .seconds(30)) {
            let (st, o) = try await quotactl(["reconcile", "--repair", "--grace", "1", "--config", cfg])
            if o.contains("reclaimed:") { o3 = o }
            let open = try await redis.account("ship").leases
            return st == 0 && open == 0
        }
        #expect(o3.contains("proven by shipped journal"), "\(o3)")
        let after = try await redis.account("ship")
        #expect(after.leases == 0 && after.pool == 200 - sold.count, "pool \(after.pool)")
        let b = try await Quotad(redis: redis, dir: dir, host: "host-b", kafka: kafka, topic: "t-ship")
        let c = try await RESPClient.connect(b.socket)
        let rest = try await claimUntilSoldOut(c, voucher: "ship", user: "b")
        c.close()
        #expect(sold.count + rest.ids.count == 200)
        #expect(try await b.stop() == 0)
        #expect(try await redis.audit("ship", netClaimed: 200) == [])
    }

    @Test func aRedisRestartedEmptyMidSaleFailsClosedThenIsRehydratedAndTheSaleEndsAtItsLimit() async throws {
        let kafka = try await KafkaBroker()
        let redis = try await RedisServer()
        let dir = TempDir()
        let cfg = try operatorConfig(dir, redis: redis, kafka: kafka, topic: "t-rh")
        // Created through quotactl with the config: the definition is on the stream (the ledger keeps it).
        let (cst, cout) = try await quotactl(["voucher", "create", "rh", "--limit", "600", "--per-user", "3", "--config", cfg])
        #expect(cst == 0, "\(cout)")
        let a = try await Quotad(redis: redis, dir: dir, host: "host-a", kafka: kafka, topic: "t-rh")
        let b = try await Quotad(redis: redis, dir: dir, host: "host-b", kafka: kafka, topic: "t-rh", durability: "kafka")
        var attempts: [(user: String, host: Int)] = []
        for u in 0..<100 { attempts.append(("u\(u)", u % 2)) }
        let first = try await claimAttempts(attempts, sidecars: [a, b], voucher: "rh", connections: 20)
        #expect(first.perUser.values.reduce(0) { $0 + $1.count } == 100)
        // A connection that lives across the loss and the rehydration (a pooled app connection).
        let kept = try await RESPClient.connect(a.socket)
        #expect(try await kept.send("CLAIM", "rh", "k0").errorCode == nil)

        try await redis.restartEmpty()
        try await eventually("both sidecars fail closed") {
            let la = try await a.stat("region_lost")
            let lb = try await b.stat("region_lost")
            return la == 1 && lb == 1
        }
        let during = try await claimAttempts((0..<40).map { ("v\($0)", $0 % 2) }, sidecars: [a, b], voucher: "rh", connections: 20)
        #expect(during.perUser.isEmpty && during.errors == ["UNAVAILABLE": 40], "\(during.errors)")
        try await eventually("the journals are on Kafka") {
            let ja = try await a.stat("journal_unshipped_claims")
            let jb = try await b.stat("journal_unshipped_claims")
            return ja == 0 && jb == 0
        }
        let (st, out) = try await quotactl(["rehydrate", "--region", "sg", "--confirm-shipped", "--config", cfg])
        #expect(st == 0 && out.contains("rebuilt"), "\(out)")
        try await eventually("the sidecars serve again", timeout: .seconds(20)) {
            let c = try await RESPClient.connect(a.socket)
            defer { c.close() }
            return try await c.send("CLAIM", "rh", "u0").errorCode == nil
        }
        // Found by review (ea1a66d): the kept connection's runtime from before the loss stayed in use.
        try await eventually("the kept connection is served again", timeout: .seconds(20)) {
            try await kept.send("CLAIM", "rh", "k1").errorCode == nil
        }
        kept.close()
        // The rest of the sale: 300 users, five tries each, over both hosts, until nothing is left.
        var rest: [(user: String, host: Int)] = []
        for k in 0..<5 { for u in 0..<300 { rest.append(("u\(u)", (u + k) % 2)) } }
        _ = try await claimAttempts(rest, sidecars: [a, b], voucher: "rh", connections: 20)
        #expect(try await a.stop() == 0)
        #expect(try await b.stop() == 0)
        let s = try await streamed(kafka, topic: "t-rh")
        #expect(s.net == 600, "net claims \(s.net): the sale ends exactly at its limit across the loss")
        var perUser: [String: Int] = [:]
        for m in try await kafka.consume("t-rh") {
            if let e = LedgerEvent(json: m.value), case .claimed(let id, _, let u, let q, _, _, _, _) = e, !s.unclaimed.contains(id) {
                perUser[u, default: 0] += q
            }
        }
        #expect(perUser.values.allSatisfy { $0 <= 3 }, "per-user limit held across the loss: max \(perUser.values.max() ?? 0)")
        #expect(try await redis.audit("rh", netClaimed: 600) == [])
    }

    @Test func theLedgerKilledAtRandomPointsLosesAndDoublesNothing() async throws {
        let kafka = try await KafkaBroker()
        let redis = try await RedisServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "lk", limit: 100_000, perUser: 0, totalLimit: 100_000, region: "sg")
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a", extraYAML: "lease: { min: 500, max: 5000 }\n",
                                 kafka: kafka, topic: "t-lk")
        let cfg = try operatorConfig(dir, redis: redis, kafka: kafka, topic: "t-lk")
        // The sale: 20 pipelined connections until it sells out.
        let sale = Task {
            try await withThrowingTaskGroup(of: Int.self) { g in
                for k in 0..<20 {
                    g.addTask {
                        let c = try await RESPClient.connect(q.socket)
                        defer { c.close() }
                        var n = 0
                        var i = 0
                        while true {
                            let r = try await c.pipeline((0..<50).map { j in ["CLAIM", "lk", "c\(k)-\(i + j)"] })
                            i += 50
                            n += r.filter { $0.errorCode == nil }.count
                            if r.contains(where: { $0.errorCode == "SOLDOUT" }) { return n }
                        }
                    }
                }
                return try await g.reduce(0, +)
            }
        }
        // The ledger, killed -9 at random moments while it writes.
        for round in 0..<5 {
            let p = try ChildProcess(Bin.path("quota-ledger"), ["--config", cfg, "--quiet"], log: dir.file("ledger-\(round).log"))
            try await Task.sleep(for: .milliseconds(Int64.random(in: 700...2500)))
            p.signal(SIGKILL)
            _ = try await p.wait()
        }
        let sold = try await sale.value
        #expect(sold == 100_000)
        #expect(try await q.stop() == 0)
        let p = try ChildProcess(Bin.path("quota-ledger"), ["--config", cfg, "--once", "--quiet"], log: dir.file("ledger-final.log"))
        #expect(try await p.wait(timeout: .seconds(300)) == 0, "\(p.output)")
        let onTopic = try await streamed(kafka, topic: "t-lk")
        let db = try await openLedgerDatabase(url: "sqlite://\(dir.file("ledger.db"))", logger: .init(label: "t"))
        let ledger = Ledger(db: db)
        let counts = try await ledger.counts()
        #expect(counts.claims == onTopic.claimed.count, "\(counts.claims) rows, \(onTopic.claimed.count) distinct claim ids on the topic")
        #expect(try await ledger.netClaimed(region: "sg")["lk"] == 100_000, "every claim once, none doubled")
        let shares = try await db.execute("SELECT COALESCE(SUM(qty), 0) FROM claim_shares", [])
        #expect(shares.first?[0].int == 100_000, "lease shares counted once")
        await db.close()
    }

    @Test func theLedgerWritesToPostgreSQLTheSameWay() async throws {
        let kafka = try await KafkaBroker()
        let redis = try await RedisServer()
        let pg = try await PostgresServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "pg", limit: 5000, perUser: 0, totalLimit: 5000, region: "sg")
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a", kafka: kafka, topic: "t-pg")
        let ids = try await claimN(q.socket, "pg", 500, prefix: "u")
        let c = try await RESPClient.connect(q.socket)
        #expect(try await c.send("UNCLAIM", ids[0]) == .simpleString("OK"))
        c.close()
        #expect(try await q.stop() == 0)
        let cfg = try operatorConfig(dir, redis: redis, kafka: kafka, topic: "t-pg", ledger: pg.url)
        let first = try ChildProcess(Bin.path("quota-ledger"), ["--config", cfg, "--once", "--quiet"], log: dir.file("l1.log"))
        #expect(try await first.wait(timeout: .seconds(120)) == 0, "\(first.output)")
        // Read again from scratch: nothing doubles.
        let second = try ChildProcess(Bin.path("quota-ledger"), ["--config", cfg, "--once", "--quiet"], log: dir.file("l2.log"))
        #expect(try await second.wait(timeout: .seconds(120)) == 0)
        let db = try await openLedgerDatabase(url: pg.url, logger: .init(label: "t"))
        let ledger = Ledger(db: db)
        let counts = try await ledger.counts()
        #expect(counts.claims == 500 && counts.cancellations == 1)
        #expect(try await ledger.netClaimed(region: "sg")["pg"] == 499)
        await db.close()
        let (st, out) = try await quotactl(["reconcile", "--config", cfg, "--no-catch-up"])
        #expect(st == 0 && out.contains("balanced"), "\(out)")
        try await pg.stop()
    }
}
