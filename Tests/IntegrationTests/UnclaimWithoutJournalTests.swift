// Found by review: UNCLAIM under `durability: none` without `journal.dir` re-entered the voucher's lock (the
// pipeline answered the cancellation's record synchronously, inside performLocked): a crash in debug, a hang in release.
import QuotaClient
import QuotaRESP
import QuotaHarness
import Testing

@Suite("UNCLAIM without a journal", .serialized, .timeLimit(.minutes(2)))
struct UnclaimWithoutJournalTests {
    @Test func unclaimUnderDurabilityNoneWithoutAJournalAnswersAndTheSidecarLives() async throws {
        let redis = try await RedisServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "nj", limit: 10, perUser: 0, totalLimit: 10, region: "sg")
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a")   // durability: none, no journal.dir
        let c = try await RESPClient.connect(q.socket)
        let id = try #require(try await c.send("CLAIM", "nj", "u1").string)
        #expect(try await c.send("UNCLAIM", id) == .simpleString("OK"))
        #expect(try await c.send("CLAIM", "nj", "u2").string != nil, "the sidecar still serves the voucher")
        c.close()
        #expect(try await q.stop() == 0)
        withExtendedLifetime(redis) {}
    }

    /// With nothing to record to, the UNCLAIM book keeps a claim as its parts (no event is built): it must
    /// still give back every token of the claim, once.
    @Test func aClaimKeptWithoutAnEventIsUnclaimedInFullAndOnce() async throws {
        let redis = try await RedisServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "nk", limit: 10, perUser: 0, totalLimit: 10, region: "sg")
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a")   // durability: none, no journal.dir
        let c = try await RESPClient.connect(q.socket)
        func claimID(_ r: RESPValue) -> String? { if case .bulkString(let b?) = r { return String(buffer: b) } else { return nil } }
        func soldOut(_ r: RESPValue) -> Bool { if case .error(let m) = r { return m.hasPrefix("SOLDOUT") } else { return false } }
        let id = try #require(claimID(try await c.send("CLAIM", "nk", "u1", "QTY", "10")))
        let full = try await c.send("CLAIM", "nk", "u2")
        #expect(soldOut(full), "all ten are claimed: \(full)")
        #expect(try await c.send("UNCLAIM", id) == .simpleString("OK"))
        // The claim's lease closed when its last token was served: the ten go back to the region's pool
        // (a restock, in the background), from where the next claim leases them again.
        var r3 = try await c.send("CLAIM", "nk", "u3", "QTY", "10")
        for _ in 0..<100 where soldOut(r3) {
            try await Task.sleep(for: .milliseconds(50))
            r3 = try await c.send("CLAIM", "nk", "u3", "QTY", "10")
        }
        let again = try #require(claimID(r3), "the ten serve again: \(r3)")
        #expect(again != id)
        #expect(try await c.send("UNCLAIM", id) == .simpleString("OK"), "idempotent")
        let after = try await c.send("CLAIM", "nk", "u4")
        #expect(soldOut(after), "a second UNCLAIM gave nothing back: \(after)")
        c.close()
        #expect(try await q.stop() == 0)
        withExtendedLifetime(redis) {}
    }
}
