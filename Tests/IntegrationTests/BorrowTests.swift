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
    final class Regions: @unchecked Sendable {
        let sg: RedisServer
        let id: RedisServer
        let dir = TempDir()
        let ctlConfig: String

        init() async throws {
            sg = try await RedisServer()
            id = try await RedisServer()
            ctlConfig = dir.file("quotactl.yaml")
            try yaml(host: "quotactl", region: "sg", borrow: false).write(toFile: ctlConfig, atomically: true, encoding: .utf8)
        }

        func yaml(host: String, region: String, borrow: Bool) -> String {
            """
            host_id: \(host)
            region: \(region)
            regions:
              sg: { redis: "\(sg.url)" }
              id: { redis: "\(id.url)" }
            socket: { path: \(dir.file("\(host).sock")) }
            durability: journal
            journal: { dir: \(dir.file("journal-\(host)")) }
            borrow: \(borrow)
            lease: { min: 10, max: 50 }
            avail_refresh: 0.2

            """
        }

        func sidecar(_ host: String, region: String, borrow: Bool, failpoint: String? = nil) async throws -> Quotad {
            let cfg = dir.file("\(host).yaml")
            try yaml(host: host, region: region, borrow: borrow).write(toFile: cfg, atomically: true, encoding: .utf8)
            return try await Quotad(config: cfg, socket: dir.file("\(host).sock"), host: host, log: dir.file("\(host).log"),
                                    environment: failpoint.map { ["QUOTAD_FAILPOINT": $0] } ?? [:])
        }

        func ctl(_ args: [String]) async throws -> (Int32, String) { try await quotactl(args + ["--config", ctlConfig]) }
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
        let r = try await Regions()
        let (st, out) = try await r.ctl(["voucher", "create", "v", "--limit", "1000", "--region", "sg=150", "--region", "id=850"])
        #expect(st == 0, "\(out)")
        let sg = try await r.sidecar("sg-1", region: "sg", borrow: true)
        let id = try await r.sidecar("id-1", region: "id", borrow: false)
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
        let r = try await Regions()
        #expect(try await r.ctl(["voucher", "create", "v", "--limit", "600", "--region", "sg=100", "--region", "id=500"]).0 == 0)
        let dying = try await r.sidecar("sg-1", region: "sg", borrow: true, failpoint: failpoint)
        let before = try await Self.sellOut(dying, voucher: "v", conns: 4, tag: "a")
        try await eventually("the sidecar died at the failpoint", timeout: .seconds(30)) { !dying.child.isRunning }
        let inFlight = try await r.id.store.transfers(voucher: "v")
        #expect(inFlight.count == 1 && inFlight[0].state == .taken, "\(inFlight)")
        let (st, out) = try await r.ctl(["audit", "v"])
        #expect(st == 0, "balanced with the transfer in flight: \(out)")
        let again = try await r.sidecar("sg-1", region: "sg", borrow: true)
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
