import Foundation
import Glibc
import NIOCore
import QuotaClient
import QuotaHarness
import QuotaRESP
import QuotaRedis
import Testing

/// Claims until SOLDOUT on one connection; returns the claim ids and the error codes seen.
func claimUntilSoldOut(_ c: RESPClient, voucher: String, user: String, maxUnavailable: Int = 1000) async throws
    -> (ids: [String], errors: [String: Int])
{
    var ids: [String] = []
    var errors: [String: Int] = [:]
    while true {
        let r = try await c.send("CLAIM", voucher, user)
        if let code = r.errorCode {
            errors[code, default: 0] += 1
            if code == "SOLDOUT" { return (ids, errors) }
            if code == "UNAVAILABLE" && errors[code]! > maxUnavailable { return (ids, errors) }
            // A brief pause: a refusal that is instant for 250 ms must not use up the budget in a spin.
            if code == "UNAVAILABLE" || code == "BUSY" { try await Task.sleep(for: .milliseconds(10)) }
            continue
        }
        guard case .bulkString(let b?) = r else { throw TestError.failed("unexpected reply \(r)") }
        ids.append(String(buffer: b))
    }
}

@Suite("quotad against real redis-server", .serialized, .timeLimit(.minutes(3)))
struct SidecarTests {
    @Test func threeSidecarsWith300ClientsSellExactlyTheLimitAndLeaveNothingLeased() async throws {
        let redis = try await RedisServer()
        let dir = TempDir()
        let (st, out) = try await quotactl(["voucher", "create", "flash", "--limit", "10000", "--redis", redis.url])
        #expect(st == 0, "\(out)")
        var sidecars: [Quotad] = []
        for h in ["host-a", "host-b", "host-c"] { sidecars.append(try await Quotad(redis: redis, dir: dir, host: h)) }

        var clients: [RESPClient] = []
        for i in 0..<300 { clients.append(try await RESPClient.connect(sidecars[i % 3].socket)) }
        let results = try await withThrowingTaskGroup(of: ([String], [String: Int]).self) { g in
            for (i, c) in clients.enumerated() {
                g.addTask { try await claimUntilSoldOut(c, voucher: "flash", user: "user-\(i)") }
            }
            var all: [([String], [String: Int])] = []
            for try await r in g { all.append(r) }
            return all
        }
        let ids = results.flatMap(\.0)
        #expect(ids.count == 10_000, "exactly the limit was sold")
        #expect(Set(ids).count == ids.count, "claim ids are distinct")
        #expect(results.allSatisfy { $0.1["SOLDOUT"] == 1 }, "every client ended on SOLDOUT")
        let served = try await sidecars.asyncMap { try await $0.stat("tokens_served") }.reduce(0, +)
        #expect(served == 10_000)
        for c in clients { c.close() }
        for s in sidecars { #expect(try await s.stop() == 0) }
        let a = try await redis.account("flash")
        #expect(a.pool == 0)
        #expect(a.leases == 0, "no lease outstanding after shutdown")
        #expect(a.leased - a.returned == 10_000)
    }

    @Test func shutdownMidwayReturnsEveryUnusedToken() async throws {
        let redis = try await RedisServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "mid", limit: 50_000, perUser: 0, totalLimit: 50_000, region: "sg")
        var started: [Quotad] = []
        for h in ["host-a", "host-b", "host-c"] { started.append(try await Quotad(redis: redis, dir: dir, host: h)) }
        let sidecars = started
        let counted = Counter()
        try await withThrowingTaskGroup(of: Void.self) { g in
            for i in 0..<60 {
                let sock = sidecars[i % 3].socket
                g.addTask {
                    let c = try await RESPClient.connect(sock)
                    // Claim until the sidecar refuses because it is draining, or closes the connection.
                    // Other refusals (a slow lease on a loaded box) are retried: they granted nothing.
                    while true {
                        guard let r = try? await c.send("CLAIM", "mid", "u\(i)") else { return }
                        if case .bulkString(_?) = r { counted.add(1); continue }
                        guard let m = r.errorMessage, !m.contains("draining"), r.errorCode != "SOLDOUT" else { return }
                        try? await Task.sleep(for: .milliseconds(5))
                    }
                }
            }
            g.addTask {
                try await eventually("some claims served", timeout: .seconds(90)) { counted.value > 3000 }
                for s in sidecars { s.child.signal(SIGTERM) }
            }
            try await g.waitForAll()
        }
        for s in sidecars { #expect(try await s.child.wait() == 0) }
        let a = try await redis.account("mid")
        #expect(counted.value > 3000 && counted.value < 50_000)
        #expect(a.leases == 0, "no lease outstanding")
        #expect(a.pool + counted.value == 50_000, "pool + successful claims == limit")
    }

    @Test func redisKilledMidRunServesLocalStockThenFailsClosedThenResumes() async throws {
        let redis = try await RedisServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "hk", limit: 100_000, perUser: 0, totalLimit: 100_000, region: "sg")
        let (st, out) = try await quotactl(["lease", "set", "--voucher", "hk", "--min", "300", "--max", "300", "--redis", redis.url])
        #expect(st == 0, "\(out)")
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a", extraYAML: "limits: { claim_timeout_ms: 500 }")
        let c = try await RESPClient.connect(q.socket)
        var ok = 0
        for i in 0..<500 where try await c.send("CLAIM", "hk", "u\(i)").errorCode == nil { ok += 1 }
        #expect(ok == 500)

        try await redis.kill9()
        // Local stock (leased before the kill) is still served, then the sidecar fails closed.
        var okAfterKill = 0
        var unavailable = 0
        for i in 0..<2000 {
            let r = try await c.send("CLAIM", "hk", "k\(i)")
            if r.errorCode == nil { okAfterKill += 1 } else if r.errorCode == "UNAVAILABLE" { unavailable += 1 } else {
                Issue.record("unexpected reply while Redis is down: \(r)")
            }
            if unavailable > 20 { break }
        }
        #expect(okAfterKill > 0, "leased stock is served while Redis is down")
        #expect(unavailable > 20, "then UNAVAILABLE, never a guess")
        ok += okAfterKill
        let leased = try await q.stat("tokens_leased")
        #expect(ok <= leased, "successes never exceed tokens leased")

        try await redis.start()
        var resumed = false
        let deadline = ContinuousClock.now + .seconds(10)
        while ContinuousClock.now < deadline, !resumed {
            if try await c.send("CLAIM", "hk", "again").errorCode == nil {
                ok += 1
                resumed = true
            } else {
                try await Task.sleep(for: .milliseconds(50))
            }
        }
        #expect(resumed, "claims resume by themselves when Redis is back")
        c.close()
        #expect(try await q.stop() == 0)
        let a = try await redis.account("hk")
        // A lease applied by Redis whose reply was lost in the kill stays outstanding (stranded, never oversold).
        #expect(a.pool + a.outstanding + ok == 100_000, "pool + outstanding + claimed == limit")
    }

    @Test func sidecarStoppedPastLeaseExpiryServesNothingFromTheExpiredLease() async throws {
        let redis = try await RedisServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "fz", limit: 1000, perUser: 0, totalLimit: 1000, region: "sg")
        _ = try await quotactl(["lease", "set", "--voucher", "fz", "--min", "50", "--max", "50", "--ttl", "2", "--redis", redis.url])
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a", extraYAML: "lease: { idle_return_seconds: 60 }")
        let c = try await RESPClient.connect(q.socket)
        #expect(try await c.send("CLAIM", "fz", "first").errorCode == nil)
        try await Task.sleep(for: .milliseconds(500))  // the lease gets renewed at least once while running

        q.child.signal(SIGSTOP)
        // Everything leased up to here is held by the stopped sidecar (49 unserved tokens at least).
        let before = try await redis.account("fz")
        #expect(before.leased >= 50 && before.outstanding >= 49)
        try await Task.sleep(for: .milliseconds(3500))  // > ttl: Redis's copy of every lease has expired
        let leases = try await redis.store.leases(voucher: "fz")
        let t = try await redis.command("TIME").array!.compactMap(\.int)
        let redisNowMs = t[0] * 1000 + t[1] / 1000
        #expect(!leases.isEmpty && leases.allSatisfy { $0.expiresMs < redisNowMs }, "leases expired while stopped")
        q.child.signal(SIGCONT)
        let replies = try await c.pipeline((0..<20).map { ["CLAIM", "fz", "after\($0)"] })
        let okAfter = replies.filter { $0.errorCode == nil }.count
        try await Task.sleep(for: .milliseconds(1500))
        let after = try await redis.account("fz")
        // Every success after SIGCONT must come from a lease granted after the stop.
        #expect(okAfter <= after.leased - before.leased,
                "served \(okAfter) but only \(after.leased - before.leased) tokens were leased after the stop")
        #expect(try await q.stat("leases_fenced") >= 1)
        #expect(try await q.stat("tokens_served") == 1 + okAfter)
        c.close()
        #expect(try await q.stop() == 0)
        let end = try await redis.account("fz")
        #expect(end.leases == 0)
        #expect(end.pool + 1 + okAfter == 1000, "the expired lease's unserved tokens went back exactly once")
    }

    @Test func badInputGetsAClearErrorAndChangesNothing() async throws {
        let redis = try await RedisServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "safe", limit: 100, perUser: 0, totalLimit: 100, region: "sg")
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a")

        let c = try await RESPClient.connect(q.socket)
        let cases: [([String], String)] = [
            (["NOSUCH"], "ERR unknown command"),
            (["CLAIM", "safe"], "ERR wrong number of arguments"),
            (["CLAIM", "safe", "u", "QTY", "0"], "ERR QTY must be"),
            (["CLAIM", "safe", "u", "QTY", "abc"], "ERR QTY must be"),
            (["CLAIM", "safe", "u", "QTY", "-1"], "ERR QTY must be"),
            (["CLAIM", "safe", "u", "QTY", "100000"], "ERR QTY must be"),
            (["CLAIM", "safe", "u", "QTY"], "ERR QTY needs a value"),
            (["CLAIM", "safe", "u", "BOGUS", "1"], "ERR unknown CLAIM option"),
            (["CLAIM", "sa{fe}", "u"], "ERR invalid voucher id"),
            (["CLAIM", "safe", ""], "ERR user id must be"),
            (["CLAIM", "nosuch", "u"], "NOVOUCHER"),
            (["AVAIL"], "ERR wrong number of arguments"),
            (["PING", "a", "b"], "ERR wrong number of arguments"),
            (["CONFIG", "SET", "x", "y"], "ERR only CONFIG GET"),
        ]
        for (cmd, want) in cases {
            let r = try await c.send(cmd)
            #expect(r.string?.hasPrefix(want) == true && r.isError, "\(cmd) -> \(r)")
        }
        #expect(try await c.send("PING") == .simpleString("PONG"), "the connection survives command errors")
        #expect(try await c.send("ping", "hi") == .bulk("hi"))
        #expect(try await c.send("CONFIG", "GET", "save") == .array([.bulk("save"), .bulk("")]))

        // Protocol errors: an error reply, then the connection is closed; other clients are unaffected.
        let frames = [
            "*abc\r\n", "*1\r\n$999999999\r\n", "*100\r\n", "*2\r\n:1\r\n", String(repeating: "x", count: 10_000),
            "*1\r\n$3\r\nabcdef\r\n",
        ]
        for f in frames {
            let bad = try await RESPClient.connect(q.socket)
            let r = try await bad.sendRaw(ByteBuffer(string: f), replies: 1)
            #expect(r[0].string?.hasPrefix("ERR Protocol error") == true, "\(f.prefix(20)) -> \(r[0])")
            try await bad.waitClosed()
        }
        #expect(try await c.send("PING") == .simpleString("PONG"))
        #expect(q.child.isRunning)
        #expect(try await q.stat("claims_ok") == 0)
        #expect(try await q.stat("claims_novoucher") == 1)
        #expect(try await q.stat("protocol_errors") == frames.count)
        let a = try await redis.account("safe")
        #expect(a.pool == 100 && a.leased == 0, "nothing was leased by bad input")
        c.close()
        #expect(try await q.stop() == 0)
    }

    @Test func aConnectionRemembersOnlyTheExactBytesOfItsLastVoucherID() async throws {
        // The connection skips validating a voucher id whose bytes equal its last valid one: an id of the same
        // length, valid or not, must still be read and checked as itself.
        let redis = try await RedisServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "safe", limit: 1, perUser: 0, totalLimit: 1, region: "sg")
        _ = try await redis.store.createVoucher(id: "sale", limit: 5, perUser: 0, totalLimit: 5, region: "sg")
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a")
        let c = try await RESPClient.connect(q.socket)
        let steps: [(String, String?)] = [
            ("safe", nil), ("safe", "SOLDOUT"), ("sa{e", "ERR invalid voucher id"), ("sale", nil), ("safe", "SOLDOUT"),
            ("sale", nil), ("sal\u{e9}", "ERR invalid voucher id"),
        ]
        for (voucher, want) in steps {
            let r = try await c.send("CLAIM", voucher, "u")
            if let want {
                #expect(r.isError && r.string?.hasPrefix(want) == true, "CLAIM \(voucher) -> \(r)")
            } else {
                #expect(!r.isError && r.string?.isEmpty == false, "CLAIM \(voucher) -> \(r)")
            }
        }
        // Pipelined: the same bytes over and over, then another id of the same length.
        let many = try await c.sendRaw(ByteBuffer(string: String(repeating: "*3\r\n$5\r\nCLAIM\r\n$4\r\nsale\r\n$1\r\nu\r\n", count: 3)
                                                    + "*3\r\n$5\r\nCLAIM\r\n$4\r\nsa}e\r\n$1\r\nu\r\n"), replies: 4)
        #expect(many.prefix(3).allSatisfy { !$0.isError }, "\(many)")
        #expect(many[3].isError && many[3].string?.hasPrefix("ERR invalid voucher id") == true, "\(many[3])")
        #expect(try await q.stat("claims_ok") == 6)
        c.close()
        #expect(try await q.stop() == 0)
        #expect(try await redis.account("safe").pool == 0)
        #expect(try await redis.account("sale").pool == 0, "every claim of 'sale' was served from 'sale'")
    }

    @Test func pipelinedRepliesKeepRequestOrderAcrossParkedClaims() async throws {
        let redis = try await RedisServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "ord", limit: 30, perUser: 0, totalLimit: 30, region: "sg")
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a")
        let c = try await RESPClient.connect(q.socket)
        // The first CLAIM parks (no stock yet); PINGs behind it must wait for it.
        var cmds: [[String]] = []
        for i in 0..<40 { cmds.append(["CLAIM", "ord", "u"]); cmds.append(["PING", "p\(i)"]) }
        let replies = try await c.pipeline(cmds)
        for i in 0..<40 { #expect(replies[2 * i + 1] == .bulk("p\(i)"), "reply \(2 * i + 1) out of order") }
        let claims = (0..<40).map { replies[2 * $0] }
        #expect(claims.prefix(30).allSatisfy { $0.errorCode == nil }, "\(claims.map { $0.errorCode ?? "ok" })")
        #expect(claims.suffix(10).allSatisfy { $0.errorCode == "SOLDOUT" })
        c.close()
        #expect(try await q.stop() == 0)
    }

    /// Claims read together are handled as runs per voucher (issue 13): in one write, runs of two
    /// vouchers, bad claims, a retried REQ, other commands, MULTI/EXEC and, last, a protocol error are
    /// answered one for one, in order, and exactly the good claims are sold.
    // `none`: claims are answered at once; `journal`: after their write batch, through the connection's
    // reply box (``Outcome/pending``), at places numbered before they were decided. A per-user limit makes
    // claims wait for Redis in both modes, and a user's second claim in a run is refused at once, between
    // claims that wait: every reply must still land at its own place.
    @Test(arguments: ["none", "journal"])
    func claimRunsMixedWithOtherCommandsAreAnsweredInOrderOneForOne(durability: String) async throws {
        let redis = try await RedisServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "ra", limit: 1000, perUser: 0, totalLimit: 1000, region: "sg")
        _ = try await redis.store.createVoucher(id: "rb", limit: 1000, perUser: 0, totalLimit: 1000, region: "sg")
        _ = try await redis.store.createVoucher(id: "rp", limit: 1000, perUser: 1, totalLimit: 1000, region: "sg")
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a", durability: durability)
        let c = try await RESPClient.connect(q.socket)
        #expect(try await c.send("CLAIM", "ra", "warm").errorCode == nil)
        #expect(try await c.send("CLAIM", "rb", "warm").errorCode == nil)
        #expect(try await c.send("CLAIM", "rp", "warm").errorCode == nil)
        var cmds: [[String]] = []
        var want: [String] = []  // "id", "id=<k>" (same id as reply k), an error code, or an exact reply
        // First, with nothing waiting: a run whose first claim is refused at once (written at once) and
        // whose second waits: the second's place was numbered before the first was decided.
        cmds += [["CLAIM", "rp", "warm"], ["CLAIM", "rp", "first"]]
        want += ["USERLIMIT", "id"]
        for i in 0..<150 {
            switch i % 10 {
            case 0, 1, 2, 3: cmds.append(["CLAIM", "ra", "u\(i)"]); want.append("id")
            case 4: cmds.append(["CLAIM", "rb", "u\(i)"]); want.append("id")
            case 5: cmds.append(["CLAIM", "ra", "u\(i)", "QTY", "0"]); want.append("ERR")
            case 6: cmds.append(["CLAIM", "ra", "r", "REQ", "req-\(i / 20)"])
                want.append(i % 20 == 6 ? "id" : "id=\(want.count - 10)")
            case 7: cmds.append(["PING", "p\(i)"]); want.append("p\(i)")
            case 8: cmds.append(["CLAIM", "nosuch", "u"]); want.append("NOVOUCHER")
            default: cmds.append(["CLAIM", "ra", "u\(i)"]); want.append("id")
            }
        }
        for j in 0..<30 {
            cmds.append(["CLAIM", "rp", "pu\(j)"]); want.append("id")
            cmds.append(["CLAIM", "rp", "pu\(j)"]); want.append("USERLIMIT")
        }
        cmds += [["MULTI"], ["CLAIM", "ra", "t1"], ["EXEC"], ["CLAIM", "ra", "after"]]
        want += ["OK", "QUEUED", "array", "id"]
        var bytes = ByteBuffer()
        for cmd in cmds { bytes.writeString("*\(cmd.count)\r\n" + cmd.map { "$\($0.utf8.count)\r\n\($0)\r\n" }.joined()) }
        bytes.writeString("*1\r\n$3\r\nabcdef\r\n")  // a protocol error after it all
        // A reply put at a wrong place is never written (the ones after it wait for it): fail, not hang.
        let all = cmds.count + 1
        let payload = bytes
        let answered: [RESPValue]? = await withTaskGroup(of: [RESPValue]?.self) { g in
            g.addTask { try? await c.sendRaw(payload, replies: all) }
            g.addTask {
                try? await Task.sleep(for: .seconds(30))
                if !Task.isCancelled { c.close() }   // (a read waiting for a reply ends only when the socket does)
                return nil
            }
            let first = await g.next() ?? nil
            g.cancelAll()
            return first
        }
        let replies = try #require(answered, "every command answered within 30 s")
        var ids = Set<String>()
        var lastSeq: [String: Int] = [:]
        for (k, (r, w)) in zip(replies, want).enumerated() {
            switch w {
            case "id":
                let id = try #require(r.string, "reply \(k) to \(cmds[k]): \(r)")
                #expect(!r.isError && id.hasPrefix("sg.host-a."), "reply \(k) to \(cmds[k]): \(r)")
                #expect(ids.insert(id).inserted, "claim ids are unique: \(id)")
                // A voucher's claims are numbered as they are served, in the order sent (claims waiting for
                // stock are served first come, first served): a reply at another's place breaks the order.
                if !r.isError {
                    let seq = claimIDParts(id).seq
                    let v = cmds[k][1]
                    #expect(seq > lastSeq[v, default: -1], "reply \(k) to \(cmds[k]): \(id) after \(v)'s claim \(lastSeq[v, default: -1])")
                    lastSeq[v] = seq
                }
            case let w where w.hasPrefix("id="):
                #expect(r == replies[Int(w.dropFirst(3))!], "a retried REQ gets the first answer: reply \(k)")
            case "OK": #expect(r == .ok)
            case "QUEUED": #expect(r == .simpleString("QUEUED"))
            case "array":
                guard case .array(let a?) = r, a.count == 1, a[0].errorCode == nil else { Issue.record("EXEC: \(r)"); continue }
                ids.insert(a[0].string!)
            case let w where w.hasPrefix("p"): #expect(r == .bulk(w), "reply \(k) out of order: \(r)")
            default: #expect(r.errorCode == w, "reply \(k) to \(cmds[k]): \(r)")
            }
        }
        #expect(replies.last?.string?.hasPrefix("ERR Protocol error") == true, "\(replies.last!)")
        try await c.waitClosed()
        // Sold: the two warm-ups and every distinct id answered.
        let c2 = try await RESPClient.connect(q.socket)
        let availA = try await c2.send("AVAIL", "ra"), availB = try await c2.send("AVAIL", "rb")
        let availP = try await c2.send("AVAIL", "rp")
        let left = [availA, availB, availP].map { Int($0.string ?? "") ?? -1 }
        let sold = 3000 - left.reduce(0, +)
        #expect(sold == ids.count + 3, "sold \(sold), answered \(ids.count) distinct ids + 3 warm-ups")
        c2.close()
        #expect(try await q.stop() == 0)
    }

    @Test func operatorsPauseResumeAndRetuneLeasesWhileSidecarsRun() async throws {
        let redis = try await RedisServer()
        let dir = TempDir()
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a", extraYAML: "avail_refresh: 0.2\npolicy_refresh: 0.2")
        let ctl = { (args: [String]) async throws -> String in
            let (st, out) = try await quotactl(args + ["--redis", redis.url])
            #expect(st == 0, "quotactl \(args): \(out)")
            return out
        }
        _ = try await ctl(["voucher", "create", "op", "--limit", "1000"])
        let c = try await RESPClient.connect(q.socket)
        #expect(try await c.send("CLAIM", "op", "u").errorCode == nil)
        #expect(try await c.send("AVAIL", "op") == .integer(999))
        _ = try await ctl(["voucher", "pause", "op"])
        try await eventually("pause reaches the sidecar") { try await c.send("CLAIM", "op", "u").errorCode == "INACTIVE" }
        try await eventually("paused stock goes back") { try await redis.account("op").leases == 0 }
        _ = try await ctl(["voucher", "resume", "op"])
        try await eventually("resume reaches the sidecar") { try await c.send("CLAIM", "op", "u").errorCode == nil }
        // A per-voucher lease size is picked up by the running sidecar.
        _ = try await ctl(["lease", "set", "--voucher", "op", "--min", "77", "--max", "77"])
        try await eventually("new lease size is used") {
            _ = try await c.send("CLAIM", "op", "u")
            return try await redis.store.leases(voucher: "op").contains { $0.granted == 77 }
        }
        let json = try await ctl(["voucher", "show", "op", "--json"])
        let parsed = try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [[String: Any]]
        #expect(parsed?.first?["state"] as? String == "active")
        #expect(parsed?.first?["limit"] as? Int == 1000)
        let list = try await ctl(["voucher", "list"])
        #expect(list.contains("op"))
        let (st, status) = try await quotactl(["status", "--socket", q.socket, "--json"])
        #expect(st == 0 && status.contains("claims_ok"), "\(status)")
        let (bad, msg) = try await quotactl(["voucher", "show", "nope", "--redis", redis.url])
        #expect(bad != 0 && msg.contains("no voucher 'nope'"))
        let (dup, dmsg) = try await quotactl(["voucher", "create", "op", "--limit", "5", "--redis", redis.url])
        #expect(dup != 0 && dmsg.contains("already exists"))
        c.close()
        #expect(try await q.stop() == 0)
    }

    @Test func drainReturnsEveryTokenRefusesClaimsAndKeepsServingInfo() async throws {
        let redis = try await RedisServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "dr", limit: 10_000, perUser: 0, totalLimit: 10_000, region: "sg")
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a")
        let c = try await RESPClient.connect(q.socket)
        var ok = 0
        for _ in 0..<100 where try await c.send("CLAIM", "dr", "u").errorCode == nil { ok += 1 }
        #expect(ok == 100)
        #expect(try await redis.account("dr").outstanding > 0, "the sidecar holds unused tokens")
        #expect(try await c.send("DRAIN") == .simpleString("OK"))
        let a = try await redis.account("dr")
        #expect(a.leases == 0 && a.pool == 10_000 - 100, "every unused token is back when DRAIN answers")
        #expect(try await c.send("CLAIM", "dr", "u").errorCode == "UNAVAILABLE")
        #expect(try await q.info()["draining"] == "1")
        #expect(try await c.send("CLAIM", "nosuch", "u").errorCode == "UNAVAILABLE")
        c.close()
        #expect(try await q.stop() == 0)
        #expect(try await redis.account("dr").pool == 10_000 - 100)
    }

    @Test func peerCredentialsDecideWhoMayConnectAndWhoMayDrain() async throws {
        let redis = try await RedisServer()
        let dir = TempDir()
        chmod(dir.path, 0o755)  // let `nobody` reach the sockets
        guard let pw = getpwnam("nobody") else { throw TestError.failed("no user 'nobody'") }
        let nobody = pw.pointee.pw_uid
        /// redis-cli as `nobody`: its output.
        func asNobody(_ socket: String, _ args: [String]) async throws -> String {
            let p = try ChildProcess("/usr/bin/setpriv", ["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--",
                                                          "/usr/bin/redis-cli", "-s", socket] + args,
                                     log: dir.file("cli-\(UUID().uuidString)"))
            _ = try await p.wait()
            return p.output
        }
        // Anyone who can open the socket may claim; DRAIN is for admins only.
        let open = try await Quotad(redis: redis, dir: dir, host: "open", args: ["--set", "socket.mode=0666"])
        #expect(try await asNobody(open.socket, ["PING"]).contains("PONG"))
        let drain = try await asNobody(open.socket, ["DRAIN"])
        #expect(drain.contains("NOPERM"), "\(drain)")
        #expect(try await open.info()["draining"] == "0", "a refused DRAIN changes nothing")
        #expect(try await asNobody(open.socket, ["NOSUCHCMD"]).contains("ERR unknown command"))
        #expect(try await open.stop() == 0)

        // allowed_uids: other peers are refused at connect with NOPERM (root is always allowed).
        let closed = try await Quotad(redis: redis, dir: dir, host: "closed",
                                      args: ["--set", "socket.mode=0666", "--set", "socket.allowed_uids=[\(nobody + 1)]"])
        let refused = try await asNobody(closed.socket, ["PING"])
        #expect(refused.contains("NOPERM"), "\(refused)")
        #expect(try await closed.stat("rejected_connections") >= 1)
        let c = try await RESPClient.connect(closed.socket)
        #expect(try await c.send("PING") == .simpleString("PONG"), "root is allowed")
        c.close()
        #expect(try await closed.stop() == 0)
    }

    @Test func badConfigIsRefusedAtStartNamingTheKey() async throws {
        let dir = TempDir()
        let cfg = dir.file("bad.yaml")
        try "region: sg\nregions: { sg: { redis: \"unix:///tmp/x.sock\" } }\nlease: { ttl: soon }\n"
            .write(toFile: cfg, atomically: true, encoding: .utf8)
        let p = try ChildProcess(Bin.path("quotad"), ["--config", cfg], log: dir.file("log"))
        #expect(try await p.wait() != 0)
        #expect(p.output.contains("lease.ttl"), "\(p.output)")
        try "region: sg\nregions: { sg: { redis: \"unix:///tmp/x.sock\" } }\nfrobnicate: 1\n"
            .write(toFile: cfg, atomically: true, encoding: .utf8)
        let p2 = try ChildProcess(Bin.path("quotad"), ["--config", cfg], log: dir.file("log2"))
        #expect(try await p2.wait() != 0)
        #expect(p2.output.contains("frobnicate"), "\(p2.output)")
    }

    @Test func redisBenchmarkRunsCleanlyAgainstTheSocket() async throws {
        let redis = try await RedisServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "rb", limit: 1_000_000, perUser: 0, totalLimit: 1_000_000, region: "sg")
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a")
        let p = try ChildProcess(
            "/usr/bin/redis-benchmark", ["-s", q.socket, "-n", "20000", "-P", "16", "-c", "10", "-q", "CLAIM", "rb", "u"],
            log: dir.file("bench.log"))
        #expect(try await p.wait(timeout: .seconds(60)) == 0)
        #expect(!p.output.contains("Error") && p.output.contains("requests per second"), "\(p.output)")
        #expect(try await q.stat("claims_ok") == 20_000)
        #expect(try await q.stop() == 0)
        #expect(try await redis.account("rb").pool == 1_000_000 - 20_000)
    }
}

final class Counter: @unchecked Sendable {
    private let lock = NSLock()
    private var n = 0
    func add(_ k: Int) { lock.lock(); n += k; lock.unlock() }
    var value: Int { lock.lock(); defer { lock.unlock() }; return n }
}

extension Array {
    func asyncMap<T>(_ f: (Element) async throws -> T) async rethrows -> [T] {
        var out: [T] = []
        for e in self { out.append(try await f(e)) }
        return out
    }
}
