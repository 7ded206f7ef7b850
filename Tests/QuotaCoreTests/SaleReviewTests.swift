import QuotaCore
import Testing

/// Review of the sale schedule / opening lease / exact end change (0417b1e, 387a14f).
/// Each test states a promise of the change and fails on the code under review.
@Suite("Sale review: schedule, opening leases, exact end")
struct SaleReviewTests {
    static let redisNow: Int64 = 1_800_000_000_000

    /// A schedule as if Redis's clock read `redisNow` exactly at `at` (a zero round trip).
    static func schedule(startIn: Duration?, endIn: Duration?, at: Instant) -> SaleSchedule {
        SaleSchedule(startMs: startIn.map { redisNow + $0.milliseconds } ?? 0,
                     endMs: endIn.map { redisNow + $0.milliseconds } ?? 0,
                     redisNowMs: redisNow, sentAt: at, receivedAt: at)
    }

    /// A machine (journal durability) loaded with `info`, on a fake clock.
    struct SaleRig {
        var m: VoucherMachine
        var clock = FakeClock()
        var fx: [VoucherMachine.Effect] = []
        var ticket = 0

        init(policy: LeasePolicy, info: (Instant) -> VoucherRecordInfo, tailWait: Duration = .seconds(1)) {
            var rules = ClaimRules(region: "sg", host: "h", idPrefix: "sg.h.b.", durability: .journal)
            rules.tailWait = tailWait
            let seq = SeqSource()
            m = VoucherMachine(voucher: "v", rules: rules, policy: policy, requestPrefix: "h.b.", nextSeq: { seq.next() },
                               wallClock: { 1_000 })
            var e: [VoucherMachine.Effect] = []
            _ = m.handle(.avail, ticket: -1, now: clock.now, effects: &e)
            m.loaded(.success(info(clock.now)), policy: policy, now: clock.now, effects: &e)
            fx = e
        }

        mutating func take() -> [VoucherMachine.Effect] {
            defer { fx.removeAll() }
            return fx
        }

        mutating func claim(qty: Int = 1) -> (Int, VoucherMachine.Answer?) {
            ticket += 1
            let a = m.handle(.claim(qty: qty, user: "u\(ticket)", req: nil), ticket: ticket, now: clock.now, effects: &fx)
            return (ticket, a)
        }

        /// The lease request among the effects so far (taken out).
        mutating func leaseRequest() -> LeaseRequest? {
            var found: LeaseRequest?
            fx.removeAll {
                if case .lease(let l) = $0 { found = l; return true }
                return false
            }
            return found
        }

        /// Answer `l` with a grant (and make its grant record durable).
        mutating func grant(_ l: LeaseRequest, id: String, granted: Int, poolAfter: Int) {
            let g = LeaseGrant(id: id, granted: granted, ttl: .seconds(10), poolAfter: poolAfter)
            m.leaseAnswered(.granted(g), request: l, trusted: true, now: clock.now, effects: &fx)
            if fx.contains(where: { if case .recordGrant = $0 { return true }; return false }) {
                fx.removeAll { if case .recordGrant = $0 { return true }; return false }
                m.grantRecorded(g, request: l, ok: true, now: clock.now, effects: &fx)
            }
        }

        /// Make every claim record so far durable.
        mutating func commitRecords() {
            for (_, seq) in fx.records { m.claimsRecorded(seqs: [seq], ok: true, now: clock.now, effects: &fx) }
        }

        mutating func tick(_ d: Duration) {
            clock.advance(d)
            m.tick(now: clock.now, effects: &fx)
        }
    }

    // MARK: - Opening

    /// The opening lease that happens to take the last tokens of the pool (hosts × opening >= pool, e.g. an
    /// explicit `lease.opening`, or `min` clamping a small allocation) is given back by `sweepTail` as soon as
    /// its grant is recorded, seconds before the opening, and the host then enters the opening in tail mode.
    @Test func anOpeningLeaseThatEmptiesThePoolIsStillHeldAtTheOpening() throws {
        let policy = LeasePolicy(min: 10, max: 1000, ttl: .seconds(10))
        var r = SaleRig(policy: policy, info: { now in
            VoucherRecordInfo(status: .active, pool: 400, perUser: 0,
                              schedule: SaleReviewTests.schedule(startIn: .seconds(15), endIn: nil, at: now), opening: 400)
        })
        _ = r.take()
        r.tick(.seconds(6))  // 9 s before the opening: inside the 10 s warm-up window
        let req = r.leaseRequest()
        let l = try #require(req, "the opening lease is asked for")
        #expect(l.want == 400)
        r.grant(l, id: "1", granted: 400, poolAfter: 0)
        let fx = r.take()
        #expect(fx.returns.isEmpty, "the opening lease is given back before the sale even opens: \(fx.returns)")
        #expect(r.m.stock.available(now: r.clock.now) == 400)
        #expect(!r.m.stock.tail, "the host enters its opening in end-of-sale mode (leases = exact need)")
    }

    // MARK: - The end

    /// Redis refused a refill because the sale ended (`set-schedule --end` moved it earlier than this host's
    /// last refresh knew): the host keeps serving its held leases once the 250 ms block is over, until its
    /// next refresh, although Redis has just told it the sale is over.
    @Test func aLeaseRefusedBecauseTheSaleEndedStopsServingHeldStock() throws {
        var s = VoucherStock(policy: LeasePolicy(min: 10, max: 10, ttl: .seconds(10)))
        var c = FakeClock()
        _ = s.claim(qty: 1, now: c.now)
        let r = try #require(lease(&s, now: c.now, waiting: 1))
        s.leaseGranted(LeaseGrant(id: "1", granted: 10, ttl: .seconds(10), poolAfter: 500), sentAt: r.sentAt, now: c.now)
        for _ in 0..<5 { guard case .served = s.claim(qty: 1, now: c.now) else { Issue.record("not served"); return } }
        // At the low watermark: a refill is asked for, and Redis says the sale has ended.
        let refill = try #require(lease(&s, now: c.now, waiting: 0))
        _ = refill
        s.leaseRefused(.schedule("sale ended at \(formatUTC(ms: Self.redisNow)) (Redis time)"), now: c.now)
        #expect(!s.takeReturns().isEmpty, "Redis said the sale ended: the held lease should go back")
        c.advance(.milliseconds(300))
        if case .served = s.claim(qty: 1, now: c.now) {
            Issue.record("a token was served after Redis answered that the sale had ended")
        }
    }

    /// The caller's own open leases are counted as `held` by the LEASE script, and the recall it publishes
    /// reaches the caller too: the host gives back the partial stock its own parked claim waits for, re-leases
    /// it, finds the pool empty again (its own lease is held), recalls itself again, ... until tail_wait_ms.
    /// `recall(now:)` says "give back everything no claim here waits for" but calls `returnAll()`.
    @Test func aRecallKeepsStockThatAParkedClaimHereWaitsFor() throws {
        let policy = LeasePolicy(min: 3, max: 3, ttl: .seconds(10))
        var r = SaleRig(policy: policy, info: { _ in VoucherRecordInfo(status: .active, pool: 100, perUser: 0) })
        _ = r.take()
        _ = r.claim()
        let firstReq = r.leaseRequest()
        let first = try #require(firstReq)
        r.grant(first, id: "1", granted: 3, poolAfter: 2)
        r.commitRecords()
        _ = r.take()
        #expect(r.m.stock.available(now: r.clock.now) == 2)
        // A claim of 3: 2 here, 1 more needed; the pool is empty and the only open lease is this host's own.
        let (t, a) = r.claim(qty: 3)
        #expect(a == nil, "parked")
        let pollReq = r.leaseRequest()
        let poll = try #require(pollReq)
        r.m.leaseAnswered(.refused(.recalling(held: 1)), request: poll, trusted: true, now: r.clock.now, effects: &r.fx)
        _ = r.take()
        // The script published the recall; this host is subscribed too.
        r.m.recall(now: r.clock.now, effects: &r.fx)
        let fx = r.take()
        #expect(fx.returns.isEmpty, "the 2 tokens the parked claim waits for were given back: \(fx.returns)")
        #expect(r.m.stock.available(now: r.clock.now) == 2)
        _ = t
    }

    /// `heldElsewhere` is set by a `.recalling` answer and only cleared by SOLDOUT or a refill of the pool;
    /// a later grant leaves it stale, so a claim parked later for any reason (a slow lease round trip) is
    /// answered "the region's last tokens are on N leases being recalled" after tail_wait_ms.
    @Test func heldElsewhereIsForgottenOnceALeaseIsGranted() throws {
        var s = VoucherStock(policy: LeasePolicy(min: 10, max: 1000, ttl: .seconds(10)))
        let c = FakeClock()
        _ = s.claim(qty: 1, now: c.now)
        _ = try #require(lease(&s, now: c.now, waiting: 1))
        s.leaseRefused(.recalling(held: 2), now: c.now)
        let poll = try #require(lease(&s, now: c.now + VoucherStock.recallPoll, waiting: 1))
        s.leaseGranted(LeaseGrant(id: "7", granted: 1, ttl: .seconds(10), poolAfter: 0), sentAt: poll.sentAt, now: c.now)
        #expect(s.heldElsewhere == 0, "a stale count of leases 'being recalled'")
    }

    // MARK: - Bad input

    /// `quotactl lease set --opening N --target-seconds T` accepts any N >= 1 and T > 0; the opening seeds the
    /// rate with N / T, which the refresher reports with `Int(rate.rounded())` (QuotaStore.vouchersWithClock):
    /// past Int.max that traps, on every sidecar warming the voucher, again after each restart.
    @Test func anOpeningSeedStaysWithinWhatTheRefresherCanReport() throws {
        var p = LeasePolicy(min: 10, max: 5000, targetSeconds: 0.001, ttl: .seconds(10))
        p.opening = 10_000_000_000_000_000
        var s = VoucherStock(policy: p)
        var c = FakeClock()
        s.setSchedule(Self.schedule(startIn: .seconds(5), endIn: nil, at: c.now), now: c.now)
        s.prepareOpening(p.openingSize(regionLimit: 1_000_000, hosts: 1))
        c.advance(.seconds(1))
        _ = try #require(lease(&s, now: c.now, waiting: 0))
        #expect(s.rate.rate < Double(Int.max), "Int(\(s.rate.rate).rounded()) traps in the refresher")
    }
}

/// A start (or end) more than ~292 years after Redis's now (e.g. `--start 9999-12-31T00:00:00Z` as a
/// "not scheduled yet" placeholder) makes `Duration.nanosecondsClamped` clamp to Int64.max and
/// `formatSeconds` add 50 ms to it: an arithmetic overflow trap. The first CLAIM that loads such a voucher is
/// decided with `now == receivedAt`, so `o - now` is exactly the clamp: the sidecar crashes. quotactl's
/// `describeSchedule` (set-schedule, voucher show) traps the same way after writing the schedule.
@Suite("Sale review: far-future schedule")
struct SaleReviewFarFutureTests {
    @Test func formattingAFarFutureDurationDoesNotTrap() async {
        await #expect(processExitsWith: .success) {
            _ = formatSeconds(.milliseconds(253_402_214_400_000 - 1_800_000_000_000))
        }
    }

    @Test func aClaimOfAVoucherOpeningInYear9999IsInactiveNotACrash() async {
        await #expect(processExitsWith: .success) {
            var s = VoucherStock(policy: LeasePolicy())
            let now = Instant(nanoseconds: 1_000_000_000)
            s.setSchedule(SaleSchedule(startMs: 253_402_214_400_000, endMs: 0, redisNowMs: 1_800_000_000_000,
                                       sentAt: now, receivedAt: now), now: now)
            _ = s.claim(qty: 1, now: now)
        }
    }
}
