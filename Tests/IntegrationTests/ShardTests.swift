import Foundation
import QuotaClient
import QuotaCore
import QuotaHarness
import QuotaRESP
import QuotaRedis
import Testing

/// Claims on one connection until SOLDOUT; returns the claim ids and the other error codes seen.
private func claimUntilSoldOut(_ c: RESPClient, voucher: String, user: (Int) -> String) async throws
    -> (ids: [String], errors: [String: Int])
{
    var ids: [String] = []
    var errors: [String: Int] = [:]
    var n = 0
    while true {
        let r = try await c.send("CLAIM", voucher, user(n))
        n += 1
        if let code = r.errorCode {
            if code == "SOLDOUT" { return (ids, errors) }
            errors[code, default: 0] += 1
            if errors.values.reduce(0, +) > 2000 { return (ids, errors) }
            try await Task.sleep(for: .milliseconds(5))
            continue
        }
        guard case .bulkString(let b?) = r else { throw TestError.failed("unexpected reply \(r)") }
        ids.append(String(buffer: b))
    }
}

/// Each shard's meta fields of a sharded voucher, by shard index.
private func shardFields(_ store: QuotaStore, _ voucher: String) async throws -> [[String: String]] {
    var out: [[String: String]] = []
    for tag in try await store.shardTags(voucher) {
        out.append(QuotaStore.fields(try await store.connection.send(["HGETALL", "quota:{\(tag)}"])))
    }
    return out
}

/// `count` host ids whose home shard among `shards` is `home`.
private func hosts(homedOn home: Int, of shards: Int, count: Int, prefix: String) -> [String] {
    (0..<10_000).lazy.map { "\(prefix)\($0)" }.filter { QuotaStore.homeShard(host: $0, shards: shards) == home }
        .prefix(count).map { $0 }
}

/// Sells `voucher` through `sidecars` with `perSidecar` connections each until every connection hears SOLDOUT.
private func sell(_ voucher: String, _ sidecars: [Quotad], perSidecar: Int) async throws -> (ids: [String], errors: [[String: Int]]) {
    var clients: [RESPClient] = []
    for s in sidecars { for _ in 0..<perSidecar { clients.append(try await RESPClient.connect(s.socket)) } }
    defer { for c in clients { c.close() } }
    let results = try await withThrowingTaskGroup(of: ([String], [String: Int]).self) { g in
        for (i, c) in clients.enumerated() { g.addTask { try await claimUntilSoldOut(c, voucher: voucher) { "c\(i)-u\($0)" } } }
        var all: [([String], [String: Int])] = []
        for try await r in g { all.append(r) }
        return all
    }
    return (results.flatMap(\.0), results.map(\.1))
}

@Suite("Hot-key shards on one Redis", .timeLimit(.minutes(3)))
struct ShardTests {
    @Test func shardedVoucherIsCreatedAsSubPoolsThatSumToTheLimitAndShowsThem() async throws {
        let redis = try await RedisServer()
        let (st, out) = try await quotactl(["voucher", "create", "hot", "--limit", "1000", "--shards", "3", "--redis", redis.url])
        #expect(st == 0 && out.contains("3 shards"), "\(out)")
        let f = try await shardFields(redis.store, "hot")
        #expect(f.count == 3)
        #expect(f.map { $0["limit"] } == ["334", "333", "333"])
        #expect(f.map { $0["pool"] } == ["334", "333", "333"])
        #expect(f[1]["shard_of"] == "hot" && f[2]["shard_of"] == "hot")
        #expect(f[1]["lease_prefix"] == "1." && f[2]["lease_prefix"] == "2.")
        #expect(Set(f.map { $0["gen"] ?? "" }).count == 1, "one generation for every shard")
        let rec = try #require(try await redis.store.voucher("hot"))
        #expect(rec.limit == 1000 && rec.pool == 1000 && rec.shardPools == [334, 333, 333])
        #expect(try await redis.audit("hot").isEmpty)
        let (st2, out2) = try await quotactl(["voucher", "show", "hot", "--redis", redis.url])
        #expect(st2 == 0 && out2.contains("shards 3: pools 334 333 333") && out2.contains("pool 1000"), "\(out2)")
        // State changes reach every shard.
        #expect(try await quotactl(["voucher", "pause", "hot", "--redis", redis.url]).0 == 0)
        #expect(try await shardFields(redis.store, "hot").allSatisfy { $0["state"] == "paused" })
        #expect(try await quotactl(["voucher", "resume", "hot", "--redis", redis.url]).0 == 0)
        #expect(try await shardFields(redis.store, "hot").allSatisfy { $0["state"] == "active" })
        // Bad shard counts are refused, naming the option, and create nothing.
        for bad in ["0", "65", "-1"] {
            let (s, o) = try await quotactl(["voucher", "create", "bad\(bad)", "--limit", "10", "--shards", bad, "--redis", redis.url])
            #expect(s != 0 && o.contains("--shards"), "\(o)")
        }
        #expect(try await redis.store.voucherIDs() == ["hot"])
        // A second create of the same id changes nothing.
        let (s3, o3) = try await quotactl(["voucher", "create", "hot", "--limit", "5", "--shards", "2", "--redis", redis.url])
        #expect(s3 != 0 && o3.contains("already exists"), "\(o3)")
        #expect(try await redis.store.voucher("hot")?.limit == 1000)
    }

    @Test func threeSidecarsSellAShardedVoucherExactlyAndEveryShardIsLeasedFrom() async throws {
        let redis = try await RedisServer()
        let dir = TempDir()
        #expect(try await quotactl(["voucher", "create", "hot", "--limit", "6000", "--shards", "3", "--redis", redis.url]).0 == 0)
        // One host homed on each shard.
        let names = (0..<3).map { hosts(homedOn: $0, of: 3, count: 1, prefix: "h\($0)-")[0] }
        var sidecars: [Quotad] = []
        for h in names { sidecars.append(try await Quotad(redis: redis, dir: dir, host: h)) }
        let (ids, errors) = try await sell("hot", sidecars, perSidecar: 20)
        #expect(ids.count == 6000, "exactly the limit was sold")
        #expect(Set(ids).count == ids.count)
        #expect(errors.allSatisfy { $0.isEmpty }, "no error but the final SOLDOUT: \(errors)")
        for s in sidecars { #expect(try await s.stop() == 0) }
        let f = try await shardFields(redis.store, "hot")
        #expect(f.allSatisfy { Int($0["leased"] ?? "0")! > 0 }, "every shard was leased from: \(f.map { $0["leased"] ?? "" })")
        #expect(f.allSatisfy { $0["pool"] == "0" })
        let a = try await redis.account("hot")
        #expect(a.leases == 0 && a.leased - a.returned - a.restocked == 6000)
        let problems = try await redis.audit("hot", journals: [], netClaimed: ids.count)
        #expect(problems.isEmpty, "\(problems)")
        #expect(try await quotactl(["audit", "hot", "--redis", redis.url]).0 == 0)
    }

    @Test func oneSidecarFallsBackThroughEveryShardAndSellsThemAll() async throws {
        let redis = try await RedisServer()
        let dir = TempDir()
        #expect(try await quotactl(["voucher", "create", "hot", "--limit", "2000", "--shards", "4", "--redis", redis.url]).0 == 0)
        let q = try await Quotad(redis: redis, dir: dir, host: "solo", durability: "journal")
        let (ids, errors) = try await sell("hot", [q], perSidecar: 16)
        #expect(ids.count == 2000)
        #expect(errors.allSatisfy { $0.isEmpty }, "\(errors)")
        #expect(try await q.stop() == 0)
        let f = try await shardFields(redis.store, "hot")
        #expect(f.allSatisfy { $0["pool"] == "0" && Int($0["leased"] ?? "0")! > 0 }, "\(f)")
        let leases = try await redis.store.leases(voucher: "hot")
        #expect(Set(leases.map { QuotaStore.shardIndex(ofLease: $0.id) }) == [0, 1, 2, 3])
        let problems = try await redis.audit("hot", journals: [("solo", dir.file("journal-solo"))], netClaimed: ids.count)
        #expect(problems.isEmpty, "\(problems)")
    }

    /// Claims served from a shard's lease (`s.N`) are cancelled through that lease (the UNCLAIM book keeps
    /// such ids compact): the tokens go back once, to the right shard, and the books balance.
    @Test func unclaimOfAClaimFromAShardLeaseGoesBackThroughThatShard() async throws {
        let redis = try await RedisServer()
        let dir = TempDir()
        #expect(try await quotactl(["voucher", "create", "hot", "--limit", "100", "--shards", "2", "--redis", redis.url]).0 == 0)
        let host = hosts(homedOn: 1, of: 2, count: 1, prefix: "un")[0]
        let q = try await Quotad(redis: redis, dir: dir, host: host, durability: "journal")
        let c = try await RESPClient.connect(q.socket)
        var ids: [String] = []
        for i in 0..<5 {
            guard case .bulkString(let b?) = try await c.send("CLAIM", "hot", "u\(i)") else { throw TestError.failed("claim") }
            ids.append(String(buffer: b))
        }
        #expect(try await redis.store.leases(voucher: "hot").allSatisfy { QuotaStore.shardIndex(ofLease: $0.id) == 1 })
        for id in ids.prefix(2) { #expect(try await c.send("UNCLAIM", id) == .simpleString("OK"), "\(id)") }
        #expect(try await c.send("UNCLAIM", ids[0]) == .simpleString("OK"), "a second UNCLAIM changes nothing")
        c.close()
        #expect(try await q.stop() == 0)
        let a = try await redis.account("hot")
        #expect(a.leases == 0 && a.leased - a.returned - a.restocked == 3, "\(a)")
        let problems = try await redis.audit("hot", journals: [(host, dir.file("journal-\(host)"))], netClaimed: 3)
        #expect(problems.isEmpty, "\(problems)")
    }

    /// A lease request that fell back to another shard and is asked again (a lost reply) gets that same
    /// lease, even after its home shard was refilled meanwhile: never a second grant for one request.
    @Test func aRetriedLeaseRequestGetsItsOneGrantEvenAfterItsHomeShardRefilled() async throws {
        let redis = try await RedisServer()
        let s = redis.store
        #expect(try await s.createVoucher(id: "v", limit: 20, perUser: 0, totalLimit: 20, region: "sg", shards: 2))
        let gen = try #require(try await s.voucher("v")).generation
        let pair = hosts(homedOn: 0, of: 2, count: 2, prefix: "x")
        let (a, b) = (pair[0], pair[1])
        // b empties the home shard of both.
        guard case .granted(let gb) = try await s.lease(voucher: "v", host: b, req: "b1", want: 10, need: 10, ttl: .seconds(30), gen: gen)
        else { throw TestError.failed("no lease for b") }
        #expect(gb.granted == 10 && QuotaStore.shardIndex(ofLease: gb.id) == 0)
        // a falls back to shard 1.
        guard case .granted(let ga) = try await s.lease(voucher: "v", host: a, req: "a1", want: 4, need: 4, ttl: .seconds(30), gen: gen)
        else { throw TestError.failed("no lease for a") }
        #expect(ga.granted == 4 && QuotaStore.shardIndex(ofLease: ga.id) == 1, "\(ga)")
        // b gives its lease back: the home shard is full again.
        #expect(try await s.giveBack(voucher: "v", lease: gb.id, host: b, returnedTotal: 10, close: true, gen: gen) == .applied(10))
        // a's request asked again (its reply was lost): the same lease, nothing more.
        guard case .granted(let again) = try await s.lease(voucher: "v", host: a, req: "a1", want: 4, need: 4, ttl: .seconds(30), gen: gen)
        else { throw TestError.failed("refused") }
        #expect(again.id == ga.id && again.granted == 4)
        guard case .granted(let resolved) = try await s.lease(voucher: "v", host: a, req: "a1", want: 0, need: 0, ttl: .seconds(30), gen: gen)
        else { throw TestError.failed("refused") }
        #expect(resolved.id == ga.id && resolved.granted == 4, "resolving the request finds its one grant")
        let open = try await s.leases(voucher: "v").filter { $0.host == a && $0.state == .open }
        #expect(open.map(\.id) == [ga.id], "one lease for one request")
        // A request resolved on every shard before it was ever granted gets nothing afterwards.
        guard case .granted(let none) = try await s.lease(voucher: "v", host: a, req: "a2", want: 0, need: 0, ttl: .seconds(30), gen: gen)
        else { throw TestError.failed("refused") }
        #expect(none.granted == 0)
        guard case .granted(let still) = try await s.lease(voucher: "v", host: a, req: "a2", want: 5, need: 5, ttl: .seconds(30), gen: gen)
        else { throw TestError.failed("refused") }
        #expect(still.granted == 0, "a resolved request is never granted later")
        #expect(try await redis.audit("v").isEmpty)
    }

    /// Every shard empty while another host holds idle stock: it is recalled (the recall names the
    /// voucher, whatever shard published it), and the busy host sells the whole limit before SOLDOUT.
    @Test func idleStockOfAnotherHostOnAnotherShardIsRecalledBeforeSoldOut() async throws {
        let redis = try await RedisServer()
        let dir = TempDir()
        #expect(try await quotactl(["voucher", "create", "hot", "--limit", "600", "--shards", "3", "--redis", redis.url]).0 == 0)
        let idleHost = hosts(homedOn: 1, of: 3, count: 1, prefix: "idle")[0]
        let busyHost = hosts(homedOn: 0, of: 3, count: 1, prefix: "busy")[0]
        // Long idle return and ttl: only a recall brings the idle host's stock back within the test.
        let yaml = "lease: { min: 100, max: 200, ttl: 60 }\n"
        let idle = try await Quotad(redis: redis, dir: dir, host: idleHost, extraYAML: yaml)
        let busy = try await Quotad(redis: redis, dir: dir, host: busyHost, extraYAML: yaml)
        let c0 = try await RESPClient.connect(idle.socket)
        #expect(try await c0.send("CLAIM", "hot", "early").errorCode == nil)
        let heldBefore = try await redis.store.leases(voucher: "hot").filter { $0.host == idleHost && $0.state == .open }
        #expect(!heldBefore.isEmpty, "the idle host holds a lease")
        let (ids, errors) = try await sell("hot", [busy], perSidecar: 8)
        #expect(ids.count == 599, "everything but the idle host's one claim: \(ids.count)")
        #expect(errors.allSatisfy { ($0["UNAVAILABLE"] ?? 0) == 0 }, "\(errors)")
        c0.close()
        #expect(try await idle.stop() == 0)
        #expect(try await busy.stop() == 0)
        let problems = try await redis.audit("hot", journals: [], netClaimed: ids.count + 1)
        #expect(problems.isEmpty, "\(problems)")
    }
}

@Suite("Hot-key shards on a Redis Cluster", .serialized, .timeLimit(.minutes(3)))
struct RedisClusterShardTests {
    /// Three shards on three masters (with replicas), three sidecars: exactly the limit, and every master
    /// carries a share of the lease traffic.
    @Test func threeShardsLandOnThreeMastersAndEachCarriesLeaseTraffic() async throws {
        let cluster = try await RedisClusterServer(masters: 3, replicas: 1)
        let dir = TempDir()
        let (st, out) = try await quotactl(["voucher", "create", "hot", "--limit", "9000", "--shards", "3", "--redis", cluster.url])
        #expect(st == 0, "\(out)")
        let tags = try await cluster.store.shardTags("hot")
        #expect(tags.count == 3)
        var masters: [Int] = []
        for t in tags { masters.append(try await cluster.masterPort(ofSlot: ClusterSlot.of("quota:{\(t)}"))) }
        #expect(Set(masters).count == 3, "one shard per master: \(tags) on \(masters)")
        let names = (0..<3).map { hosts(homedOn: $0, of: 3, count: 1, prefix: "c\($0)-")[0] }
        var sidecars: [Quotad] = []
        for h in names { sidecars.append(try await Quotad(redisURL: cluster.url, dir: dir, host: h)) }
        // Lease traffic per master: EVALSHA calls counted by each master's INFO commandstats.
        func evalCalls(_ port: Int) async throws -> Int {
            let text = try await cluster.command(port, "INFO", "commandstats").string ?? ""
            let line = text.split(separator: "\r\n").first { $0.hasPrefix("cmdstat_evalsha:") } ?? ""
            return Int(line.split(separator: ",").first?.split(separator: "=").last ?? "0") ?? 0
        }
        var before: [Int] = []
        for m in masters { before.append(try await evalCalls(m)) }
        let (ids, errors) = try await sell("hot", sidecars, perSidecar: 16)
        #expect(ids.count == 9000, "exactly the limit was sold")
        #expect(Set(ids).count == ids.count)
        #expect(errors.allSatisfy { $0.isEmpty }, "\(errors)")
        var calls: [Int] = []
        for (m, b) in zip(masters, before) { calls.append(try await evalCalls(m) - b) }
        #expect(calls.allSatisfy { $0 > 10 }, "each master ran scripts for its shard: \(calls)")
        let f = try await shardFields(cluster.store, "hot")
        #expect(f.allSatisfy { Int($0["leased"] ?? "0")! > 0 && $0["pool"] == "0" }, "\(f.map { ($0["leased"], $0["pool"]) })")
        for s in sidecars { #expect(try await s.stop() == 0) }
        let problems = try await cluster.audit("hot", journals: sidecars.map { ($0.host, $0.journalDir) }, netClaimed: ids.count)
        #expect(problems.isEmpty, "\(problems)")
        let (st3, out3) = try await quotactl(["audit", "hot", "--redis", cluster.url])
        #expect(st3 == 0, "\(out3)")
    }

    /// The master of one shard killed mid-sale: hosts homed on the other shards keep selling through the
    /// outage, claims that need the dead shard fail closed until its replica is promoted, and the books
    /// balance; never oversold.
    @Test func aShardsMasterKilledMidSaleStopsOnlyWhatNeedsThatShard() async throws {
        let cluster = try await RedisClusterServer(masters: 3, replicas: 1, nodeTimeoutMs: 1000)
        let dir = TempDir()
        let limit = 30_000
        #expect(try await quotactl(["voucher", "create", "fo", "--limit", String(limit), "--shards", "3", "--redis", cluster.url]).0 == 0)
        #expect(try await quotactl(["lease", "set", "--voucher", "fo", "--min", "20", "--max", "20", "--redis", cluster.url]).0 == 0)
        let tags = try await cluster.store.shardTags("fo")
        let names = (0..<3).map { hosts(homedOn: $0, of: 3, count: 1, prefix: "fo\($0)-")[0] }
        var sidecars: [Quotad] = []
        for h in names {
            sidecars.append(try await Quotad(redisURL: cluster.url, dir: dir, host: h, extraYAML: "limits: { claim_timeout_ms: 500 }\n"))
        }
        let slot = ClusterSlot.of("quota:{\(tags[0])}")
        let killed = try await cluster.masterPort(ofSlot: slot)
        let soldBy = (0..<3).map { _ in Counter() }
        let errorTimes = ErrorLog()
        let start = ContinuousClock.now
        var killedAt: Duration = .zero
        var promotedAt: Duration = .zero
        let during = (0..<3).map { _ in Counter() }
        let window = WindowFlag()
        let ids = try await withThrowingTaskGroup(of: [String].self) { g in
            for i in 0..<30 {
                let k = i % 3
                let sock = sidecars[k].socket
                g.addTask {
                    try await claimThroughFailover(sock, client: i, voucher: "fo", start: start, for: .seconds(60),
                                                   errors: errorTimes) {
                        soldBy[k].add(1)
                        if window.open { during[k].add(1) }
                    }
                }
            }
            try await eventually("a tenth sold", timeout: .seconds(30)) { soldBy.reduce(0) { $0 + $1.value } > limit / 10 }
            killedAt = ContinuousClock.now - start
            try await cluster.kill9(killed)
            try await Task.sleep(for: .milliseconds(300))
            window.open = true
            try await eventually("a replica is promoted", timeout: .seconds(20)) {
                try await cluster.masterPort(ofSlot: slot) != killed
            }
            window.open = false
            promotedAt = ContinuousClock.now - start
            var all: [String] = []
            for try await r in g { all += r }
            return all
        }
        let errs = errorTimes.all
        #expect(Set(ids).count == ids.count)
        #expect(ids.count <= limit, "never oversold")
        #expect(errs.allSatisfy { $0.code == "UNAVAILABLE" }, "\(Set(errs.map(\.code)))")
        let outside = errs.filter { $0.at < killedAt || $0.at > promotedAt + .seconds(5) }
        #expect(outside.isEmpty, "UNAVAILABLE only around the failover (killed \(killedAt), promoted \(promotedAt)): \(outside.prefix(5))")
        #expect(during[1].value > 0 && during[2].value > 0,
                "hosts homed on the live masters sold while shard 0 had no master: \(during.map(\.value))")
        #expect(ids.count > limit * 9 / 10, "the sale went on after the failover: \(ids.count)")
        for s in sidecars { #expect(try await s.stop() == 0) }
        // The harness's own connection to the killed master broke: its first call re-reads the map.
        _ = try? await cluster.store.voucher("fo")
        let a = try await cluster.account("fo")
        #expect(a.pool + a.outstanding + ids.count == limit, "pool + outstanding + claimed == limit: \(a), \(ids.count)")
        let problems = try await cluster.audit("fo", journals: sidecars.map { ($0.host, $0.journalDir) }, netClaimed: ids.count)
        #expect(problems.isEmpty, "\(problems)")
    }
}

/// A flag set by the test's driver and read by its clients.
private final class WindowFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false
    var open: Bool {
        get { lock.withLock { value } }
        set { lock.withLock { value = newValue } }
    }
}

/// Findings of the review of the shards change, each a test that failed before its fix.
@Suite("Hot-key shards: review findings", .timeLimit(.minutes(3)))
struct ShardReviewTests {
    /// A shard other than 0 that loses its last grants (a failover to a replica that lagged) is caught by
    /// that shard's lease sequence: the host fails closed instead of serving a lease Redis forgot.
    @Test func aShardThatForgotItsLastGrantFailsTheHostClosed() async throws {
        let redis = try await RedisServer()
        let dir = TempDir()
        #expect(try await quotactl(["voucher", "create", "v", "--limit", "1000", "--shards", "2", "--redis", redis.url]).0 == 0)
        let host = hosts(homedOn: 1, of: 2, count: 1, prefix: "lag")[0]
        // One lease that lasts the test: the refresh, not a new grant, is what meets the lost write.
        let q = try await Quotad(redis: redis, dir: dir, host: host,
                                 extraYAML: "avail_refresh: 0.2\nlease: { min: 400, max: 400, ttl: 60 }\n")
        let c = try await RESPClient.connect(q.socket)
        defer { c.close() }
        #expect(try await c.send("CLAIM", "v", "u1").errorCode == nil)
        let tag = try await redis.store.shardTags("v")[1]
        let lease = try #require(try await redis.store.leases(voucher: "v").first { $0.host == host && $0.state == .open })
        #expect(QuotaStore.shardIndex(ofLease: lease.id) == 1)
        // What a replica that missed the grant holds: no lease, the sequence and the pool as before it.
        let conn = redis.store.connection
        _ = try await conn.send(["HDEL", "quota:{\(tag)}:leases", lease.id])
        _ = try await conn.send(["ZREM", "quota:{\(tag)}:exp", lease.id])
        _ = try await conn.send(["HINCRBY", "quota:{\(tag)}", "pool", String(lease.granted)])
        _ = try await conn.send(["HINCRBY", "quota:{\(tag)}", "leased", String(-lease.granted)])
        _ = try await conn.send(["HINCRBY", "quota:{\(tag)}", "lease_seq", "-1"])
        try await eventually("claims fail closed", timeout: .seconds(10)) {
            try await c.send("CLAIM", "v", "u2").errorCode == "UNAVAILABLE"
        }
        #expect(try await c.send("CLAIM", "v", "u3").errorCode == "UNAVAILABLE")
        _ = try await q.stop()
    }

    /// Requests resolved "nothing" on a shard (every fall-through writes one) are dropped after the
    /// voucher's retention, like archived grants' requests: the hash does not grow for the voucher's life.
    @Test func resolvedRequestMarkersAreDroppedAfterTheRetention() async throws {
        let redis = try await RedisServer()
        let s = redis.store
        #expect(try await s.createVoucher(id: "v", limit: 1000, perUser: 0, totalLimit: 1000, region: "sg",
                                          closedRetention: .seconds(1), shards: 2))
        let gen = try #require(try await s.voucher("v")).generation
        let pair = hosts(homedOn: 0, of: 2, count: 2, prefix: "r")
        guard case .granted(let g) = try await s.lease(voucher: "v", host: pair[1], req: "drain", want: 500, need: 500,
                                                       ttl: .seconds(60), gen: gen), g.granted == 500
        else { throw TestError.failed("shard 0 not drained") }
        for i in 0..<30 {
            guard case .granted(let a) = try await s.lease(voucher: "v", host: pair[0], req: "a\(i)", want: 1, need: 1,
                                                           ttl: .seconds(60), gen: gen), a.granted == 1
            else { throw TestError.failed("no fall-through grant") }
        }
        let conn = s.connection
        // (On a slow run the first markers may be dropped already: the retention is one second.)
        let written = try await conn.send(["HLEN", "quota:{v}:reqs"]).int ?? 0
        #expect(written > 1 && written <= 31, "the drain and up to 30 resolved markers: \(written)")
        try await Task.sleep(for: .milliseconds(1500))
        for i in 30..<34 {
            _ = try await s.lease(voucher: "v", host: pair[0], req: "a\(i)", want: 1, need: 1, ttl: .seconds(60), gen: gen)
        }
        let left = try await conn.send(["HLEN", "quota:{v}:reqs"]).int ?? -1
        #expect(left <= 31 - 30 + 4, "old resolved markers dropped: \(left) left")
        let listed = (try await conn.send(["ZRANGE", "quota:{v}:closed", "0", "-1"]).array ?? []).compactMap(\.string)
        #expect(listed.filter { $0.hasPrefix("-") }.count == left - 1, "each kept marker listed once: \(listed)")
        #expect(try await redis.audit("v").isEmpty)
    }

    /// An error reply reading a shard (a key of the wrong type here; LOADING or NOPERM in life) is a failed
    /// refresh, not a voucher gone from Redis: the host keeps serving what it holds.
    @Test func anErrorReadingAShardIsAFailedRefreshNotALostVoucher() async throws {
        let redis = try await RedisServer()
        let dir = TempDir()
        #expect(try await quotactl(["voucher", "create", "v", "--limit", "1000", "--shards", "2", "--redis", redis.url]).0 == 0)
        let host = hosts(homedOn: 0, of: 2, count: 1, prefix: "err")[0]
        let q = try await Quotad(redis: redis, dir: dir, host: host, extraYAML: "avail_refresh: 0.2\n")
        let c = try await RESPClient.connect(q.socket)
        defer { c.close() }
        #expect(try await c.send("CLAIM", "v", "u0").errorCode == nil)
        let tag = try await redis.store.shardTags("v")[1]
        let conn = redis.store.connection
        let saved = QuotaStore.fields(try await conn.send(["HGETALL", "quota:{\(tag)}"]))
        // Replaced atomically (RENAME, here and below): a refresh between a DEL and a SET would see the shard
        // missing, which rightly fails the voucher closed.
        _ = try await conn.send(["SET", "quota:{\(tag)}:tmp", "not a hash"])
        _ = try await conn.send(["RENAME", "quota:{\(tag)}:tmp", "quota:{\(tag)}"])
        for i in 1...15 {
            let r = try await c.send("CLAIM", "v", "u\(i)")
            #expect(r.errorCode == nil, "claim \(i): \(r)")
            try await Task.sleep(for: .milliseconds(100))
        }
        _ = try await conn.send(["HSET", "quota:{\(tag)}:tmp"] + saved.flatMap { [$0.key, $0.value] })
        _ = try await conn.send(["RENAME", "quota:{\(tag)}:tmp", "quota:{\(tag)}"])
        #expect(try await c.send("CLAIM", "v", "u99").errorCode == nil)
        #expect(try await q.stop() == 0)
        #expect(try await redis.audit("v", netClaimed: 17).isEmpty)
    }

    @Test func aShardsRequestVariantIsMatchedToTheJournaledRequest() {
        #expect(QuotaStore.journaledRequest("r-7#1", lease: "1.3") == "r-7")
        #expect(QuotaStore.journaledRequest("r-7#1", lease: "3") == "r-7#1")
        #expect(QuotaStore.journaledRequest("r-7#2", lease: "1.3") == "r-7#2")
        #expect(QuotaStore.journaledRequest("r-7", lease: "12") == "r-7")
        #expect(QuotaStore.leaseNumber("2.15")! == (2, 15))
        #expect(QuotaStore.leaseNumber("15")! == (0, 15))
        #expect(QuotaStore.leaseNumber("x.1") == nil && QuotaStore.leaseNumber("") == nil)
    }

    /// Shards that balance only in sum (one has tokens the other lacks) are reported, per shard.
    @Test func auditChecksEveryShardsBooksNotOnlyTheirSum() async throws {
        let redis = try await RedisServer()
        #expect(try await quotactl(["voucher", "create", "v", "--limit", "300", "--shards", "3", "--redis", redis.url]).0 == 0)
        #expect(try await redis.audit("v").isEmpty)
        let tags = try await redis.store.shardTags("v")
        _ = try await redis.store.connection.send(["HINCRBY", "quota:{\(tags[1])}", "pool", "5"])
        _ = try await redis.store.connection.send(["HINCRBY", "quota:{\(tags[2])}", "pool", "-5"])
        let problems = try await redis.audit("v")
        #expect(problems.contains { $0.hasPrefix("shard 1: R1") } && problems.contains { $0.hasPrefix("shard 2: R1") }, "\(problems)")
        let (st, out) = try await quotactl(["audit", "v", "--redis", redis.url])
        #expect(st != 0 && out.contains("shard 1"), "\(out)")
    }

    /// A create that meets a sub-pool key with other contents writes nothing at all.
    @Test func createMeetingAForeignShardKeyWritesNothing() async throws {
        let redis = try await RedisServer()
        let conn = redis.store.connection
        _ = try await conn.send(["HSET", "quota:{hot#2}", "foo", "bar"])
        let (st, out) = try await quotactl(["voucher", "create", "hot", "--limit", "30", "--shards", "3", "--redis", redis.url])
        #expect(st != 0 && out.contains("shard 2"), "\(out)")
        let keys = (try await conn.send(["KEYS", "quota:*"]).array ?? []).compactMap(\.string).filter { $0 != "quota:region" }
        #expect(keys == ["quota:{hot#2}"], "\(keys)")
        #expect(try await redis.store.voucherIDs().isEmpty)
    }
}
