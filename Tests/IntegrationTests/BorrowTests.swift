import Foundation
import Glibc
import QuotaClient
import QuotaHarness
import QuotaRESP
import QuotaRedis
import Testing

/// `borrow: true`: a sidecar whose region is sold out moves unleased quota from another region, with the
/// transfer records of `quotactl rebalance`, never creating quota; a sidecar killed between the steps
/// leaves the tokens in flight (counted by the audit), and the next borrow finishes them.
@Suite(.serialized, .timeLimit(.minutes(3)))
struct BorrowTests {
    /// Two regions, each its own Redis; sidecars journal their claims and borrow when asked to.
    typealias Regions = RebalanceTests.TwoRegions

    static func regions() async throws -> Regions {
        try await Regions(settings: { host, dir in
            "durability: journal\njournal: { dir: \(dir.file("journal-\(host)")) }\nlease: { min: 10, max: 50 }\n"
                + "avail_refresh: 0.2\n"
        })
    }

    /// Claims on `conns` connections to `q` until each hears SOLDOUT (or its connection breaks); the claim ids.
    static func sellOut(_ q: Quotad, voucher: String, conns: Int, tag: String) async throws -> [String] {
        try await withThrowingTaskGroup(of: [String].self) { g in
            for i in 0..<conns {
                g.addTask {
                    guard let c = try? await RESPClient.connect(q.socket) else { return [] }
                    defer { c.close() }
                    var ids: [String] = []
                    var n = 0
                    while true {
                        n += 1
                        guard let r = try? await c.send("CLAIM", voucher, "\(tag)\(i)-\(n)") else { return ids }
                        if let code = r.errorCode {
                            if code == "SOLDOUT" { return ids }
                            try await Task.sleep(for: .milliseconds(5))
                            continue
                        }
                        if case .bulkString(let b?) = r { ids.append(String(buffer: b)) }
                    }
                }
            }
            var all: [String] = []
            for try await r in g { all += r }
            return all
        }
    }

    @Test func aSoldOutRegionBorrowsFromAnotherAndTheGlobalTotalIsTheLimit() async throws {
        let r = try await BorrowTests.regions()
        let (st, out) = try await r.ctl(["voucher", "create", "v", "--limit", "1000", "--region", "sg=150", "--region", "id=850"])
        #expect(st == 0, "\(out)")
        let sg = try await r.sidecar("sg-1", region: "sg", extra: "borrow: true\n")
        let id = try await r.sidecar("id-1", region: "id")
        async let sgSold = Self.sellOut(sg, voucher: "v", conns: 8, tag: "s")
        async let idSold = Self.sellOut(id, voucher: "v", conns: 2, tag: "i")
        let (a, b) = try await (sgSold, idSold)
        #expect(a.count + b.count == 1000, "exactly the global limit: sg \(a.count) + id \(b.count)")
        #expect(Set(a + b).count == a.count + b.count)
        #expect(a.count > 150, "sg sold more than its allocation: it borrowed (\(a.count))")
        let borrowed = try await sg.stat("borrowed_tokens")
        #expect(try await sg.stat("borrow_transfers") > 0)
        #expect(try await sg.stop() == 0)
        #expect(try await id.stop() == 0)
        let transfers = try await r.id.store.transfers(voucher: "v")
        #expect(!transfers.isEmpty && transfers.allSatisfy { $0.direction == .out && $0.state == .done && $0.peer == "sg" })
        let (st2, out2) = try await r.ctl(["audit", "v"])
        #expect(st2 == 0, "\(out2)")
        let (st3, out3) = try await r.ctl(["voucher", "show", "v", "--global"])
        #expect(st3 == 0, "\(out3)")
        let sgRec = try #require(try await r.sg.store.voucher("v"))
        let idRec = try #require(try await r.id.store.voucher("v"))
        #expect(sgRec.limit + idRec.limit == 1000, "allocations still add up to the limit: \(sgRec.limit) + \(idRec.limit)")
        #expect(sgRec.pool == 0 && idRec.pool == 0)
        #expect(sgRec.limit - 150 == borrowed, "what sg's allocation grew by is what it borrowed: \(borrowed)")
    }

    /// kill -9 between the steps of a borrow (after the take, after the give): the tokens are in flight,
    /// the books balance, and the restarted sidecar's next borrow finishes the transfer; the sale still
    /// ends at exactly the limit.
    @Test(arguments: ["borrow-after-take", "borrow-after-give"])
    func aSidecarKilledBetweenBorrowStepsLosesNothing(failpoint: String) async throws {
        let r = try await BorrowTests.regions()
        #expect(try await r.ctl(["voucher", "create", "v", "--limit", "600", "--region", "sg=100", "--region", "id=500"]).0 == 0)
        let dying = try await r.sidecar("sg-1", region: "sg", extra: "borrow: true\n", failpoint: failpoint)
        let before = try await Self.sellOut(dying, voucher: "v", conns: 4, tag: "a")
        try await eventually("the sidecar died at the failpoint", timeout: .seconds(30)) { !dying.child.isRunning }
        let inFlight = try await r.id.store.transfers(voucher: "v")
        #expect(inFlight.count == 1 && inFlight[0].state == .taken, "\(inFlight)")
        let (st, out) = try await r.ctl(["audit", "v"])
        #expect(st == 0, "balanced with the transfer in flight: \(out)")
        let again = try await r.sidecar("sg-1", region: "sg", extra: "borrow: true\n")
        let after = try await Self.sellOut(again, voucher: "v", conns: 4, tag: "b")
        #expect(before.count + after.count == 600, "every token sold once: \(before.count) + \(after.count)")
        #expect(Set(before + after).count == before.count + after.count)
        #expect(try await again.stop() == 0)
        let done = try await r.id.store.transfers(voucher: "v")
        #expect(done.allSatisfy { $0.state == .done }, "\(done)")
        let (st2, out2) = try await r.ctl(["audit", "v"])
        #expect(st2 == 0, "\(out2)")
    }
}

/// Findings of the review of borrowing, each a test that failed before its fix.
@Suite(.serialized, .timeLimit(.minutes(3)))
struct BorrowReviewTests {
    typealias Regions = BorrowTests.Regions

    /// Another sidecar finished this one's transfer while it was between steps: the tokens reached the
    /// region, so its claim is served (the source still has quota), not answered SOLDOUT.
    @Test func aBorrowFinishedByAnotherSidecarStillServesTheClaim() async throws {
        let r = try await BorrowTests.regions()
        #expect(try await r.ctl(["voucher", "create", "v", "--limit", "100", "--region", "sg=0", "--region", "id=100"]).0 == 0)
        let extra = "limits: { claim_timeout_ms: 15000 }\n"
        let slow = try await r.sidecar("sg-slow", region: "sg", extra: "borrow: true\n" + extra, failpoint: "borrow-pause-after-take")
        let fast = try await r.sidecar("sg-fast", region: "sg", extra: "borrow: true\n" + extra)
        let c1 = try await RESPClient.connect(slow.socket)
        let c2 = try await RESPClient.connect(fast.socket)
        defer { c1.close(); c2.close() }
        async let first = c1.send("CLAIM", "v", "a")
        try await eventually("the slow sidecar took a transfer", timeout: .seconds(10)) {
            !(try await r.id.store.transfers(voucher: "v")).isEmpty
        }
        #expect(try await c2.send("CLAIM", "v", "b").errorCode == nil, "the fast sidecar finished the transfer and sold")
        let reply = try await first
        #expect(reply.errorCode == nil, "the slow sidecar's claim is served, the source still has quota: \(reply)")
        #expect(try await slow.stop() == 0)
        #expect(try await fast.stop() == 0)
        #expect(try await r.ctl(["audit", "v"]).0 == 0)
    }

    /// The source's Redis does not answer for a while: the borrowing host cannot tell the quota is gone, so
    /// its claims wait (or fail closed) and the sale goes on when the source answers again; never SOLDOUT early.
    @Test func aSourceThatDoesNotAnswerIsWaitedForNotSoldOut() async throws {
        let r = try await BorrowTests.regions()
        #expect(try await r.ctl(["voucher", "create", "v", "--limit", "250", "--region", "sg=50", "--region", "id=200"]).0 == 0)
        let sg = try await r.sidecar("sg-1", region: "sg", extra: "borrow: true\n")
        _ = try await r.id.store.connection.send(["CLIENT", "PAUSE", "2500", "ALL"])
        let sold = try await BorrowTests.sellOut(sg, voucher: "v", conns: 4, tag: "p")
        #expect(sold.count == 250, "everything sold once the source answered: \(sold.count)")
        #expect(try await sg.stop() == 0)
        #expect(try await r.ctl(["audit", "v"]).0 == 0)
    }

    /// A source whose lease sequence went back (a failover to a replica that lost writes; its pool may
    /// count tokens already sold) lends nothing more.
    @Test func aSourceWhoseLeaseSequenceWentBackLendsNothing() async throws {
        let r = try await BorrowTests.regions()
        #expect(try await r.ctl(["voucher", "create", "v", "--limit", "520", "--region", "sg=20", "--region", "id=500"]).0 == 0)
        let idHost = try await r.sidecar("id-1", region: "id")
        let ci = try await RESPClient.connect(idHost.socket)
        #expect(try await ci.send("CLAIM", "v", "i").errorCode == nil)
        ci.close()
        #expect(try await idHost.stop() == 0)
        let sg = try await r.sidecar("sg-1", region: "sg", extra: "borrow: true\nlimits: { claim_timeout_ms: 500 }\n")
        let c = try await RESPClient.connect(sg.socket)
        defer { c.close() }
        for i in 0..<30 { #expect(try await c.send("CLAIM", "v", "u\(i)").errorCode == nil, "claim \(i)") }
        let before = try await r.id.store.transfers(voucher: "v").count
        #expect(before >= 1, "sg borrowed from id")
        // What a replica that lost the last grants holds: a lower sequence and a fuller pool.
        _ = try await r.id.store.connection.send(["HINCRBY", "quota:{v}", "lease_seq", "-1"])
        _ = try await r.id.store.connection.send(["HINCRBY", "quota:{v}", "pool", "1"])
        var codes: [String: Int] = [:]
        for i in 0..<40 {
            let reply = try await c.send("CLAIM", "v", "w\(i)")
            codes[reply.errorCode ?? "OK", default: 0] += 1
        }
        #expect(try await r.id.store.transfers(voucher: "v").count == before, "no borrow from the source that went back")
        #expect(codes["SOLDOUT"] == nil, "nobody can tell the quota is gone: \(codes)")
        #expect((codes["UNAVAILABLE"] ?? 0) > 0, "claims fail closed once the borrowed tokens are sold: \(codes)")
        _ = try await sg.stop()
    }

    /// A transfer toward this region that can never be finished (taken for another generation of the
    /// voucher here) is left to the operator; borrowing from its source goes on, and the sale ends SOLDOUT.
    @Test func anUnfinishableTransferDoesNotStopBorrowingFromItsSource() async throws {
        let r = try await BorrowTests.regions()
        #expect(try await r.ctl(["voucher", "create", "v", "--limit", "600", "--region", "sg=100", "--region", "id=500"]).0 == 0)
        let gen = try #require(try await r.id.store.voucher("v")).generation
        let stuck = try await r.id.store.takeTransfer(voucher: "v", id: "t-stuck", to: "sg", amount: 10, gen: gen, toGeneration: "bogus")
        guard case .applied = stuck else { throw TestError.failed("\(stuck)") }
        let sg = try await r.sidecar("sg-1", region: "sg", extra: "borrow: true\n")
        let sold = try await BorrowTests.sellOut(sg, voucher: "v", conns: 4, tag: "s")
        #expect(sold.count == 590, "everything but the stuck transfer: \(sold.count)")
        #expect(try await sg.stop() == 0)
        let (st, out) = try await r.ctl(["audit", "v"])
        #expect(st == 0 && out.contains("in flight"), "\(out)")
    }

    /// A sharded source lends from whichever shard has quota, not only shard 0.
    @Test func aShardedSourceLendsFromAShardThatHasQuota() async throws {
        let r = try await BorrowTests.regions()
        #expect(try await r.ctl(["voucher", "create", "v", "--limit", "500", "--region", "sg=100", "--region", "id=400",
                                 "--shards", "2"]).0 == 0)
        let gen = try #require(try await r.id.store.voucher("v")).generation
        let drainer = (0..<1000).map { "d\($0)" }.first { QuotaStore.homeShard(host: $0, shards: 2) == 0 }!
        guard case .granted(let g) = try await r.id.store.lease(voucher: "v", host: drainer, req: "d", want: 200, need: 200,
                                                                 ttl: .seconds(60), gen: gen), g.granted == 200,
              QuotaStore.shardIndex(ofLease: g.id) == 0
        else { throw TestError.failed("id's shard 0 not drained") }
        let sg = try await r.sidecar("sg-1", region: "sg", extra: "borrow: true\n")
        let sold = try await BorrowTests.sellOut(sg, voucher: "v", conns: 4, tag: "s")
        #expect(sold.count == 300, "sg's 100 and id's shard 1: \(sold.count)")
        #expect(try await sg.stop() == 0)
        #expect(try await r.ctl(["audit", "v"]).0 == 0)
    }
}
