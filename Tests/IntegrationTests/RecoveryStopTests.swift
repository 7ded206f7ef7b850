import Foundation
import Glibc
import QuotaClient
import QuotaHarness
import QuotaJournal
import QuotaRedis
import Testing

/// A graceful stop that comes while the sidecar is still recovering the previous run (the chaos pass
/// restarts every sidecar once at the end and stops it 500 ms later; on a loaded machine that recovery
/// is not done by then).
@Suite("Recovery and a graceful stop", .serialized, .timeLimit(.minutes(3)))
struct RecoveryStopTests {
    /// The previous run was killed after Redis granted a lease but before the grant was journaled: its
    /// journal holds the lease request unanswered (and the lease it did journal). The next run is told to
    /// stop while its recovery still waits for Redis. It must not exit before the request is resolved and
    /// the leases are returned (within the drain bound): otherwise the lease granted unseen stays open in
    /// Redis for a stopped host whose journal never learned it (chaos: `J3 … not in its journal: stranded`).
    @Test func aStopDuringRecoveryStillLearnsTheUnansweredLeaseRequestAndReturnsEverything() async throws {
        // The request reaches Redis's socket only if no other call holds the sidecar's Redis connection when
        // Redis stops (one connection, calls in turn: a refresh caught waiting for its reply keeps the lease
        // request queued until it times out unsent). The refresh therefore runs once a minute here, and an
        // attempt where the request still did not reach Redis (a loaded machine) is set up again.
        var setup: (redis: RedisServer, dir: TempDir, q: Quotad)?
        for attempt in 1...8 where setup == nil {
            let redis = try await RedisServer()
            let dir = TempDir()
            _ = try await redis.store.createVoucher(id: "rq", limit: 100, perUser: 0, totalLimit: 100, region: "sg")
            let q = try await Quotad(redis: redis, dir: dir, host: "host-a",
                                     extraYAML: "redis_timeout_ms: 200\navail_refresh: 60\nlease: { min: 1, max: 1 }\n",
                                     durability: "journal")
            let c = try await RESPClient.connect(q.socket)
            // Leases of one token: the next claim needs a lease request.
            #expect(try await c.send("CLAIM", "rq", "warm").errorCode == nil, "scripts loaded, a lease held")
            try await eventually("no lease request in flight") { JournalRecovery.read(dir: q.journalDir).ledger.requests.isEmpty }
            let before = try await redis.account("rq").leased

            // Redis stops; a claim makes the sidecar journal a lease request and send it; the sidecar dies.
            redis.child?.signal(SIGSTOP)
            async let stuck = send(c, ["CLAIM", "rq", "stuck"], within: .seconds(5))
            try await eventually("the lease request is journaled (and then sent)") {
                !JournalRecovery.read(dir: q.journalDir).ledger.requests.isEmpty
            }
            // Time for the sidecar to write the request to Redis's socket (it sits there while Redis is stopped).
            try await Task.sleep(for: .milliseconds(1500))
            try await q.kill9()
            _ = await stuck
            c.close()
            // Redis executes the request it had already received: a lease granted that no journal holds.
            redis.child?.signal(SIGCONT)
            do {
                try await eventually("Redis granted the request of the dead run", timeout: .seconds(5)) {
                    try await redis.account("rq").leased > before
                }
                setup = (redis, dir, q)
            } catch {
                print("attempt \(attempt): the request had not reached Redis before the kill; setting up again")
            }
        }
        let (redis, dir, q) = try #require(setup, "in 8 attempts the lease request never reached Redis before the kill")
        let unanswered = JournalRecovery.read(dir: q.journalDir).ledger.requests
        let open = try await redis.store.leases(voucher: "rq").filter { $0.state == .open }
        try #require(open.contains { unanswered[$0.req] != nil },
                     "a lease is open for a request the journal has not resolved: \(open), \(unanswered)")

        // The next run starts while Redis is stopped again, and is stopped before its recovery got an answer.
        redis.child?.signal(SIGSTOP)
        try await q.restart()
        q.child.signal(SIGTERM)
        try await Task.sleep(for: .milliseconds(1500))
        redis.child?.signal(SIGCONT)
        let status = try await q.child.wait(timeout: .seconds(30))
        #expect(status == 0, "\(q.allLogs.suffix(2000))")

        let a = try await redis.account("rq")
        #expect(a.leases == 0, "\(a.leases) lease(s) left open for the stopped host (\(a.outstanding) tokens)")
        let problems = try await redis.audit("rq", journals: [("host-a", q.journalDir)])
        #expect(problems == [], "\(problems)")
        withExtendedLifetime(dir) {}
    }
}
