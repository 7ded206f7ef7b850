import QuotaCore
import Testing

/// A fake monotonic clock: tests move time by hand.
/// `nextLease` through a function, so `#require` can take its result.
func lease(_ s: inout VoucherStock, now: Instant, waiting: Int) -> LeaseRequest? {
    s.nextLease(now: now, waiting: waiting)
}

/// A stock holding leases of `sizes` tokens (ids "1", "2", …, leases of at most 1 asked), each grant leaving
/// `poolAfter` in the pool (0: the sale's tail).
func spreadStock(_ sizes: [Int], _ c: FakeClock, poolAfter: Int = 1_000) throws -> VoucherStock {
    var s = VoucherStock(policy: LeasePolicy(min: 1, max: 1))
    for (i, n) in sizes.enumerated() {
        let r = try #require(lease(&s, now: c.now, waiting: 100_000), "lease \(i)")
        s.leaseGranted(LeaseGrant(id: "\(i + 1)", granted: n, ttl: .seconds(10), poolAfter: poolAfter), sentAt: r.sentAt, now: c.now)
    }
    return s
}

struct FakeClock {
    var now = Instant(nanoseconds: 1_000_000_000)
    mutating func advance(_ d: Duration) { now = now + d }
}

@Suite("Lease policy")
struct LeasePolicyTests {
    @Test func leaseSizeFollowsDemandClampedToMinAndMax() {
        let p = LeasePolicy(min: 10, max: 1000, targetSeconds: 2)
        #expect(p.leaseSize(rate: 0) == 10)
        #expect(p.leaseSize(rate: 3) == 10)
        #expect(p.leaseSize(rate: 100) == 200)
        #expect(p.leaseSize(rate: 1_000_000) == 1000)
    }

    @Test func refillThresholdIsTheWatermarkFractionOfTheLease() {
        let p = LeasePolicy(lowWatermark: 0.25)
        #expect(p.refillThreshold(leaseSize: 100) == 25)
        #expect(p.refillThreshold(leaseSize: 3) == 0)
    }

    @Test func serveDeadlineIsSentTimePlusTTLMinusMargin() {
        let p = LeasePolicy(ttl: .seconds(10), safetyMargin: .seconds(2))
        let t0 = Instant(nanoseconds: 5_000_000_000)
        #expect(p.serveDeadline(sentAt: t0, ttl: .seconds(10)) == t0 + .seconds(8))
    }

    @Test func defaultMarginIsAFifthOfTTLButAtLeastOneSecond() {
        #expect(LeasePolicy(ttl: .seconds(10)).safetyMargin == .seconds(2))
        #expect(LeasePolicy(ttl: .seconds(3)).safetyMargin == .seconds(1))
        #expect(LeasePolicy(ttl: .seconds(2)).safetyMargin == .seconds(1))
        #expect(LeasePolicy(ttl: .seconds(1)).safetyMargin < .seconds(1))
    }

    @Test func invalidPoliciesAreRefusedWithTheFieldName() {
        #expect(throws: QuotaError(.err, "lease max must be >= min")) { try LeasePolicy(min: 10, max: 5).validate() }
        #expect(throws: QuotaError(.err, "lease min must be >= 1")) { try LeasePolicy(min: 0).validate() }
    }

    @Test func overridesLayerRegionThenVoucherOverTheHostDefault() {
        let base = LeasePolicy(min: 10, max: 100)
        let region = LeasePolicyOverride(min: 20, ttlSeconds: 4)
        let voucher = LeasePolicyOverride(max: 50)
        let p = region.overlaid(by: voucher).applied(to: base)
        #expect(p.min == 20 && p.max == 50 && p.ttl == .seconds(4))
        #expect(p.safetyMargin < p.ttl)
    }

    @Test func rateEstimatorTracksDemandAndDecaysWhenIdle() {
        var r = RateEstimator()
        var c = FakeClock()
        for _ in 0..<40 {
            r.record(25, now: c.now)
            c.advance(.milliseconds(25))
        }
        #expect(r.rate > 700 && r.rate < 1300)
        for _ in 0..<40 {
            c.advance(.milliseconds(250))
            r.roll(now: c.now)
        }
        #expect(r.rate < 1)
    }
}

@Suite("Voucher stock")
struct VoucherStockTests {
    func stock(_ p: LeasePolicy = LeasePolicy(min: 10, max: 100, ttl: .seconds(10), safetyMargin: .seconds(2)))
        -> VoucherStock
    {
        VoucherStock(policy: p)
    }

    @Test func firstClaimWaitsAndAsksForALease() throws {
        var s = stock()
        let c = FakeClock()
        #expect(s.claim(qty: 1, now: c.now) == .wait)
        let req = try #require(lease(&s, now: c.now, waiting: 1))
        #expect(req.want == 10 && req.need == 1 && req.sentAt == c.now)
        #expect(s.nextLease(now: c.now, waiting: 1) == nil, "only one lease in flight")
    }

    @Test func grantedLeaseServesExactlyItsTokens() throws {
        var s = stock()
        var c = FakeClock()
        _ = s.claim(qty: 1, now: c.now)
        let req = try #require(lease(&s, now: c.now, waiting: 1))
        c.advance(.milliseconds(1))
        s.leaseGranted(LeaseGrant(id: "1", granted: 10, ttl: .seconds(10), poolAfter: 0), sentAt: req.sentAt, now: c.now)
        var served = 0
        for _ in 0..<15 {
            if case .served = s.claim(qty: 1, now: c.now) { served += 1 }
        }
        #expect(served == 10)
        // The pool was empty after this grant, but other hosts may hold stock: not SOLDOUT yet, ask Redis.
        #expect(s.claim(qty: 1, now: c.now) == .wait)
        #expect(s.tail)
        let again = try #require(lease(&s, now: c.now, waiting: 1))
        #expect(again.want == 1, "near the end a lease asks for exactly what waits")
        s.leaseRefused(.soldOut(abandoned: 0), now: c.now)
        #expect(s.claim(qty: 1, now: c.now) == .reject(QuotaError(.soldout, "voucher sold out in this region")))
    }

    /// A claim takes from the oldest lease first: one share while it has enough, else a share of each lease it
    /// drains; a fully served lease is finished; tokens of claims in flight are pinned to the lease they came from.
    @Test func aClaimTakesOneShareOfTheFirstLeaseOrASpreadOverTheLeasesItDrains() throws {
        var s = stock(LeasePolicy(min: 5, max: 5, lowWatermark: 0.9))
        let c = FakeClock()
        _ = s.claim(qty: 1, now: c.now)
        let r1 = try #require(lease(&s, now: c.now, waiting: 1))
        s.leaseGranted(LeaseGrant(id: "1", granted: 5, ttl: .seconds(10), poolAfter: 100), sentAt: r1.sentAt, now: c.now)
        guard case .served(let a) = s.retryParked(qty: 1, now: c.now) else { Issue.record("parked claim not served"); return }
        #expect(a == [ClaimShare(leaseId: "1", tokens: 1)])
        let r2 = try #require(lease(&s, now: c.now, waiting: 0), "4 of 5 left: under the watermark")
        s.leaseGranted(LeaseGrant(id: "2", granted: 5, ttl: .seconds(10), poolAfter: 100), sentAt: r2.sentAt, now: c.now)
        guard case .served(let b) = s.claim(qty: 3, now: c.now, inFlight: true) else { Issue.record("not served"); return }
        #expect(b == [ClaimShare(leaseId: "1", tokens: 3)], "one share while the first lease has enough")
        guard case .served(let d) = s.claim(qty: 4, now: c.now, inFlight: true) else { Issue.record("not served"); return }
        #expect(d == [ClaimShare(leaseId: "1", tokens: 1), ClaimShare(leaseId: "2", tokens: 3)], "the first lease drained")
        #expect(s.finishedLeases.map(\.id) == ["1"] && s.leases.map(\.id) == ["2"])
        #expect(s.finishedLeases[0].served == 5 && s.finishedLeases[0].pending == 4)
        #expect(s.leases[0].served == 3 && s.leases[0].pending == 3)
        guard case .served(let e) = s.claim(qty: 2, now: c.now) else { Issue.record("not served"); return }
        #expect(e == [ClaimShare(leaseId: "2", tokens: 2)], "exactly what is left: one share, the lease finished")
        #expect(s.leases.isEmpty && s.finishedLeases.map(\.id) == ["1", "2"] && s.finishedLeases[1].pending == 3)
    }

    /// A claim's shares are at most ``ClaimEvent/maxShares``: the journal refuses to decode more, and a
    /// cancellation says which share went where in 64 bits. Stock spread over more small leases (a sale's tail,
    /// tokens coming back one small lease at a time while a large claim waits) must not serve one claim from more.

    @Test func aClaimSpreadOverMoreThan64LeasesIsServedFromTheLargest() throws {
        let c = FakeClock()
        // 64 one-token leases ahead of a lease of 1000: a claim of 100 comes from the large one (by helper-39).
        var s = try spreadStock(Array(repeating: 1, count: ClaimEvent.maxShares) + [1_000], c)
        guard case .served(let big) = s.claim(qty: 100, now: c.now, inFlight: true) else { Issue.record("not served"); return }
        #expect(big == [ClaimShare(leaseId: "65", tokens: 100)])
        // 70 one-token leases and one of 10: a claim of 73 takes the 10 and 63 ones, 64 shares.
        var t = try spreadStock(Array(repeating: 1, count: 70) + [10], c)
        guard case .served(let spread) = t.claim(qty: 73, now: c.now) else { Issue.record("not served"); return }
        #expect(spread.count == ClaimEvent.maxShares && spread.map(\.tokens).reduce(0, +) == 73)
        #expect(spread.last == ClaimShare(leaseId: "71", tokens: 10) && spread.first == ClaimShare(leaseId: "1", tokens: 1))
        #expect(t.available(now: c.now) == 7 && t.leases.count == 7 && t.finishedLeases.count == 64,
                "every lease it emptied is finished, wherever it stood")
        guard case .served(let rest) = t.claim(qty: 7, now: c.now) else { Issue.record("the rest not served"); return }
        #expect(rest.count == 7 && t.leases.isEmpty)
    }

    @Test func aClaimTheLargest64LeasesCannotCoverGivesEveryLeaseBackAndWaitsForOne() throws {
        var c = FakeClock()
        let n = ClaimEvent.maxShares + 1
        var s = try spreadStock(Array(repeating: 1, count: n), c)
        #expect(s.available(now: c.now) == n)
        #expect(s.claim(qty: n, now: c.now) == .wait, "not served from \(n) leases, not refused while the tokens are here")
        #expect(s.available(now: c.now) == 0 && s.leases.isEmpty)
        let back = s.takeReturns()
        #expect(back.count == n && back.allSatisfy { $0.close } && s.counters.consolidations == 1, "every lease given back")
        #expect(s.retryParked(qty: n, now: c.now) == .wait, "it waits for a lease")
        c.advance(.milliseconds(1))
        let r = try #require(lease(&s, now: c.now, waiting: n), "a lease of what it needs is asked")
        #expect(r.need == n)
        s.leaseGranted(LeaseGrant(id: "one", granted: n, ttl: .seconds(10), poolAfter: 0), sentAt: r.sentAt, now: c.now)
        guard case .served(let shares) = s.retryParked(qty: n, now: c.now) else { Issue.record("not served from one lease"); return }
        #expect(shares == [ClaimShare(leaseId: "one", tokens: n)])
    }

    @Test func refillStartsAtTheLowWatermarkBeforeStockRunsOut() throws {
        var s = stock(LeasePolicy(min: 10, max: 10, lowWatermark: 0.5))
        let c = FakeClock()
        _ = s.claim(qty: 1, now: c.now)
        let r = try #require(lease(&s, now: c.now, waiting: 1))
        s.leaseGranted(LeaseGrant(id: "1", granted: 10, ttl: .seconds(10), poolAfter: 100), sentAt: r.sentAt, now: c.now)
        // 10 tokens; the parked claim is served by the shell via retryParked.
        guard case .served = s.retryParked(qty: 1, now: c.now) else { Issue.record("parked claim not served"); return }
        for _ in 0..<3 { _ = s.claim(qty: 1, now: c.now) }
        #expect(s.available(now: c.now) == 6)
        #expect(s.nextLease(now: c.now, waiting: 0) == nil, "6 > watermark 5")
        _ = s.claim(qty: 1, now: c.now)
        #expect(s.available(now: c.now) == 5)
        #expect(s.nextLease(now: c.now, waiting: 0) != nil, "5 <= watermark 5: refill while stock remains")
    }

    @Test func leaseIsNotServedPastItsDeadlineAndItsRestIsReturned() throws {
        var s = stock()
        var c = FakeClock()
        _ = s.claim(qty: 1, now: c.now)
        let r = try #require(lease(&s, now: c.now, waiting: 1))
        // The reply takes 500 ms: the life is still measured from the send time.
        c.advance(.milliseconds(500))
        s.leaseGranted(LeaseGrant(id: "7", granted: 10, ttl: .seconds(10), poolAfter: 50), sentAt: r.sentAt, now: c.now)
        _ = s.retryParked(qty: 1, now: c.now)
        _ = s.takeReturns()
        // Deadline = sent + 10 s - 2 s margin = sent + 8 s. At sent + 7.9 s it is still served.
        c.advance(.milliseconds(7400))
        guard case .served = s.claim(qty: 1, now: c.now) else { Issue.record("should serve before deadline"); return }
        c.advance(.milliseconds(100))  // exactly sent + 8 s
        #expect(s.available(now: c.now) == 0)
        #expect(s.claim(qty: 1, now: c.now) == .wait)
        let returns = s.takeReturns()
        #expect(returns == [ReturnRequest(leaseId: "7", granted: 10, returnedTotal: 8, close: true)])
        #expect(s.counters.leasesFenced == 1)
    }

    @Test func aLeaseWhoseReplyCameTooLateIsReturnedUnserved() throws {
        var s = stock()
        var c = FakeClock()
        _ = s.claim(qty: 1, now: c.now)
        let r = try #require(lease(&s, now: c.now, waiting: 1))
        c.advance(.seconds(9))
        s.leaseGranted(LeaseGrant(id: "3", granted: 10, ttl: .seconds(10), poolAfter: 50), sentAt: r.sentAt, now: c.now)
        #expect(s.available(now: c.now) == 0)
        #expect(s.takeReturns() == [ReturnRequest(leaseId: "3", granted: 10, returnedTotal: 10, close: true)])
    }

    @Test func renewalExtendsTheDeadlineFromTheRenewalSendTime() throws {
        var s = stock()
        var c = FakeClock()
        _ = s.claim(qty: 1, now: c.now)
        let r = try #require(lease(&s, now: c.now, waiting: 1))
        s.leaseGranted(LeaseGrant(id: "1", granted: 100, ttl: .seconds(10), poolAfter: 50), sentAt: r.sentAt, now: c.now)
        #expect(s.renewals(now: c.now).isEmpty, "plenty of time left")
        c.advance(.seconds(5))  // 3 s of serving left <= ttl/3
        let ids = s.renewals(now: c.now)
        #expect(ids == ["1"])
        #expect(s.renewals(now: c.now).isEmpty, "renewal already in flight")
        let sent = c.now
        c.advance(.milliseconds(200))
        s.renewed("1", outcome: .renewed(ttl: .seconds(10)), sentAt: sent, now: c.now)
        c.advance(.milliseconds(7700))  // sent + 7.9 s: before the new deadline sent + 8 s
        guard case .served = s.claim(qty: 1, now: c.now) else { Issue.record("renewed lease not served"); return }
        c.advance(.milliseconds(100))
        #expect(s.available(now: c.now) == 0, "fenced at the renewed deadline")
    }

    @Test func refusedRenewalOfAnExpiredLeaseStopsServingAndReturnsTheRest() throws {
        var s = stock()
        var c = FakeClock()
        _ = s.claim(qty: 1, now: c.now)
        let r = try #require(lease(&s, now: c.now, waiting: 1))
        s.leaseGranted(LeaseGrant(id: "1", granted: 10, ttl: .seconds(10), poolAfter: 50), sentAt: r.sentAt, now: c.now)
        _ = s.retryParked(qty: 1, now: c.now)
        c.advance(.seconds(6))
        _ = s.renewals(now: c.now)
        s.renewed("1", outcome: .expired, sentAt: c.now, now: c.now)
        #expect(s.available(now: c.now) == 0)
        #expect(s.takeReturns() == [ReturnRequest(leaseId: "1", granted: 10, returnedTotal: 9, close: true)])
    }

    @Test func goneLeaseIsDroppedWithoutAReturn() throws {
        let (start, c) = try leaseOf10WithItsRenewalOnTheWire()
        var s = start
        s.renewed("1", outcome: .gone, sentAt: c.now, now: c.now)
        #expect(s.available(now: c.now) == 0)
        #expect(s.takeReturns().isEmpty)
        #expect(s.counters.tokensLost == 10)
    }

    /// A review finding (2026-11-30): a lease served to its last token while its renewal was on the wire moves
    /// to the finished leases; Redis then answers the renewal `gone` (or `expired`), and a claim that was pinned
    /// to the lease aborts and gives its tokens back. The lease must not serve them again: Redis no longer
    /// holds it open. (The answer used to be ignored for a finished lease, and the abort revived it.)
    @Test(arguments: [RenewOutcome.gone, .expired])
    func aFullyServedLeaseThatRedisSaysIsGoneNeverServesAgain(outcome: RenewOutcome) throws {
        let (start, c) = try leaseOf10WithItsRenewalOnTheWire()
        var s = start
        guard case .served(let shares) = s.claim(qty: 10, now: c.now, inFlight: true) else {
            Issue.record("the lease's 10 tokens are not served")
            return
        }
        #expect(s.finished == ["1"], "fully served, with a claim pinned to it")
        let answeredAt = c.now
        let fenced = s.counters.leasesFenced
        s.renewed("1", outcome: outcome, sentAt: answeredAt, now: answeredAt)
        // A second renewal's answer (two were on the wire) fences nothing more.
        s.renewed("1", outcome: outcome, sentAt: answeredAt, now: answeredAt)
        #expect(s.counters.leasesFenced == fenced + 1, "fenced once")
        // The abort's clock was read just before the answer's (each event reads it before taking the lock).
        s.abort(shares, now: answeredAt - .milliseconds(1))
        #expect(s.available(now: answeredAt - .milliseconds(1)) == 0, "a lease Redis does not hold open serves nothing")
        guard case .wait = s.claim(qty: 1, now: answeredAt - .milliseconds(1)) else {
            Issue.record("a claim was served from lease 1 after Redis said \(outcome)")
            return
        }
        if outcome == .gone {
            #expect(!s.holds("1"), "gone: this host's record of it ends")
            #expect(s.counters.tokensLost == 10, "the aborted claim's tokens are lost, not returned to a lease Redis closed")
            s.closeFinished(now: c.now, after: .zero)
            #expect(s.takeReturns().allSatisfy { $0.leaseId != "1" }, "nothing returned through a gone lease")
        } else {
            #expect(s.holds("1"), "expired: still open at Redis, it closes with a return")
            s.closeFinished(now: c.now, after: .zero)
            #expect(s.takeReturns().contains(ReturnRequest(leaseId: "1", granted: 10, returnedTotal: 10, close: true)))
        }
    }

    /// A stock holding lease "1" of 10 tokens (one claim waited for it and was not yet served), 6 s later, with
    /// the lease's renewal sent.
    private func leaseOf10WithItsRenewalOnTheWire() throws -> (VoucherStock, FakeClock) {
        var s = stock()
        var c = FakeClock()
        _ = s.claim(qty: 1, now: c.now)
        let r = try #require(lease(&s, now: c.now, waiting: 1))
        s.leaseGranted(LeaseGrant(id: "1", granted: 10, ttl: .seconds(10), poolAfter: 50), sentAt: r.sentAt, now: c.now)
        c.advance(.seconds(6))
        #expect(s.renewals(now: c.now) == ["1"])
        return (s, c)
    }

    @Test func redisUnreachableServesLocalStockThenFailsClosed() throws {
        var s = stock(LeasePolicy(min: 5, max: 5, lowWatermark: 0.9))
        var c = FakeClock()
        _ = s.claim(qty: 1, now: c.now)
        let r = try #require(lease(&s, now: c.now, waiting: 1))
        s.leaseGranted(LeaseGrant(id: "1", granted: 5, ttl: .seconds(10), poolAfter: 50), sentAt: r.sentAt, now: c.now)
        _ = s.retryParked(qty: 1, now: c.now)
        let refill = try #require(lease(&s, now: c.now, waiting: 0))
        s.leaseFailed(now: c.now, request: refill, outcomeUnknown: false)
        var served = 0
        var unavailable = 0
        for _ in 0..<10 {
            switch s.claim(qty: 1, now: c.now) {
            case .served: served += 1
            case .reject(let e) where e.code == .unavailable: unavailable += 1
            default: break
            }
        }
        #expect(served == 4)
        #expect(unavailable == 6)
        // After the backoff the next lease is tried again, by itself.
        c.advance(.seconds(3))
        #expect(s.nextLease(now: c.now, waiting: 0) != nil)
    }

    @Test func parkedClaimIsRefusedWhenNoLeaseCanComeInsteadOfWaitingForever() throws {
        var s = stock()
        let c = FakeClock()
        #expect(s.claim(qty: 1, now: c.now) == .wait)
        let req = try #require(lease(&s, now: c.now, waiting: 1))
        s.leaseFailed(now: c.now, request: req, outcomeUnknown: false)
        guard case .reject(let e) = s.retryParked(qty: 1, now: c.now) else {
            Issue.record("parked claim should be refused")
            return
        }
        #expect(e.code == .unavailable)
    }

    @Test func idleStockGoesBackAfterIdleReturn() throws {
        var s = stock(LeasePolicy(min: 10, max: 10, idleReturn: .seconds(30)))
        var c = FakeClock()
        _ = s.claim(qty: 1, now: c.now)
        let r = try #require(lease(&s, now: c.now, waiting: 1))
        s.leaseGranted(LeaseGrant(id: "1", granted: 10, ttl: .seconds(60), poolAfter: 50), sentAt: r.sentAt, now: c.now)
        _ = s.retryParked(qty: 1, now: c.now)
        c.advance(.seconds(29))
        s.returnIfIdle(now: c.now)
        #expect(s.tokensHeld == 9)
        c.advance(.seconds(1))
        s.returnIfIdle(now: c.now)
        #expect(s.tokensHeld == 0)
        #expect(s.takeReturns() == [ReturnRequest(leaseId: "1", granted: 10, returnedTotal: 9, close: true)])
        #expect(s.nextLease(now: c.now, waiting: 0) == nil, "no demand: no new lease")
    }

    @Test func drainReturnsEverythingAndRefusesClaims() throws {
        var s = stock()
        let c = FakeClock()
        _ = s.claim(qty: 1, now: c.now)
        let r = try #require(lease(&s, now: c.now, waiting: 1))
        s.leaseGranted(LeaseGrant(id: "1", granted: 10, ttl: .seconds(10), poolAfter: 50), sentAt: r.sentAt, now: c.now)
        s.drain()
        #expect(s.takeReturns() == [ReturnRequest(leaseId: "1", granted: 10, returnedTotal: 10, close: true)])
        guard case .reject(let e) = s.claim(qty: 1, now: c.now) else { Issue.record("draining must refuse"); return }
        #expect(e.code == .unavailable)
        // A lease that lands during the drain goes straight back.
        s.leaseGranted(LeaseGrant(id: "2", granted: 5, ttl: .seconds(10), poolAfter: 50), sentAt: c.now, now: c.now)
        #expect(s.takeReturns() == [ReturnRequest(leaseId: "2", granted: 5, returnedTotal: 5, close: true)])
    }

    @Test func pausedVoucherIsInactiveAndGivesItsStockBack() throws {
        var s = stock()
        let c = FakeClock()
        _ = s.claim(qty: 1, now: c.now)
        let r = try #require(lease(&s, now: c.now, waiting: 1))
        s.leaseGranted(LeaseGrant(id: "1", granted: 10, ttl: .seconds(10), poolAfter: 50), sentAt: r.sentAt, now: c.now)
        s.setStatus(.paused)
        #expect(s.claim(qty: 1, now: c.now) == .reject(QuotaError(.inactive, "voucher is paused")))
        #expect(s.takeReturns().map(\.returnedTotal) == [10])
    }

    @Test func multiTokenClaimSpansLeasesAndNeverExceedsStock() throws {
        var s = stock()
        let c = FakeClock()
        _ = s.claim(qty: 1, now: c.now)
        let r = try #require(lease(&s, now: c.now, waiting: 1))
        s.leaseGranted(LeaseGrant(id: "1", granted: 3, ttl: .seconds(10), poolAfter: 50), sentAt: r.sentAt, now: c.now)
        s.leaseGranted(LeaseGrant(id: "2", granted: 4, ttl: .seconds(20), poolAfter: 46), sentAt: r.sentAt, now: c.now)
        #expect(s.claim(qty: 5, now: c.now) == .served([ClaimShare(leaseId: "1", tokens: 3), ClaimShare(leaseId: "2", tokens: 2)]))
        #expect(s.claim(qty: 3, now: c.now) == .wait)
        #expect(s.available(now: c.now) == 2)
        // Lease 1 was fully served: it is closed with the next lease request, not with a round trip of its own.
        #expect(s.takeReturns().isEmpty)
        #expect(s.finished == ["1"])
        let next = try #require(lease(&s, now: c.now, waiting: 3))
        #expect(next.close == [ReturnRequest(leaseId: "1", granted: 3, returnedTotal: 0, close: true)])
        #expect(s.finished.isEmpty)
    }

    @Test func finishedLeasesAreClosedOnTheirOwnWhenNoLeaseRequestComes() throws {
        var s = stock(LeasePolicy(min: 2, max: 2, lowWatermark: 0))
        var c = FakeClock()
        _ = s.claim(qty: 1, now: c.now)
        let r = try #require(lease(&s, now: c.now, waiting: 1))
        s.leaseGranted(LeaseGrant(id: "1", granted: 2, ttl: .seconds(10), poolAfter: 50), sentAt: r.sentAt, now: c.now)
        s.leaseGranted(LeaseGrant(id: "2", granted: 2, ttl: .seconds(20), poolAfter: 48), sentAt: r.sentAt, now: c.now)
        _ = s.retryParked(qty: 1, now: c.now)
        _ = s.claim(qty: 1, now: c.now)
        #expect(s.finished == ["1"])
        s.closeFinished(now: c.now)
        #expect(s.takeReturns().isEmpty, "not yet: a lease request may still take it along")
        c.advance(.seconds(1))
        s.closeFinished(now: c.now)
        #expect(s.takeReturns() == [ReturnRequest(leaseId: "1", granted: 2, returnedTotal: 0, close: true)])
    }

    @Test func aFailedLeaseRequestStillClosesTheLeasesItWasToCloseAndRetriesWithTheSameRequestID() throws {
        var s = stock()
        var c = FakeClock()
        _ = s.claim(qty: 1, now: c.now)
        let r = try #require(lease(&s, now: c.now, waiting: 1))
        s.leaseGranted(LeaseGrant(id: "1", granted: 1, ttl: .seconds(10), poolAfter: 50), sentAt: r.sentAt, now: c.now)
        _ = s.retryParked(qty: 1, now: c.now)
        _ = s.claim(qty: 1, now: c.now)
        let r2 = try #require(lease(&s, now: c.now, waiting: 1))
        #expect(r2.close.map(\.leaseId) == ["1"])
        #expect(r2.req != r.req, "a new request gets a new id")
        // No reply: Redis may have closed lease 1 and granted a lease to r2. The close is sent again on
        // its own (cumulative: harmless if done), and the next request asks again under r2's id.
        s.leaseFailed(now: c.now, request: r2, outcomeUnknown: true)
        #expect(s.takeReturns() == [ReturnRequest(leaseId: "1", granted: 1, returnedTotal: 0, close: true)])
        c.advance(.seconds(3))
        let r3 = try #require(lease(&s, now: c.now, waiting: 1))
        #expect(r3.req == r2.req, "same request id: Redis answers with what it granted, never twice")
        // Asked only to learn its outcome, though claims wait: a sharded request asked for tokens again after
        // its markers on the shards it passed were dropped could be granted a second lease.
        #expect(r3.want == 0, "an unresolved request is only resolved")
        s.leaseGranted(LeaseGrant(id: "2", granted: 5, ttl: .seconds(10), poolAfter: 40), sentAt: r3.sentAt, now: c.now)
        let r4 = try #require(lease(&s, now: c.now, waiting: 10))
        #expect(r4.req != r2.req, "answered: the next request is a new one")
    }

    @Test func aDrainingHostResolvesAnUnansweredLeaseRequestInsteadOfLeavingItOutstanding() throws {
        var s = stock()
        var c = FakeClock()
        _ = s.claim(qty: 1, now: c.now)
        let r = try #require(lease(&s, now: c.now, waiting: 1))
        s.leaseFailed(now: c.now, request: r, outcomeUnknown: true)
        s.drain()
        #expect(!s.isSettled, "a lease may have been granted unseen")
        c.advance(.seconds(3))
        let resolve = try #require(lease(&s, now: c.now, waiting: 0))
        #expect(resolve.req == r.req && resolve.want == 0)
        // Redis says it was granted: the lease goes straight back, in full.
        s.leaseGranted(LeaseGrant(id: "9", granted: 10, ttl: .seconds(10), poolAfter: 40), sentAt: resolve.sentAt, now: c.now)
        #expect(s.takeReturns() == [ReturnRequest(leaseId: "9", granted: 10, returnedTotal: 10, close: true)])
        #expect(s.isSettled)
    }

    @Test func aLeaseWithAClaimInFlightIsNotClosedUntilTheClaimSettles() throws {
        var s = stock()
        var c = FakeClock()
        _ = s.claim(qty: 1, now: c.now)
        let r = try #require(lease(&s, now: c.now, waiting: 1))
        s.leaseGranted(LeaseGrant(id: "1", granted: 10, ttl: .seconds(10), poolAfter: 50), sentAt: r.sentAt, now: c.now)
        guard case .served(let a) = s.retryParked(qty: 2, now: c.now, inFlight: true) else { Issue.record("not served"); return }
        guard case .served(let b) = s.claim(qty: 3, now: c.now, inFlight: true) else { Issue.record("not served"); return }
        // Fenced while both claims are in flight: no return yet, its amount is not known.
        c.advance(.seconds(8))
        s.fence(now: c.now)
        #expect(s.takeReturns().isEmpty)
        #expect(s.holds("1") && s.tokensPending == 5)
        s.commit(a)
        #expect(s.takeReturns().isEmpty, "b is still in flight")
        // b failed (journal write, user check, timeout): its tokens go back into lease 1, then lease 1 closes.
        #expect(s.abort(b, now: c.now) == 0)
        #expect(s.takeReturns() == [ReturnRequest(leaseId: "1", granted: 10, returnedTotal: 8, close: true)])
        #expect(!s.holds("1"))
    }

    @Test func tokensOfAnUncompletedClaimGoBackEvenAfterTheirLeaseWasFullyServed() throws {
        var s = stock()
        let c = FakeClock()
        _ = s.claim(qty: 1, now: c.now)
        let r = try #require(lease(&s, now: c.now, waiting: 1))
        s.leaseGranted(LeaseGrant(id: "1", granted: 2, ttl: .seconds(10), poolAfter: 50), sentAt: r.sentAt, now: c.now)
        guard case .served(let a) = s.retryParked(qty: 1, now: c.now, inFlight: true) else { Issue.record("not served"); return }
        guard case .served(let b) = s.claim(qty: 1, now: c.now, inFlight: true) else { Issue.record("not served"); return }
        #expect(s.finished == ["1"], "fully served")
        // Not closed with the next lease request while its claims are in flight.
        let next = try #require(lease(&s, now: c.now, waiting: 1))
        #expect(next.close.isEmpty)
        // The first claim's user check failed: its token goes back, and lease 1 serves again.
        #expect(s.abort(a, now: c.now) == 0)
        #expect(s.finished.isEmpty && s.available(now: c.now) == 1)
        s.commit(b)
        #expect(s.holds("1"))
    }

    @Test func aCancellationGoesBackToItsLeaseWhileHeldAndToThePoolOnceItClosed() throws {
        var s = stock()
        var c = FakeClock()
        _ = s.claim(qty: 1, now: c.now)
        let r = try #require(lease(&s, now: c.now, waiting: 1))
        s.leaseGranted(LeaseGrant(id: "1", granted: 10, ttl: .seconds(10), poolAfter: 50), sentAt: r.sentAt, now: c.now)
        guard case .served(let a) = s.retryParked(qty: 2, now: c.now) else { Issue.record("not served"); return }
        guard case .served(let b) = s.claim(qty: 1, now: c.now) else { Issue.record("not served"); return }
        // UNCLAIM a while lease 1 is held: pinned until the cancellation is journaled, then back to the lease.
        #expect(s.pinForCancel(a) == 0)
        c.advance(.seconds(8))
        s.fence(now: c.now)
        #expect(s.takeReturns().isEmpty, "pinned: the return waits for the cancellation")
        s.cancelled(a, toPool: 0, applied: true, now: c.now)
        #expect(s.takeReturns() == [ReturnRequest(leaseId: "1", granted: 10, returnedTotal: 9, close: true)],
                "the return includes the cancelled tokens: they leave the lease once")
        // UNCLAIM b after lease 1 closed: it can only go to the pool (a restock by claim id).
        #expect(s.pinForCancel(b) == 1)
    }

    @Test func leaseRequestAsksForWhatParkedClaimsNeed() throws {
        var s = stock(LeasePolicy(min: 10, max: 100))
        let c = FakeClock()
        _ = s.claim(qty: 250, now: c.now)
        let r = try #require(lease(&s, now: c.now, waiting: 250))
        #expect(r.need == 250 && r.want == 250)
    }
}
