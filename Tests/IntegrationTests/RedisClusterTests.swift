import Foundation
import Glibc
import NIOCore
import QuotaClient
import QuotaHarness
import QuotaRESP
import QuotaRedis
import Testing

/// Claims on one connection until SOLDOUT, as user `user(n)` for the n-th claim; returns the claim ids
/// and the error codes seen. Stops after `maxErrors` errors other than SOLDOUT.
private func claimAll(_ c: RESPClient, voucher: String, maxErrors: Int = 5000, user: (Int) -> String) async throws
    -> (ids: [String], errors: [String: Int])
{
    var ids: [String] = []
    var errors: [String: Int] = [:]
    var n = 0
    var failures = 0
    while true {
        let r = try await c.send("CLAIM", voucher, user(n), "REQ", "r\(n)-\(user(n))")
        n += 1
        if let code = r.errorCode {
            errors[code, default: 0] += 1
            if code == "SOLDOUT" { return (ids, errors) }
            failures += 1
            if failures > maxErrors { return (ids, errors) }
            try await Task.sleep(for: .milliseconds(5))
            continue
        }
        guard case .bulkString(let b?) = r else { throw TestError.failed("unexpected reply \(r)") }
        ids.append(String(buffer: b))
    }
}

@Suite("Redis Cluster: routing and slots")
struct ClusterSlotTests {
    @Test func slotsAreCRC16OfTheHashTagAsRedisComputesThem() {
        #expect(ClusterSlot.crc16(Array("123456789".utf8)) == 0x31C3)
        #expect(ClusterSlot.of("foo") == 12182)
        #expect(ClusterSlot.of("bar") == 5061)
        #expect(ClusterSlot.of("{user1000}.following") == ClusterSlot.of("{user1000}.followers"))
        #expect(ClusterSlot.of("foo{}{bar}") == ClusterSlot.of("foo{}{bar}"), "an empty tag hashes the whole key")
        #expect(ClusterSlot.of("foo{{bar}}zap") == ClusterSlot.of("{bar"))
        #expect(ClusterSlot.of("quota:{v1}") == ClusterSlot.of("quota:{v1}:leases"))
        #expect(ClusterSlot.routingKey(["EVALSHA", "abc", "2", "quota:{v}", "x", "arg"]) == "quota:{v}")
        #expect(ClusterSlot.routingKey(["EVALSHA", "abc", "0", "arg"]) == nil)
        #expect(ClusterSlot.routingKey(["TIME"]) == nil)
        #expect(ClusterSlot.routingKey(["HGETALL", "quota:{v}"]) == "quota:{v}")
    }

    @Test func replicasAreReadFromClusterNodesWithoutFailedOnes() {
        let text = """
            e7d1 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460
            07c3 127.0.0.1:30004@31004,node-4 slave e7d1 0 1426238317239 4 connected
            67ed :30005@31005 slave 292f 0 1426238316232 5 connected
            6ec2 127.0.0.1:30006@31006 slave,fail 824f 1426238316232 1426238315000 6 disconnected
            9a1b 10.0.0.7:30007@31007 replica e7d1 0 1426238316232 7 connected
            """
        #expect(RedisClusterRouter.parseReplicas(text, askedHost: "10.1.1.1")
                == ["10.0.0.7:30007", "10.1.1.1:30005", "127.0.0.1:30004"])
        #expect(RedisClusterRouter.parseReplicas("garbage\n\n", askedHost: "h").isEmpty)
    }

    @Test func clusterURLsParseAndOtherFormsStayAsTheyWere() throws {
        let e = try RedisEndpoint(url: "redis-cluster://127.0.0.1:7000, 127.0.0.1:7001,unix:///tmp/r.sock")
        #expect(e == .cluster(seeds: [.tcp(host: "127.0.0.1", port: 7000), .tcp(host: "127.0.0.1", port: 7001), .unix(path: "/tmp/r.sock")]))
        #expect(e.description == "redis-cluster://127.0.0.1:7000,127.0.0.1:7001,unix:///tmp/r.sock")
        #expect(throws: RedisError.self) { try RedisEndpoint(url: "redis-cluster://") }
        #expect(throws: RedisError.self) { try RedisEndpoint(url: "redis-cluster://a:1,,b:2") }
        #expect(try RedisEndpoint(url: "redis://h:1") == .tcp(host: "h", port: 1))
        #expect(try RedisEndpoint(url: "unix:///x.sock") == .unix(path: "/x.sock"))
    }

    @Test func aBadClusterURLIsRefusedAtStartNamingTheKey() async throws {
        let dir = TempDir()
        for bad in ["redis-cluster://", "redis-cluster://127.0.0.1:7000,,127.0.0.1:7001", "redis-cluster://127.0.0.1"] {
            let config = dir.file("bad.yaml")
            try "region: sg\nregions:\n  sg: { redis: \"\(bad)\" }\nsocket: { path: \(dir.file("q.sock")) }\ndurability: none\n"
                .write(toFile: config, atomically: true, encoding: .utf8)
            let (st, out) = try await Quotad.refusedStart(config: config, log: dir.file("bad.log"))
            #expect(st != 0)
            #expect(out.contains("regions.sg.redis"), "\(out)")
        }
    }
}

@Suite("quotad against a real Redis Cluster", .serialized, .timeLimit(.minutes(3)))
struct RedisClusterTests {
    /// Keys land where the cluster says, a per-user batch spanning slots is split, scripts load on every master.
    @Test func storeRoutesEveryKeyToTheMasterOfItsSlot() async throws {
        let cluster = try await RedisClusterServer(masters: 3)
        let store = cluster.store
        for i in 0..<30 {
            #expect(try await store.createVoucher(id: "v\(i)", limit: 10, perUser: 0, totalLimit: 10, region: "sg"))
        }
        // Each voucher's meta key is on the master of its slot, and only there.
        for i in 0..<30 {
            let master = try await cluster.masterPort(ofSlot: RedisClusterServer.slot(ofVoucher: "v\(i)"))
            #expect(try await cluster.command(master, "EXISTS", "quota:{v\(i)}") == .integer(1))
        }
        #expect(try await store.voucherIDs().count == 30)
        let recs = try await store.vouchers((0..<30).map { "v\($0)" })
        #expect(recs.allSatisfy { $0?.pool == 10 })
        // 64 groups over many slots, on all three masters: one batch.
        let checks = (0..<200).map {
            QuotaStore.UserCheck(voucher: "v0", group: QuotaStore.userGroup(user: "u\($0 % 50)", groups: 64), limit: 3,
                                 user: "u\($0 % 50)", qty: 1, claimID: "c\($0)")
        }
        let out = try await store.checkUsers(checks)
        #expect(out.filter { $0 == .counted }.count == 150, "three per user counted")
        #expect(out.filter { $0 == .overLimit }.count == 50)
        #expect(try await store.checkUsers(checks) == out, "checks are idempotent per claim id")
        #expect(try await store.durabilityProblems().isEmpty)

        // Scripts forgotten by every master (a promoted replica, a new node): NOSCRIPT, then EVAL.
        for m in try await cluster.masterPorts() { try await cluster.command(m, "SCRIPT", "FLUSH") }
        #expect(try await store.checkUsers(checks) == out)

        // A slot moved behind the store's back: MOVED, the map is read again, the call succeeds.
        let slot = RedisClusterServer.slot(ofVoucher: "v0")
        let from = try await cluster.masterPort(ofSlot: slot)
        let to = try await cluster.masterPorts().first { $0 != from }!
        try await cluster.migrate(slot: slot, to: to)
        let redirects = store.connection.cluster!.redirects
        #expect(try await store.voucher("v0")?.pool == 10)
        #expect(store.connection.cluster!.redirects == redirects + 1, "one MOVED followed")
        #expect(store.connection.cluster!.master(ofSlot: slot) == "127.0.0.1:\(to)")
        #expect(try await store.voucher("v0")?.pool == 10)
        #expect(store.connection.cluster!.redirects == redirects + 1, "the map was updated: no second MOVED")
    }

    /// Issue 12's multi-region setup: region sg on a standalone Redis, region id on a 3-master cluster with a
    /// replica each, two sidecars in each region selling at once, 3,000 moved from sg to id mid-sale; every
    /// region sells exactly its final allocation and the global books balance.
    @Test func twoRegionsOneOfThemAClusterSellTheGlobalLimitWithQuotaMovedMidSale() async throws {
        let sg = try await RedisServer()
        let id = try await RedisClusterServer(masters: 3, replicas: 1)
        let dir = TempDir()
        func yaml(_ host: String, _ region: String) -> String {
            """
            host_id: \(host)
            region: \(region)
            regions:
              sg: { redis: "\(sg.url)" }
              id: { redis: "\(id.url)" }
            socket: { path: \(dir.file("\(host).sock")) }
            durability: none
            lease: { min: 5, max: 40 }
            avail_refresh: 0.2

            """
        }
        let ctlConfig = dir.file("quotactl.yaml")
        try yaml("quotactl", "sg").write(toFile: ctlConfig, atomically: true, encoding: .utf8)
        let create = try await quotactl(["voucher", "create", "gr", "--limit", "30000", "--region", "sg=18000", "--region", "id=12000",
                                         "--config", ctlConfig])
        #expect(create.0 == 0, "\(create.1)")
        var sidecars: [(Quotad, String)] = []
        for (h, r) in [("sg-a", "sg"), ("sg-b", "sg"), ("id-a", "id"), ("id-b", "id")] {
            try yaml(h, r).write(toFile: dir.file("\(h).yaml"), atomically: true, encoding: .utf8)
            sidecars.append((try await Quotad(config: dir.file("\(h).yaml"), socket: dir.file("\(h).sock"), host: h,
                                              log: dir.file("\(h).log")), r))
        }
        let moved = Flag()
        let perRegion = try await withThrowingTaskGroup(of: (String, [String]).self) { g in
            for i in 0..<40 {
                let (q, region) = sidecars[i % 4]
                g.addTask {
                    let c = try await RESPClient.connect(q.socket)
                    defer { c.close() }
                    let (ids, errors) = try await claimAll(c, voucher: "gr") { "w\(i)-u\($0)" }
                    #expect(errors.keys.allSatisfy { $0 == "SOLDOUT" }, "\(errors)")
                    return (region, ids)
                }
            }
            g.addTask {
                // Mid-sale: once a sixth of sg's pool is out in leases (its sidecars sell on meanwhile).
                try await eventually("sg's sale under way", timeout: .seconds(60)) {
                    (try await sg.store.voucher("gr")?.pool ?? 0) <= 15_000
                }
                let (st, out) = try await quotactl(["rebalance", "gr", "--from", "sg", "--to", "id", "--amount", "3000",
                                                    "--config", ctlConfig])
                #expect(st == 0 && out.contains("done"), "\(out)")
                moved.set()
                return ("", [])
            }
            var out: [String: [String]] = [:]
            for try await (r, ids) in g { out[r, default: []] += ids }
            return out
        }
        #expect(moved.isSet)
        // Clients told SOLDOUT before the 3,000 arrived in id left: a last pass on every sidecar sells the rest.
        var tail: [String: [String]] = [:]
        for (q, region) in sidecars {
            let c = try await RESPClient.connect(q.socket)
            try await eventually("\(q.host) sold out", timeout: .seconds(20)) {
                let (ids, _) = try await claimAll(c, voucher: "gr") { "tail-\(q.host)-\(tail[region, default: []].count)-\($0)" }
                tail[region, default: []] += ids
                return ids.isEmpty
            }
            c.close()
        }
        let sgIDs = perRegion["sg", default: []] + tail["sg", default: []]
        let idIDs = perRegion["id", default: []] + tail["id", default: []]
        #expect(sgIDs.count == 15_000, "sg sells its allocation after the move: \(sgIDs.count)")
        #expect(idIDs.count == 15_000, "id sells its allocation after the move: \(idIDs.count)")
        #expect(Set(sgIDs + idIDs).count == 30_000, "30,000 distinct claims: the global limit")
        for (q, _) in sidecars { #expect(try await q.stop() == 0) }
        let (ast, aout) = try await quotactl(["audit", "gr", "--json", "--config", ctlConfig])
        let report = try JSONSerialization.jsonObject(with: Data(aout.utf8)) as? [String: Any] ?? [:]
        #expect(ast == 0 && report["balanced"] as? Bool == true, "\(aout)")
        let (gst, gout) = try await quotactl(["voucher", "show", "gr", "--global", "--json", "--config", ctlConfig])
        let g = try JSONSerialization.jsonObject(with: Data(gout.utf8)) as? [String: Any] ?? [:]
        #expect(gst == 0 && g["limit"] as? Int == 30_000 && g["allocations"] as? Int == 30_000 && g["in_flight"] as? Int == 0, "\(gout)")
        let rows = (g["regions"] as? [[String: Any]]) ?? []
        #expect(rows.map { "\($0["region"]!):\($0["allocation"]!):\($0["sold"]!)" } == ["id:15000:15000", "sg:15000:15000"], "\(rows)")
    }

    @Test func threeSidecarsOnThreeMastersSellExactlyTheLimitWithPerUserLimits() async throws {
        let cluster = try await RedisClusterServer(masters: 3)
        let dir = TempDir()
        let (st, out) = try await quotactl(["voucher", "create", "flash", "--limit", "6000", "--per-user", "2", "--redis", cluster.url])
        #expect(st == 0, "\(out)")
        let (st2, out2) = try await quotactl(["voucher", "show", "flash", "--redis", cluster.url])
        #expect(st2 == 0 && out2.contains("6000"), "\(out2)")
        var sidecars: [Quotad] = []
        for h in ["host-a", "host-b", "host-c"] { sidecars.append(try await Quotad(redisURL: cluster.url, dir: dir, host: h)) }
        var clients: [RESPClient] = []
        for i in 0..<60 { clients.append(try await RESPClient.connect(sidecars[i % 3].socket)) }
        // A third claim of one user is refused by the per-user limit kept on the cluster.
        var soloIDs: [String] = []
        for _ in 0..<2 {
            let r = try await clients[0].send("CLAIM", "flash", "solo")
            #expect(r.errorCode == nil, "\(r)")
            if case .bulkString(let b?) = r { soloIDs.append(String(buffer: b)) }
        }
        #expect(try await clients[1].send("CLAIM", "flash", "solo").errorCode == "USERLIMIT")
        let results = try await withThrowingTaskGroup(of: ([String], [String: Int]).self) { g in
            for (i, c) in clients.enumerated() {
                // Two claims per user: users spread over every per-user group (and so every master).
                g.addTask { try await claimAll(c, voucher: "flash") { "c\(i)-u\($0 / 2)" } }
            }
            var all: [([String], [String: Int])] = []
            for try await r in g { all.append(r) }
            return all
        }
        let ids = results.flatMap(\.0) + soloIDs
        #expect(ids.count == 6000, "exactly the limit was sold")
        #expect(Set(ids).count == ids.count, "claim ids are distinct")
        #expect(results.allSatisfy { $0.1 == ["SOLDOUT": 1] }, "no error but the final SOLDOUT: \(results.map(\.1))")
        for c in clients { c.close() }
        for s in sidecars { #expect(try await s.stop() == 0) }
        let a = try await cluster.account("flash")
        #expect(a.pool == 0)
        #expect(a.leases == 0, "no lease outstanding after shutdown")
        #expect(a.leased - a.returned == 6000)
        let problems = try await cluster.audit("flash", journals: sidecars.map { ($0.host, $0.journalDir) }, netClaimed: ids.count)
        #expect(problems.isEmpty, "\(problems)")
        let (st3, out3) = try await quotactl(["audit", "flash", "--redis", cluster.url])
        #expect(st3 == 0, "\(out3)")
    }

    /// The voucher's slot moves to another master mid-sale (IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE):
    /// sidecars follow ASK/TRYAGAIN during the move and MOVED after it; the sale ends at exactly its limit.
    @Test func slotMigratedMidSaleIsFollowedAndTheSaleEndsExactly() async throws {
        let cluster = try await RedisClusterServer(masters: 3)
        let dir = TempDir()
        let limit = 12_000
        #expect(try await quotactl(["voucher", "create", "mv", "--limit", String(limit), "--redis", cluster.url]).0 == 0)
        // Small leases: the sidecars go to Redis many times while the slot moves.
        let (st, out) = try await quotactl(["lease", "set", "--voucher", "mv", "--min", "20", "--max", "20", "--redis", cluster.url])
        #expect(st == 0, "\(out)")
        var sidecars: [Quotad] = []
        for h in ["host-a", "host-b", "host-c"] { sidecars.append(try await Quotad(redisURL: cluster.url, dir: dir, host: h)) }
        let slot = RedisClusterServer.slot(ofVoucher: "mv")
        let from = try await cluster.masterPort(ofSlot: slot)
        let to = try await cluster.masterPorts().first { $0 != from }!
        let sold = Counter()
        let errorTimes = ErrorLog()
        let start = ContinuousClock.now
        var moved: (begin: Duration, end: Duration, seq: Int) = (.zero, .zero, 0)
        let ids = try await withThrowingTaskGroup(of: [String].self) { g in
            for i in 0..<30 {
                let sock = sidecars[i % 3].socket
                g.addTask {
                    let c = try await RESPClient.connect(sock)
                    defer { c.close() }
                    var ids: [String] = []
                    var n = 0
                    while ContinuousClock.now - start < .seconds(40) {
                        n += 1
                        let r = try await c.send("CLAIM", "mv", "u\(i)-\(n)")
                        if let code = r.errorCode {
                            if code == "SOLDOUT" { break }
                            errorTimes.add(code, at: ContinuousClock.now - start)
                            try await Task.sleep(for: .milliseconds(5))
                        } else if case .bulkString(let b?) = r {
                            ids.append(String(buffer: b))
                            sold.add(1)
                        }
                    }
                    return ids
                }
            }
            try await eventually("a quarter sold", timeout: .seconds(20)) { sold.value > limit / 4 }
            moved.begin = ContinuousClock.now - start
            try await cluster.migrate(slot: slot, to: to, pause: .milliseconds(300))
            moved.end = ContinuousClock.now - start
            moved.seq = try await cluster.store.voucher("mv")?.leaseSeq ?? 0
            var all: [String] = []
            for try await r in g { all += r }
            return all
        }
        #expect(ids.count == limit, "exactly the limit was sold")
        #expect(Set(ids).count == ids.count)
        #expect(sold.value > limit / 4 && moved.seq > 0)
        #expect(try await cluster.masterPort(ofSlot: slot) == to)
        #expect(try await cluster.command(to, "EXISTS", "quota:{mv}") == .integer(1), "the voucher lives on the new master")
        let after = try await cluster.store.voucher("mv")?.leaseSeq ?? 0
        #expect(after > moved.seq, "leases were taken on the new master after the move (\(moved.seq) → \(after))")
        // Errors, if any, only within a bounded window around the move.
        let errs = errorTimes.all
        #expect(errs.allSatisfy { $0.at >= moved.begin && $0.at <= moved.end + .seconds(2) }, "errors outside the move: \(errs.prefix(10))")
        #expect(errs.count < 300, "\(errs.count) errors")
        for s in sidecars { #expect(try await s.stop() == 0) }
        let a = try await cluster.account("mv")
        #expect(a.pool == 0 && a.leases == 0 && a.leased - a.returned == limit)
        let problems = try await cluster.audit("mv", journals: sidecars.map { ($0.host, $0.journalDir) }, netClaimed: ids.count)
        #expect(problems.isEmpty, "\(problems)")
    }

    /// The master of the voucher's slot is kill -9ed mid-sale (one replica per master, node timeout 1 s):
    /// claims that need Redis get UNAVAILABLE while the slot has no master, never more than the limit is
    /// sold, and the sale resumes by itself once the replica is promoted; the books balance.
    @Test func masterKilledMidSaleFailsClosedThenResumesAfterFailover() async throws {
        let cluster = try await RedisClusterServer(masters: 3, replicas: 1, nodeTimeoutMs: 1000)
        let dir = TempDir()
        let limit = 12_000
        #expect(try await quotactl(["voucher", "create", "fo", "--limit", String(limit), "--redis", cluster.url]).0 == 0)
        #expect(try await quotactl(["lease", "set", "--voucher", "fo", "--min", "20", "--max", "20", "--redis", cluster.url]).0 == 0)
        var sidecars: [Quotad] = []
        for h in ["host-a", "host-b", "host-c"] {
            sidecars.append(try await Quotad(redisURL: cluster.url, dir: dir, host: h, extraYAML: "limits: { claim_timeout_ms: 500 }\n"))
        }
        let slot = RedisClusterServer.slot(ofVoucher: "fo")
        let killed = try await cluster.masterPort(ofSlot: slot)
        let sold = Counter()
        let errorTimes = ErrorLog()
        let start = ContinuousClock.now
        var killedAt: Duration = .zero
        var promotedAt: Duration = .zero
        let ids = try await withThrowingTaskGroup(of: [String].self) { g in
            for i in 0..<30 {
                let sock = sidecars[i % 3].socket
                g.addTask {
                    try await claimThroughFailover(sock, client: i, voucher: "fo", start: start, for: .seconds(45),
                                                   errors: errorTimes) { sold.add(1) }
                }
            }
            try await eventually("a quarter sold", timeout: .seconds(20)) { sold.value > limit / 4 }
            killedAt = ContinuousClock.now - start
            try await cluster.kill9(killed)
            try await eventually("a replica is promoted", timeout: .seconds(20)) {
                try await cluster.masterPort(ofSlot: slot) != killed
            }
            promotedAt = ContinuousClock.now - start
            var all: [String] = []
            for try await r in g { all += r }
            return all
        }
        let errs = errorTimes.all
        #expect(Set(ids).count == ids.count)
        #expect(ids.count <= limit, "never oversold")
        #expect(errs.contains { $0.code == "UNAVAILABLE" }, "claims failed closed while the slot had no master")
        #expect(errs.allSatisfy { $0.code == "UNAVAILABLE" }, "\(Set(errs.map(\.code)))")
        let outside = errs.filter { $0.at < killedAt || $0.at > promotedAt + .seconds(5) }
        #expect(outside.isEmpty,
                "UNAVAILABLE only around the failover (killed \(killedAt), promoted \(promotedAt)): \(outside.count) outside, \(outside.prefix(5))")
        let lastError = errs.map(\.at).max() ?? .zero
        let soldAfter = sold.value
        #expect(soldAfter > limit / 2, "the sale resumed after the failover (sold \(soldAfter), last error at \(lastError))")
        for s in sidecars { #expect(try await s.stop() == 0) }
        let a = try await cluster.account("fo")
        #expect(a.pool + a.outstanding + ids.count == limit, "pool + outstanding + claimed == limit: \(a), \(ids.count)")
        let problems = try await cluster.audit("fo", netClaimed: ids.count)
        #expect(problems.isEmpty, "\(problems)")
    }
}

/// Claims `voucher` on a new connection to `socket` (users `u<i>-<n>`, request ids `q<i>-<n>`) until SOLDOUT
/// or until `limit` after `start` has passed; every error reply is logged with its time and the claim is
/// tried again 10 ms later; `granted` runs for each claim granted. Returns the claim ids.
func claimThroughFailover(_ socket: String, client i: Int, voucher: String, start: ContinuousClock.Instant,
                          for limit: Duration, errors: ErrorLog, granted: @Sendable () -> Void) async throws -> [String] {
    let c = try await RESPClient.connect(socket)
    defer { c.close() }
    var ids: [String] = []
    var n = 0
    while ContinuousClock.now - start < limit {
        n += 1
        let r = try await c.send("CLAIM", voucher, "u\(i)-\(n)", "REQ", "q\(i)-\(n)")
        if let code = r.errorCode {
            if code == "SOLDOUT" { break }
            errors.add(code, at: ContinuousClock.now - start)
            try await Task.sleep(for: .milliseconds(10))
        } else if case .bulkString(let b?) = r {
            ids.append(String(buffer: b))
            granted()
        }
    }
    return ids
}

/// Error replies with when they came (since the test's start).
final class ErrorLog: @unchecked Sendable {
    private let lock = NSLock()
    private var items: [(code: String, at: Duration)] = []
    func add(_ code: String, at: Duration) { lock.withLock { items.append((code, at)) } }
    var all: [(code: String, at: Duration)] { lock.withLock { items } }
}
