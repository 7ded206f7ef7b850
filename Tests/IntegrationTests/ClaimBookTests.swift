// The UNCLAIM book keeps a claim in a 32-byte ring slot (voucher as a number into a table, quantity in 15
// bits, the lap of the ring instead of the sequence number) and anything that does not fit in a side table
// (issue 13: the book was 56 bytes a claim, 56 MB of RSS at start). These pin down what the packing may
// not change: exactly the last `claims.max_tracked` claims are kept, each UNCLAIM gives back exactly its
// own voucher's tokens, whatever its size, and claims of an earlier boot come back from the journal.
import QuotaClient
import QuotaHarness
import QuotaJournal
import NIOCore
import QuotaRESP
import Testing

/// The claim id of a granted claim; nil for any other reply (`RESPValue.string` also gives error texts).
private func granted(_ v: RESPValue) -> String? {
    if case .bulkString(let b?) = v { return String(buffer: b) }
    return nil
}

@Suite("UNCLAIM book", .serialized, .timeLimit(.minutes(3)))
struct ClaimBookTests {
    @Test func exactlyTheLastMaxTrackedClaimsCanBeUnclaimedAfterTheRingWrapsTwice() async throws {
        let redis = try await RedisServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "ring", limit: 1000, perUser: 0, totalLimit: 1000, region: "sg")
        // 128 = 64 stripes of 2 slots: the ring holds exactly the last 128 claims.
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a", extraYAML: "claims: { max_tracked: 128 }\n")
        let c = try await RESPClient.connect(q.socket)
        // Each request has a deadline that names it and says what the sidecar is doing (a hang seen only
        // with every suite running).
        func send(_ args: String...) async throws -> RESPValue {
            try await step(args.joined(separator: " "), context: { await diagnose(q, clients: [c]) }) { try await c.send(args) }
        }
        var ids: [String] = []
        for i in 0..<300 { ids.append(try #require(granted(try await send("CLAIM", "ring", "u\(i)")))) }
        var forgotten = 0
        for id in ids[..<172] {
            if case .error(let e) = try await send("UNCLAIM", id), e.hasPrefix("ERR unknown claim id") { forgotten += 1 }
        }
        #expect(forgotten == 172, "claims older than the last 128 are forgotten")
        for id in ids[172...] { #expect(try await send("UNCLAIM", id) == .simpleString("OK")) }
        // Each kept claim went back once: a second UNCLAIM is the idempotent OK, and 128 tokens serve again.
        #expect(try await c.send("UNCLAIM", ids[299]) == .simpleString("OK"))
        c.close()
        #expect(try await q.stop() == 0)
        // The stop returned every unused token: what the pool lacks is what stays claimed.
        let v = try #require(try await redis.store.voucher("ring"))
        #expect(v.limit - v.pool == 300 - 128, "claimed \(v.limit - v.pool)")
        withExtendedLifetime(redis) {}
    }

    @Test func unclaimGivesBackEachVouchersOwnTokensAcrossVouchersSizesAndARestart() async throws {
        let redis = try await RedisServer()
        let dir = TempDir()
        let vouchers = (0..<5).map { "vb\($0)" }
        for v in vouchers {
            _ = try await redis.store.createVoucher(id: v, limit: 3, perUser: 0, totalLimit: 3, region: "sg")
        }
        // 40,000 tokens in one claim: more than the slot's 15 bits (32,767) can hold.
        _ = try await redis.store.createVoucher(id: "big", limit: 40_000, perUser: 0, totalLimit: 40_000, region: "sg")
        let yaml = "limits: { max_qty: 40000 }\nlease: { max: 40000 }\n"
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a", extraYAML: yaml, durability: "journal")
        var c = try await RESPClient.connect(q.socket)
        var ids: [String: [String]] = [:]
        for _ in 0..<3 {
            for v in vouchers { ids[v, default: []].append(try #require(granted(try await c.send("CLAIM", v, "u")), "\(v)")) }
        }
        let big = try #require(granted(try await c.send("CLAIM", "big", "u", "QTY", "40000")))
        // Before a restart: one claim of each small voucher, and the big one.
        for v in vouchers { #expect(try await c.send("UNCLAIM", ids[v]![0]) == .simpleString("OK"), "\(v)") }
        #expect(try await c.send("UNCLAIM", big) == .simpleString("OK"))
        // Its lease was used up, so the tokens go back to the pool (a restock in the background): a claim
        // of all 40,000 succeeds once it is there (SOLDOUT until then).
        try await eventually("all 40,000 tokens came back") {
            granted(try await c.send("CLAIM", "big", "u", "QTY", "40000")) != nil
        }
        #expect(try await c.send("CLAIM", "big", "u").string?.hasPrefix("SOLDOUT") == true, "and not one more")
        c.close()
        // After a restart the book of the earlier boot is rebuilt from the journal. (This test restarted
        // without stopping first: the second quotad was refused, and the first went on answering.)
        #expect(try await q.stop() == 0)
        try await q.restart()
        c = try await RESPClient.connect(q.socket)
        for v in vouchers { #expect(try await c.send("UNCLAIM", ids[v]![1]) == .simpleString("OK"), "\(v)") }
        // The earlier run's leases are closed, so these tokens go back to the pool (restocks in the
        // background): with the earlier UNCLAIM's token, returned at the stop, each pool holds 2.
        for v in vouchers {
            try await eventually("\(v)'s two tokens are in its pool") { try await redis.store.voucher(v)?.pool == 2 }
        }
        for v in vouchers {
            // Each voucher had 2 tokens back: exactly 2 claims serve, the next finds it sold out.
            #expect(granted(try await c.send("CLAIM", v, "w")) != nil, "\(v)")
            #expect(granted(try await c.send("CLAIM", v, "w")) != nil, "\(v)")
            let third = try await c.send("CLAIM", v, "w")
            #expect(third.string?.hasPrefix("SOLDOUT") == true, "\(v): \(third)")
        }
        c.close()
        #expect(try await q.stop() == 0)
        for v in vouchers {
            let s = try #require(try await redis.store.voucher(v))
            #expect(s.limit - s.pool == 3, "\(v): claimed \(s.limit - s.pool)")
        }
        withExtendedLifetime(redis) {}
    }

    // Found by review: a runtime took a number in the book's (bounded, never shrinking) table of voucher ids
    // when it was made, for any well-formed id, before Redis said the voucher exists: 65,535 CLAIMs of made-up
    // ids filled it for the process's life, and every claim after went to the ~140-byte side table.
    @Test func claimsOfUnknownVouchersTakeNoPlaceInTheBooksVoucherTable() async throws {
        let redis = try await RedisServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "real", limit: 100, perUser: 0, totalLimit: 100, region: "sg")
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a")
        let c = try await RESPClient.connect(q.socket)
        for i in 0..<200 {
            let r = try await c.send("CLAIM", "madeup-\(i)", "u")
            #expect(r.string?.hasPrefix("NOVOUCHER") == true, "\(r)")
        }
        for _ in 0..<10 { #expect(granted(try await c.send("CLAIM", "real", "u")) != nil) }
        let info = try #require(try await c.send("INFO", "limits").string)
        #expect(info.contains("claim_book_vouchers:1\r\n"), "only the voucher that granted claims: \(info)")
        #expect(info.contains("claims_tracked_spread:0\r\n"), "one-share claims sit in their slots: \(info)")
        c.close()
        #expect(try await q.stop() == 0)
        withExtendedLifetime(redis) {}
    }

    // A restart puts the journal's claims into the book in runs, one run per earlier boot, with each
    // cancellation marked after the claims before it (issue 13: one by one, a million claims held the
    // socket closed for seconds). Three boots: claims of the first two, cancelled in the boot that made them
    // or in a later one, must come back with their cancellations: a cancelled claim is not given back twice.
    @Test func claimsAndCancellationsOfSeveralEarlierBootsComeBackFromTheJournal() async throws {
        let redis = try await RedisServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "boots", limit: 20, perUser: 0, totalLimit: 20, region: "sg")
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a", durability: "journal")
        var c = try await RESPClient.connect(q.socket)
        var a: [String] = []
        for i in 0..<4 { a.append(try #require(granted(try await c.send("CLAIM", "boots", "a\(i)")))) }
        #expect(try await c.send("UNCLAIM", a[0]) == .simpleString("OK"))
        c.close()
        try await q.kill9()
        try await q.restart()
        c = try await RESPClient.connect(q.socket)
        var b: [String] = []
        for i in 0..<3 { b.append(try #require(granted(try await c.send("CLAIM", "boots", "b\(i)")))) }
        #expect(try await c.send("UNCLAIM", a[1]) == .simpleString("OK"), "a claim of the boot before")
        #expect(try await c.send("UNCLAIM", b[0]) == .simpleString("OK"))
        c.close()
        #expect(try await q.stop() == 0)
        try await q.restart()
        c = try await RESPClient.connect(q.socket)
        // Cancelled before: the idempotent OK, and nothing given back again.
        for id in [a[0], a[1], b[0]] { #expect(try await c.send("UNCLAIM", id) == .simpleString("OK"), "\(id)") }
        // Not cancelled yet, of either earlier boot: known, and given back now.
        for id in [a[2], b[1]] { #expect(try await c.send("UNCLAIM", id) == .simpleString("OK"), "\(id)") }
        let unknown = try await c.send("UNCLAIM", a[3] + "0")
        #expect(unknown.errorCode == "ERR", "an id no boot made: \(unknown)")
        c.close()
        #expect(try await q.stop() == 0)
        // Each cancellation is in the journal once: one taken again (its cancellation lost at the restore)
        // is journaled a second time (Redis ignores the second give-back of a claim id, so the pool alone
        // would not show it).
        let history = JournalRecovery.read(dir: q.journalDir).history
        var cancels: [String: Int] = [:]
        for e in history where e.kind == .unclaimed { cancels[e.claimID, default: 0] += 1 }
        #expect(cancels == [a[0]: 1, a[1]: 1, b[0]: 1, a[2]: 1, b[1]: 1], "\(cancels)")
        #expect(history.filter { $0.kind == .claimed }.count == 7)
        // Still claimed: a[3] and b[2].
        let v = try #require(try await redis.store.voucher("boots"))
        #expect(v.limit - v.pool == 2, "claimed \(v.limit - v.pool)")
        #expect(try await redis.audit("boots", journals: [(host: "host-a", dir: q.journalDir)], netClaimed: 2).isEmpty)
        withExtendedLifetime(redis) {}
    }
}
