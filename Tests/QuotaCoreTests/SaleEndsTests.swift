import QuotaCore
import Testing

@Suite("A sale's two ends in the stock")
struct SaleEndsTests {
    func stock() -> VoucherStock { VoucherStock(policy: LeasePolicy(min: 10, max: 1000, ttl: .seconds(10))) }

    /// A schedule as if Redis's clock read `redisNow` exactly at `at` (a zero round trip).
    func schedule(startIn: Duration?, endIn: Duration?, at: Instant) -> SaleSchedule {
        let now: Int64 = 1_800_000_000_000
        return SaleSchedule(startMs: startIn.map { now + $0.milliseconds } ?? 0, endMs: endIn.map { now + $0.milliseconds } ?? 0,
                            redisNowMs: now, sentAt: at, receivedAt: at)
    }

    @Test func claimsBeforeTheOpeningAreInactiveWithTheTimeAndServedAfterIt() throws {
        var s = stock()
        var c = FakeClock()
        s.setSchedule(schedule(startIn: .seconds(5), endIn: nil, at: c.now), now: c.now)
        guard case .reject(let e) = s.claim(qty: 1, now: c.now) else { Issue.record("served before the opening"); return }
        #expect(e.code == .inactive)
        #expect(e.message.contains("sale not started: opens at 2027-01-15T08:00:05.000Z"))
        #expect(e.message.contains("in 5.0 s"))
        #expect(s.nextLease(now: c.now, waiting: 0) == nil, "no lease before the opening unless warmed")
        c.advance(.seconds(5))
        #expect(s.claim(qty: 1, now: c.now) == .wait)
    }

    @Test func aWarmedVoucherTakesItsOpeningLeaseInTheWarmUpWindowAndServesOnlyAfterTheOpening() throws {
        var s = stock()
        var c = FakeClock()
        s.setSchedule(schedule(startIn: .seconds(30), endIn: nil, at: c.now), now: c.now)
        s.prepareOpening(400)
        #expect(s.nextLease(now: c.now, waiting: 0) == nil, "30 s before: outside the 10 s warm-up window")
        c.advance(.seconds(21))
        let r = try #require(lease(&s, now: c.now, waiting: 0))
        #expect(r.want == 400 && r.need == 400)
        s.leaseGranted(LeaseGrant(id: "1", granted: 400, ttl: .seconds(10), poolAfter: 1600), sentAt: r.sentAt, now: c.now)
        #expect(s.nextLease(now: c.now, waiting: 0) == nil, "one opening lease")
        if case .served = s.claim(qty: 1, now: c.now) { Issue.record("served 9 s before the opening") }
        // Not returned as idle, and renewed, until the opening.
        c.advance(.seconds(5))
        s.returnIfIdle(now: c.now)
        #expect(s.available(now: c.now) == 400)
        #expect(s.renewals(now: c.now) == ["1"])
        s.renewed("1", outcome: .renewed(ttl: .seconds(10)), sentAt: c.now, now: c.now)
        c.advance(.seconds(4))
        guard case .served = s.claim(qty: 1, now: c.now) else { Issue.record("not served at the opening"); return }
        // After the opening, leases are sized for the demand the opening was sized for.
        #expect(s.rate.rate >= 200)
    }

    @Test func pastTheEndEverythingGoesBackAndClaimsAreInactive() throws {
        var s = stock()
        var c = FakeClock()
        s.setSchedule(schedule(startIn: nil, endIn: .seconds(2), at: c.now), now: c.now)
        _ = s.claim(qty: 1, now: c.now)
        let r = try #require(lease(&s, now: c.now, waiting: 1))
        s.leaseGranted(LeaseGrant(id: "1", granted: 10, ttl: .seconds(10), poolAfter: 50), sentAt: r.sentAt, now: c.now)
        guard case .served = s.claim(qty: 1, now: c.now) else { Issue.record("not served in the sale"); return }
        c.advance(.seconds(2))
        guard case .reject(let e) = s.claim(qty: 1, now: c.now) else { Issue.record("served after the end"); return }
        #expect(e.code == .inactive && e.message.hasPrefix("sale ended at"))
        #expect(s.takeReturns() == [ReturnRequest(leaseId: "1", granted: 10, returnedTotal: 9, close: true)])
        #expect(s.nextLease(now: c.now, waiting: 5) == nil)
    }

    @Test func anEmptyPoolWithLeasesHeldElsewhereWaitsAndPollsInsteadOfSoldOut() throws {
        var s = stock()
        var c = FakeClock()
        _ = s.claim(qty: 1, now: c.now)
        let r = try #require(lease(&s, now: c.now, waiting: 1))
        s.leaseRefused(.recalling(held: 2), now: c.now)
        #expect(s.tail && !s.soldOut && s.heldElsewhere == 2)
        #expect(s.retryParked(qty: 1, now: c.now) == .wait, "a poll is due: the claim keeps waiting")
        #expect(s.nextLease(now: c.now, waiting: 1) == nil, "not before the poll interval")
        c.advance(VoucherStock.recallPoll)
        let poll = try #require(lease(&s, now: c.now, waiting: 1))
        #expect(poll.req != r.req && poll.want == 1 && poll.need == 1)
        s.leaseGranted(LeaseGrant(id: "4", granted: 1, ttl: .seconds(10), poolAfter: 0), sentAt: poll.sentAt, now: c.now)
        guard case .served = s.retryParked(qty: 1, now: c.now) else { Issue.record("recalled token not served"); return }
    }

    @Test func soldOutOnlyWhenRedisSaysNoLeaseIsHeld() throws {
        var s = stock()
        let c = FakeClock()
        _ = s.claim(qty: 1, now: c.now)
        _ = try #require(lease(&s, now: c.now, waiting: 1))
        s.leaseRefused(.soldOut(abandoned: 1), now: c.now)
        guard case .reject(let e) = s.retryParked(qty: 1, now: c.now) else { Issue.record("not refused"); return }
        #expect(e.code == .soldout)
        #expect(e.message.contains("1 leases of hosts silent past their expiry await reconciliation"))
    }

    /// UNCLAIM of a claim whose lease had closed restocks its tokens to the pool: the host that did it asks for a
    /// lease at its next claim instead of answering SOLDOUT until its next refresh (up to `avail_refresh`).
    @Test func thisHostsOwnRestockEndsItsSoldOutAtOnce() throws {
        var s = stock()
        let c = FakeClock()
        _ = s.claim(qty: 1, now: c.now)
        _ = try #require(lease(&s, now: c.now, waiting: 1))
        s.leaseRefused(.soldOut(abandoned: 0), now: c.now)
        guard case .reject(let e) = s.claim(qty: 1, now: c.now) else { Issue.record("not refused"); return }
        #expect(e.code == .soldout && s.soldOut)
        s.poolRestocked(0)
        #expect(s.soldOut, "nothing restocked: still sold out")
        s.poolRestocked(3)
        #expect(!s.soldOut)
        guard case .wait = s.claim(qty: 1, now: c.now) else { Issue.record("a claim after the restock did not wait for a lease"); return }
        let r = try #require(lease(&s, now: c.now, waiting: 1), "a lease is asked at once")
        s.leaseGranted(LeaseGrant(id: "2", granted: 3, ttl: .seconds(10), poolAfter: 0), sentAt: r.sentAt, now: c.now)
        guard case .served = s.retryParked(qty: 1, now: c.now) else { Issue.record("the restocked token not served"); return }
    }

    @Test func aRecallGivesBackEveryLeaseAtOnceAndClosesFullyServedOnes() throws {
        var s = stock()
        let c = FakeClock()
        _ = s.claim(qty: 1, now: c.now)
        let r = try #require(lease(&s, now: c.now, waiting: 1))
        s.leaseGranted(LeaseGrant(id: "1", granted: 10, ttl: .seconds(10), poolAfter: 500), sentAt: r.sentAt, now: c.now)
        guard case .served(let shares) = s.claim(qty: 3, now: c.now, inFlight: true) else { Issue.record("not served"); return }
        s.recall(now: c.now, waiting: 0)
        #expect(s.available(now: c.now) == 0, "nothing is served after a recall")
        #expect(s.takeReturns().isEmpty, "the lease closes only when its claim in flight settles")
        s.abort(shares, now: c.now)
        #expect(s.takeReturns() == [ReturnRequest(leaseId: "1", granted: 10, returnedTotal: 10, close: true)])
    }

    @Test func nearTheEndTokensARefusedClaimGaveBackStayUntilAnotherHostRecallsThem() throws {
        var s = stock()
        let c = FakeClock()
        _ = s.claim(qty: 2, now: c.now)
        let r = try #require(lease(&s, now: c.now, waiting: 2))
        s.leaseGranted(LeaseGrant(id: "1", granted: 2, ttl: .seconds(10), poolAfter: 0), sentAt: r.sentAt, now: c.now)
        #expect(s.tail)
        guard case .served(let shares) = s.claim(qty: 2, now: c.now, inFlight: true) else { Issue.record("not served"); return }
        s.abort(shares, now: c.now)  // e.g. USERLIMIT: the tokens are back in lease 1
        #expect(s.available(now: c.now) == 2)
        s.sweepTail(waiting: 0, now: c.now)
        #expect(s.available(now: c.now) == 2, "this host found the pool empty itself: it keeps serving what it holds")
        s.recall(now: c.now, waiting: 0)
        #expect(s.available(now: c.now) == 0, "another host recalled: nobody here waits, so it goes back")
        #expect(s.takeReturns() == [ReturnRequest(leaseId: "1", granted: 2, returnedTotal: 2, close: true)])
    }

    @Test func theTailEndsWhenThePoolIsRefilled() {
        var s = stock()
        s.leaseRefused(.recalling(held: 1), now: FakeClock().now)
        s.refreshed(pool: 5)
        #expect(s.tail, "a few recalled tokens are still the end of the sale")
        s.refreshed(pool: 10_000)
        #expect(!s.tail)
    }

    @Test func openingSizeIsHalfTheAllocationOverTheHostsUpToMaxSoEveryHostGetsOne() {
        let p = LeasePolicy(min: 10, max: 5000)
        #expect(p.openingSize(regionLimit: 20_000, hosts: 1) == 5000)
        #expect(p.openingSize(regionLimit: 20_000, hosts: 4) == 2500)
        // Not raised to min: 8 hosts × 10 would take 80 of 100 and leave late hosts nothing.
        #expect(p.openingSize(regionLimit: 100, hosts: 8) == 7)
        #expect(p.openingSize(regionLimit: 5, hosts: 8) == 1)
        var q = p
        q.opening = 123
        #expect(q.openingSize(regionLimit: 20_000, hosts: 4) == 123)
        // An explicit opening is capped at an equal share, so hosts × opening never exceeds the allocation.
        #expect(q.openingSize(regionLimit: 200, hosts: 4) == 50)
    }

    @Test func utcFormattingMatchesRFC3339() {
        #expect(formatUTC(ms: 0) == "1970-01-01T00:00:00.000Z")
        #expect(formatUTC(ms: 1_800_000_000_123) == "2027-01-15T08:00:00.123Z")
        #expect(formatUTC(ms: 951_782_400_000) == "2000-02-29T00:00:00.000Z")
    }
}
