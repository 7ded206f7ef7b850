import Foundation
import Glibc
import QuotaHarness
import Testing

/// helper-58 (review of c181bfc; the fault was older): a reply was encoded when it was written, with the
/// connection's protocol at that moment, not the one in force when its command ran. A RESP2 client that pipelines
/// `CLAIM` (waits for its journal record), `CLIENT GETNAME` and `HELLO 3` got GETNAME's nil as RESP3 `_`,
/// which it cannot parse yet (Redis encodes each reply as its command runs: `$-1`). Failed before the fix (`_`).
@Suite("A queued reply keeps its command's protocol", .serialized, .timeLimit(.minutes(2)))
struct ReplyProtocolAtCommandReviewTests {
    @Test func aReplyQueuedBehindAClaimIsEncodedInTheProtocolItsCommandRanIn() async throws {
        let redis = try await RedisServer()
        _ = try await redis.store.createVoucher(id: "v1", limit: 1000, perUser: 0, totalLimit: 1000, region: "sg")
        let q = try await Quotad(redis: redis, dir: redis.dir, host: "host-a", durability: "journal")
        let peer = try RawPeer(q.socket)
        peer.receiveTimeout(10)
        peer.sendAll("CLAIM v1 u\r\nCLIENT GETNAME\r\nHELLO 3\r\n")
        let claimHeader = peer.line()
        let claimID = peer.line()
        let getname = peer.line()
        let hello = peer.line()
        #expect(claimHeader.hasPrefix("$") && claimID.hasPrefix("sg.host-a."), "\(claimHeader) \(claimID)")
        #expect(getname == "$-1", "CLIENT GETNAME ran under RESP2: its nil is $-1, got \(getname)")
        #expect(hello == "%7", "HELLO 3's reply is a RESP3 map: \(hello)")
        _ = try await q.stop()
        withExtendedLifetime(redis) {}
    }
}
