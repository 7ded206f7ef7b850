// By helper-39, reviewing 1d4316e: a claim parked at a sale's tail gathers its tokens one small lease at a time.
import Foundation
import NIOCore
import QuotaClient
import QuotaCore
import QuotaRESP
import QuotaRedis
import QuotaHarness
import Testing

@Suite("A claim spread over many leases", .serialized, .timeLimit(.minutes(3)))
struct SpreadClaimTests {
    static func bulkID(_ r: RESPValue) -> String? { if case .bulkString(let b?) = r { return String(buffer: b) } else { return nil } }

    static let small = 80   // qty-1 claims made first, cancelled one by one while the big claim waits
    static let big = 70     // the waiting claim: more than ClaimEvent.maxShares (64) tokens

    /// A real sidecar (journal, leases of 1) sells out a voucher in qty-1 claims while a silent host holds the
    /// last lease (so the pool is "recalling", not sold out); a claim of `big` parks; the qty-1 claims are
    /// cancelled one by one, each restock coming back to the parked claim as its own lease of 1 token.
    static func gather(_ redis: RedisServer, _ dir: TempDir) async throws
        -> (q: Quotad, c: RESPClient, ids: [String], answer: RESPValue)
    {
        _ = try await redis.store.createVoucher(id: "sp", limit: small + 1, perUser: 0, totalLimit: small + 1, region: "sg")
        let gen = try #require(try await redis.store.voucher("sp")?.generation)
        // A host that took a lease and went silent (partitioned, SIGSTOPped): the pool is not sold out while it holds it.
        let ghost = try await redis.store.lease(voucher: "sp", host: "ghost", req: "ghost.1", want: 1, need: 1,
                                                ttl: .seconds(120), gen: gen)
        guard case .granted = ghost else { throw TestError.failed("ghost lease: \(ghost)") }
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a", extraYAML: """
            lease: { min: 1, max: 1, ttl: 120 }
            limits: { tail_wait_ms: 60000, claim_timeout_ms: 60000 }

            """, durability: "journal")
        let c = try await RESPClient.connect(q.socket)
        var ids: [String] = []
        for i in 0..<small {
            let r = try await c.send("CLAIM", "sp", "u\(i)", "REQ", "r\(i)")
            ids.append(try #require(Self.bulkID(r), "claim \(i): \(r)"))
        }
        let cb = try await RESPClient.connect(q.socket)
        let bigTask = Task { try await cb.send("CLAIM", "sp", "whale", "QTY", "\(big)", "REQ", "big") }
        try await Task.sleep(for: .milliseconds(300))
        for id in ids {
            #expect(try await c.send("UNCLAIM", id) == .simpleString("OK"))
            try await Task.sleep(for: .milliseconds(60))
        }
        let answer = try await bigTask.value
        cb.close()
        return (q, c, ids, answer)
    }

    /// The claim waited for its tokens and they came (70 held here, on 70 leases): it must be served, if not at
    /// once then on a retry. With 1d4316e it is refused UNAVAILABLE, and every retry is refused again: the
    /// leases never gather, and the retries keep the voucher from going idle (its stock is never given back).
    @Test func aParkedClaimWhoseTokensArrivedOneLeaseAtATimeIsServed() async throws {
        let redis = try await RedisServer()
        let dir = TempDir()
        let (q, c, _, first) = try await Self.gather(redis, dir)
        var r = first
        var tries = 0
        while Self.bulkID(r) == nil && tries < 50 {
            try await Task.sleep(for: .milliseconds(100))
            r = try await c.send("CLAIM", "sp", "whale", "QTY", "\(Self.big)", "REQ", "big")
            tries += 1
        }
        let held = try await q.stat("tokens_local")
        #expect(Self.bulkID(r) != nil,
                "first answer \(first); after \(tries) retries over 5 s: \(r); tokens_local \(held)")
        c.close()
        _ = try await q.stop()
        withExtendedLifetime(redis) {}
    }

    /// On 1d4316e~1 (no guard): the claim is served with more than 64 shares, journaled, and a later claim is
    /// journaled after it. kill -9 and restart: what does recovery keep?
    @Test func aClaimWithMoreThan64SharesInTheJournalSurvivesARestart() async throws {
        let redis = try await RedisServer()
        let dir = TempDir()
        let (q, c, _, bigAnswer) = try await Self.gather(redis, dir)
        let bigID = try #require(Self.bulkID(bigAnswer), "the big claim: \(bigAnswer)")
        // The rest of the cancelled tokens are in the pool again: a later claim, journaled after the big one.
        var after = try await c.send("CLAIM", "sp", "later", "REQ", "after")
        for _ in 0..<50 where Self.bulkID(after) == nil {
            try await Task.sleep(for: .milliseconds(100))
            after = try await c.send("CLAIM", "sp", "later", "REQ", "after")
        }
        let afterID = try #require(Self.bulkID(after), "the later claim: \(after)")
        c.close()
        try await q.kill9()
        try await q.restart()
        let c2 = try await RESPClient.connect(q.socket)
        let big2 = try await c2.send("CLAIM", "sp", "whale", "QTY", "\(Self.big)", "REQ", "big")
        let after2 = try await c2.send("CLAIM", "sp", "later", "REQ", "after")
        let logs = q.allLogs
        let corrupt = logs.split(separator: "\n").filter { $0.contains("journal") && ($0.contains("corrupt") || $0.contains("trusted")) }
        #expect(corrupt.isEmpty, "recovery: \(corrupt.joined(separator: "\n"))")
        #expect(Self.bulkID(big2) == bigID, "REQ big retried after the restart: \(big2), first \(bigID)")
        #expect(Self.bulkID(after2) == afterID, "REQ after retried after the restart: \(after2), first \(afterID)")
        c2.close()
        _ = try await q.stop()
        let problems = try await redis.audit("sp", journals: [(host: "host-a", dir: q.journalDir)])
        #expect(problems.isEmpty, "audit: \(problems)")
        withExtendedLifetime(redis) {}
    }
}
