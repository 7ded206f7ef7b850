// Found while profiling issue 13: quotad binds its socket and serves before it has restored the previous
// run's REQ answers and UNCLAIM book from the journal (seconds with a large journal), so a REQ retried at
// once after a restart could be granted a second claim.
import Foundation
import Glibc
import QuotaClient
import QuotaHarness
import QuotaRESP
import Testing

@Suite("Restart: nothing is served before the journal is restored", .serialized, .timeLimit(.minutes(6)))
struct RestoreRaceTests {
    @Test func aRequestRetriedTheMomentTheSocketOpensGetsTheClaimOfThePreviousRun() async throws {
        let redis = try await RedisServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "rr", limit: 10_000_000, perUser: 0, totalLimit: 10_000_000, region: "sg")
        // REQ answers and the UNCLAIM book are kept for the dedupe window: long enough for a loaded machine.
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a", extraYAML: "claims: { dedupe_window_seconds: 900 }\n",
                                 durability: "journal")
        let c = try await RESPClient.connect(q.socket)
        let first = try #require(try await c.send("CLAIM", "rr", "alice", "REQ", "order-1").string)
        let canceled = try #require(try await c.send("CLAIM", "rr", "bob").string)
        c.close()
        // A large journal: its restore takes a while.
        let p = try ChildProcess("/usr/bin/redis-benchmark",
                                 ["-s", q.socket, "-n", "100000", "-P", "16", "-c", "10", "-q", "CLAIM", "rr", "u"],
                                 log: dir.file("bench.log"))
        #expect(try await p.wait(timeout: .seconds(180)) == 0)
        q.child.signal(SIGKILL)
        _ = try await q.child.wait()
        let socket = q.socket
        let restarted = Task { try await q.restart() }
        // The moment the socket answers: the retry of order-1, and an UNCLAIM of a claim of the previous run.
        var retry: RESPValue?
        var unclaim: RESPValue?
        let deadline = ContinuousClock.now + .seconds(100)  // the restart waits up to 90 s (see `Quotad.restart`)
        while retry == nil, ContinuousClock.now < deadline {
            guard let r = try? await RESPClient.connect(socket) else {
                try await Task.sleep(for: .milliseconds(1))
                continue
            }
            let replies = try? await r.pipeline([["CLAIM", "rr", "alice", "REQ", "order-1"], ["UNCLAIM", canceled]])
            if let replies, replies.count == 2 {
                retry = replies[0]
                unclaim = replies[1]
            }
            r.close()
        }
        try await restarted.value
        let answer = retry ?? .null
        #expect(answer.errorCode == nil && answer.string == first, "the retry got \(answer), not the first answer \(first)")
        #expect(unclaim == .simpleString("OK"), "the previous run's claim is known at once: \(String(describing: unclaim))")
        #expect(try await q.stop() == 0)
    }
}
