import QuotaConfig
import QuotaCore
import Testing

/// Bounded state under abuse (issue 15): the `REQ` table's budget, the negative cache of unknown
/// vouchers, byte-wise ids, and when a voucher's runtime may be dropped.
@Suite("Bounds: REQ table, unknown vouchers, ids as bytes, eviction")
struct BoundsTests {
    /// A machine with `durability: none` (answers at once) sharing `budget`, with `window` for REQ answers.
    func rig(budget: DedupeBudget?, window: Duration = .seconds(60), perUser: Int = 0) throws -> Rig {
        var r = Rig(durability: .none, perUser: perUser,
                    policy: LeasePolicy(min: 1000, max: 1000, ttl: .seconds(3600), safetyMargin: .seconds(2)))
        r.m.rules.dedupeBudget = budget
        r.m.rules.dedupeWindow = window
        _ = r.claim("warm-up")
        // A lease that outlives the test's clock (the rig's own grants live 10 s).
        let l = try #require(r.take().compactMap { if case .lease(let l) = $0 { return l } else { return nil } }.first)
        r.m.leaseAnswered(.granted(LeaseGrant(id: "1", granted: 1000, ttl: .seconds(3600), poolAfter: 500)), request: l,
                          trusted: true, now: r.clock.now, effects: &r.fx)
        _ = r.take()
        return r
    }

    func claimID(_ a: VoucherMachine.Answer?) -> String? {
        if case .claimID(let id)? = a?.spelled() { return id }
        return nil
    }

    func code(_ a: VoucherMachine.Answer?) -> QuotaErrorCode? {
        if case .refused(let e)? = a { return e.code }
        return nil
    }

    @Test func aFullTableRefusesNewRequestIDsBusyButStillAnswersKnownOnes() throws {
        let budget = DedupeBudget(maxEntries: 3, maxBytes: 1 << 20)
        var r = try rig(budget: budget)
        var ids: [String] = []
        for i in 0..<3 { ids.append(try #require(claimID(r.claim("u\(i)", req: "r\(i)").1))) }
        #expect(budget.entries == 3)
        let (_, full) = r.claim("u9", req: "r9")
        #expect(code(full) == .busy, "a new request id is refused, never silently forgotten: \(String(describing: full))")
        guard case .refused(let e)? = full else { return }
        #expect(e.message.contains("claims.max_dedupe_entries = 3"))
        #expect(budget.refused == 1 && budget.entries == 3)
        // Known ones are still answered with their claim ids.
        for i in 0..<3 { #expect(claimID(r.claim("u\(i)", req: "r\(i)").1) == ids[i]) }
        // A claim without REQ does not need the table.
        #expect(claimID(r.claim("u10").1) != nil)
    }

    @Test func expiredAnswersAreForgottenOldestFirstAndOnlyAfterTheirWindow() throws {
        let budget = DedupeBudget(maxEntries: 2, maxBytes: 1 << 20)
        var r = try rig(budget: budget, window: .seconds(10))
        let a = try #require(claimID(r.claim("u1", req: "a").1))
        r.clock.advance(.seconds(4))
        let b = try #require(claimID(r.claim("u2", req: "b").1))
        r.clock.advance(.seconds(5))  // a: 9 s old, b: 5 s old
        #expect(code(r.claim("u3", req: "c").1) == .busy, "both still within their window")
        #expect(claimID(r.claim("u1", req: "a").1) == a)
        r.clock.advance(.seconds(2))  // a: 11 s (expired), b: 7 s
        let c = try #require(claimID(r.claim("u3", req: "c").1), "the expired one made room at once")
        #expect(budget.entries == 2)
        #expect(claimID(r.claim("u2", req: "b").1) == b, "the one within its window is kept")
        #expect(claimID(r.claim("u3", req: "c").1) == c)
        // `a`'s window has passed: it is answered as new (a second claim), which is what the window means.
        #expect(code(r.claim("u1", req: "a").1) == .busy, "...but only when there is room")
        r.clock.advance(.seconds(4))  // b expired
        let a2 = try #require(claimID(r.claim("u1", req: "a").1))
        #expect(a2 != a)
    }

    @Test func theTickForgetsExpiredAnswersAndReleasesTheirBudget() throws {
        let budget = DedupeBudget(maxEntries: 100, maxBytes: 1 << 20)
        var r = try rig(budget: budget, window: .seconds(1))
        for i in 0..<50 { _ = r.claim("u\(i)", req: "req-\(i)") }
        #expect(budget.entries == 50 && r.m.dedupeCount == 50)
        #expect(budget.bytes == (0..<50).reduce(0) { $0 + "req-\($1)".utf8.count + DedupeBudget.entryOverhead })
        r.tick(.seconds(2))
        #expect(budget.entries == 0 && budget.bytes == 0 && r.m.dedupeCount == 0)
    }

    @Test func theByteBoundCountsRequestIDLengths() throws {
        let long = String(repeating: "x", count: 128)
        let budget = DedupeBudget(maxEntries: 1000, maxBytes: 3 * (128 + DedupeBudget.entryOverhead))
        var r = try rig(budget: budget)
        for i in 0..<3 { #expect(claimID(r.claim("u", req: long.dropLast(3) + "\(100 + i)").1) != nil) }
        #expect(code(r.claim("u", req: long.dropLast(3) + "999").1) == .busy)
        #expect(budget.bytes == budget.maxBytes && budget.entries == 3)
    }

    @Test func transientRefusalsAreNotKeptAndGiveTheirChargeBack() throws {
        let budget = DedupeBudget(maxEntries: 10, maxBytes: 1 << 20)
        var r = Rig(durability: .none)
        r.m.rules.dedupeBudget = budget
        r.m.rules.maxWaiting = 0  // nothing may park: no stock means BUSY, a transient answer
        var e: [VoucherMachine.Effect] = []
        r.m.loaded(.success(VoucherRecordInfo(status: .active, pool: 0, perUser: 0)), policy: r.m.stock.policy,
                   now: r.clock.now, effects: &e)
        let (_, a) = r.claim("u", req: "t1")
        #expect(code(a) == .busy, "\(String(describing: a))")
        #expect(budget.entries == 0 && budget.bytes == 0, "a transient answer is not kept")
    }

    @Test func answersRecoveredFromTheJournalAreKeptEvenOverTheBound() throws {
        let budget = DedupeBudget(maxEntries: 2, maxBytes: 1 << 20)
        var r = try rig(budget: budget)
        let now = r.clock.now
        r.m.restoreDedupe((0..<5).map { .init(req: "old-\($0)", claimID: "sg.h.x.\($0)", expires: now + .seconds(20), awaitingAck: false) })
        #expect(budget.entries == 5, "never dropped: forgetting one could grant a second claim")
        #expect(claimID(r.claim("u", req: "old-3").1) == "sg.h.x.3")
        #expect(code(r.claim("u", req: "new").1) == .busy)
        r.tick(.seconds(21))
        #expect(budget.entries == 0)
        #expect(claimID(r.claim("u", req: "new").1) != nil)
    }

    @Test func requestIDsAndUsersAreComparedAsBytesNotAsUnicodeText() throws {
        // "é" precomposed and decomposed: equal Swift strings, different bytes (and different ids in Redis).
        let pre = "caf\u{e9}", dec = "cafe\u{301}"
        #expect(pre == dec && ByteKey(pre) != ByteKey(dec))
        var r = try rig(budget: nil)
        let a = try #require(claimID(r.claim("u1", req: pre).1))
        let b = try #require(claimID(r.claim("u1", req: dec).1))
        #expect(a != b, "two request ids are one only when their bytes are")
        var p = try rig(budget: nil, perUser: 1)
        // Per-user: the local pre-check must not merge the two users (Redis would count them apart).
        _ = p.claim(pre)
        let fx = p.take()
        #expect(fx.contains { if case .journalIntent = $0 { return true }; if case .checkUser = $0 { return true }; return false })
        let (_, second) = p.claim(dec)
        #expect(code(second) != .userlimit, "a different user is not refused by the local pre-check")
    }

    @Test func theNegativeCacheIsBoundedAndExpires() {
        var c = ExpiringSet(capacity: 3, ttl: .seconds(1))
        var now = Instant(nanoseconds: 1_000_000_000)
        for k in ["a", "b", "c", "d"] { c.insert(k, now: now) }
        #expect(c.count == 3)
        #expect(!c.contains("a", now: now), "the oldest went first")
        #expect(c.contains("d", now: now) && c.contains("b", now: now))
        now = now + .milliseconds(1001)
        #expect(!c.contains("d", now: now), "expired")
        c.insert("e", now: now)
        #expect(c.count <= 1)
        for i in 0..<100_000 { c.insert("k\(i)", now: now) }
        #expect(c.count == 3)
    }

    @Test func aVoucherIsEvictableOnlyWhenItHoldsNothingAndWasIdle() throws {
        var r = Rig(durability: .journal)  // lease min/max 10, idle return 30 s (default policy)
        #expect(!r.m.isEvictable(now: r.clock.now), "loading")
        _ = r.claim("u", req: "q1")
        try r.grant(10)
        let recs = r.take().records
        #expect(!r.m.isEvictable(now: r.clock.now), "a claim in flight and a lease held")
        r.m.claimsRecorded(seqs: [recs[0].1], ok: true, now: r.clock.now, effects: &r.fx)
        r.m.rules.dedupeWindow = .seconds(60)
        r.tick(.seconds(31))  // idle: the lease goes back
        let back = r.take().returns
        #expect(back.count == 1)
        #expect(!r.m.isEvictable(now: r.clock.now), "its return is not answered yet")
        r.m.returnAnswered(back[0], outcome: .applied(9), now: r.clock.now, effects: &r.fx)
        #expect(!r.m.isEvictable(now: r.clock.now), "a REQ answer is still within its window")
        r.tick(.seconds(30))
        #expect(r.m.isEvictable(now: r.clock.now))
        // Unknown to Redis: evictable at once once its waiters are answered.
        let now = FakeClock().now
        var fx: [VoucherMachine.Effect] = []
        var m = VoucherMachine(voucher: "nope", rules: r.m.rules, policy: r.m.stock.policy, requestPrefix: "h.b.",
                               nextSeq: { 1 })
        _ = m.handle(.avail, ticket: 1, now: now, effects: &fx)
        #expect(!m.isEvictable(now: now))
        m.loaded(.success(nil), policy: m.stock.policy, now: now, effects: &fx)
        #expect(m.isEvictable(now: now))
    }

    @Test func aVoucherTheOperatorWarmsIsKept() {
        var r = Rig(durability: .none)
        r.clock.advance(.seconds(3600))
        #expect(r.m.isEvictable(now: r.clock.now), "idle, holding nothing")
        var fx: [VoucherMachine.Effect] = []
        r.m.warm(now: r.clock.now, effects: &fx)
        r.clock.advance(.seconds(3600))
        #expect(!r.m.isEvictable(now: r.clock.now), "the heartbeat would build it again and take another opening lease")
    }

    @Test func aScheduledVoucherIsKeptBeforeItsOpening() throws {
        var r = Rig(durability: .none)
        var fx: [VoucherMachine.Effect] = []
        let opens = SaleSchedule(startMs: 10_000_000, endMs: 0, redisNowMs: 1_000, sentAt: r.clock.now, receivedAt: r.clock.now)
        r.m.refreshed(VoucherRecordInfo(status: .active, pool: 1000, perUser: 0, schedule: opens), policy: r.m.stock.policy,
                      now: r.clock.now, effects: &fx)
        r.clock.advance(.seconds(3600))
        #expect(!r.m.isEvictable(now: r.clock.now), "it takes its opening lease in the warm-up window")
    }
}

@Suite("Bounds: configuration keys")
struct BoundsConfigTests {
    let minimal = """
        region: sg
        regions: { sg: { redis: "unix:///tmp/t/redis.sock" } }
        durability: none
        """

    func errorKey(_ overrides: [(String, String)]) -> String? {
        do {
            _ = try SidecarConfig.load(yaml: minimal, overrides: overrides, defaultHostID: "box")
            return nil
        } catch {
            return error.key
        }
    }

    @Test func defaultsAndOverrides() throws {
        let d = try SidecarConfig.load(yaml: minimal, defaultHostID: "box")
        #expect(d.limits.maxOutputBytes == 1 << 20 && d.limits.maxUnknownVouchers == 10_000)
        #expect(d.limits.maxBackgroundJobs == 100_000)
        #expect(d.claims.maxDedupeEntries == 1_000_000 && d.claims.maxDedupeBytes == 256 << 20)
        let c = try SidecarConfig.load(yaml: minimal, overrides: [
            ("limits.max_output_bytes", "65536"), ("limits.max_unknown_vouchers", "0"), ("limits.max_background_jobs", "10"),
            ("claims.max_dedupe_entries", "5"), ("claims.max_dedupe_bytes", "8192"),
        ], defaultHostID: "box")
        #expect(c.limits.maxOutputBytes == 65536 && c.limits.maxUnknownVouchers == 0 && c.limits.maxBackgroundJobs == 10)
        #expect(c.claims.maxDedupeEntries == 5 && c.claims.maxDedupeBytes == 8192)
    }

    @Test(arguments: [
        ("limits.max_output_bytes", "100"), ("limits.max_output_bytes", "lots"), ("limits.max_unknown_vouchers", "-1"),
        ("limits.max_background_jobs", "0"), ("claims.max_dedupe_entries", "0"), ("claims.max_dedupe_bytes", "10"),
    ])
    func badValuesAreRefusedNamingTheKey(_ key: String, _ value: String) {
        #expect(errorKey([(key, value)]) == key)
    }
}
