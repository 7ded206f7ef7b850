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
}
