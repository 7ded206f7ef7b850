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

    @Test func clusterURLsParseAndOtherFormsStayAsTheyWere() throws {
        let e = try RedisEndpoint(url: "redis-cluster://127.0.0.1:7000, 127.0.0.1:7001,unix:///tmp/r.sock")
        #expect(e == .cluster(seeds: [.tcp(host: "127.0.0.1", port: 7000), .tcp(host: "127.0.0.1", port: 7001), .unix(path: "/tmp/r.sock")]))
        #expect(e.description == "redis-cluster://127.0.0.1:7000,127.0.0.1:7001,unix:///tmp/r.sock")
        #expect(throws: RedisError.self) { try RedisEndpoint(url: "redis-cluster://") }
        #expect(throws: RedisError.self) { try RedisEndpoint(url: "redis-cluster://a:1,,b:2") }
        #expect(try RedisEndpoint(url: "redis://h:1") == .tcp(host: "h", port: 1))
        #expect(try RedisEndpoint(url: "unix:///x.sock") == .unix(path: "/x.sock"))
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
}
