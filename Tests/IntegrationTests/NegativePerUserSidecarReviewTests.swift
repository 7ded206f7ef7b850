import QuotaHarness
import Testing

/// Review of f28a257: a voucher whose Redis record has a negative `per_user` (accepted by `QuotaStore.createVoucher`
/// and by the record reader; every other check reads "a limit" as `> 0`) was served as without a limit; on HEAD every
/// CLAIM of it is refused "USERLIMIT user already holds the voucher's limit of -1".
@Suite("Negative per_user at the sidecar, review", .serialized, .timeLimit(.minutes(2)))
struct NegativePerUserSidecarReviewTests {
    @Test func aClaimOfAVoucherWithANegativePerUserIsServed() async throws {
        let redis = try await RedisServer()
        _ = try await redis.store.createVoucher(id: "v1", limit: 100, perUser: -1, totalLimit: 100, region: "sg")
        let q = try await Quotad(redis: redis, dir: redis.dir, host: "host-a")
        let peer = try RawPeer(q.socket)
        peer.receiveTimeout(10)
        peer.sendAll("CLAIM v1 u\r\n")
        let head = peer.line()
        let id = head.hasPrefix("$") ? peer.line() : head
        #expect(id.hasPrefix("sg.host-a."), "CLAIM v1 u: \(id)")
        let t0 = ContinuousClock.now
        let rc = try await q.stop()
        let took = ContinuousClock.now - t0
        // 6184aeb: stops at once (0). HEAD: the refused claim's unpinned tokens were aborted as pinned (pending -1),
        // the lease never settles, and the drain waits out its deadline.
        #expect(rc == 0 && took < .seconds(5), "stop: rc \(rc) after \(took)")
        withExtendedLifetime(redis) {}
    }
}
