import QuotaCore
import Testing

/// By helper-38, reviewing 2cccb0e ("a host's own restock ends its SOLDOUT at once"): `poolRestocked` adds the restocked
/// tokens to `poolHint`, which AVAIL reports. The restock's reply comes back on a chores Task, independently
/// of the refresher's Task and of the runtime's lease answers: a pool read Redis made *after* the restock
/// (the refresh, or a lease reply's `poolAfter`) can be folded in first, and the restock's `+= n` then counts
/// the same tokens a second time. AVAIL then says more than the voucher's whole limit until the next refresh.
@Suite("Restock review: AVAIL after this host's own restock")
struct RestockReviewTests {
    static let limit = 10

    /// A host that leased the whole pool of 10, sold all 10 in one claim and was told SOLDOUT by Redis.
    func soldOutHost() throws -> SaleReview2Tests.Review2Rig {
        let policy = LeasePolicy(min: 10, max: 10, ttl: .seconds(10), lowWatermark: 0)
        var r = SaleReview2Tests.Review2Rig(policy: policy,
                                            info: VoucherRecordInfo(status: .active, pool: Self.limit, perUser: 0))
        _ = r.take()
        let (t, _) = r.claim(qty: 10)
        let asked = r.leaseRequest()
        let l = try #require(asked)
        r.grant(l, id: "1", granted: 10, poolAfter: 0)
        r.commitRecords()
        let fx = r.take()
        guard fx.answers[t]?.isGranted == true else { Issue.record("setup: the 10 were not sold"); return r }
        // The fully served lease is closed at once near the end: Redis acknowledges the close (nothing back).
        for case .giveBack(let g) in fx { r.m.returnAnswered(g, outcome: .applied(0), now: r.clock.now, effects: &r.fx) }
        // The next claim asks Redis (closing the fully served lease with it): sold out, nobody holds stock.
        let (t2, _) = r.claim()
        let asked2 = r.leaseRequest()
        let l2 = try #require(asked2)
        r.refuse(l2, .soldOut(abandoned: 0))
        guard case .refused(let e)? = r.take().answers[t2] else { Issue.record("setup: not refused"); return r }
        #expect(e.code == .soldout)
        return r
    }

    static func avail(_ r: inout SaleReview2Tests.Review2Rig) -> Int? {
        if case .integer(let n)? = r.m.handle(.avail, ticket: 999, now: r.clock.now, effects: &r.fx) { return n }
        return nil
    }

    /// UNCLAIM of the 10-token claim (its lease is closed): RESTOCK puts 10 back (pool 0 -> 10). The periodic
    /// refresh reads the pool after that (10) and its answer is handled first; then the restock's
    /// `applied(10)` arrives: AVAIL says 20 for a voucher whose limit is 10.
    @Test func aRefreshThatAlreadySawTheRestockIsCountedTwice() throws {
        var r = try soldOutHost()
        // Redis: RESTOCK applied(10) -> pool 10; then the refresh's read -> pool 10; the refresh is handled first.
        r.m.refreshed(VoucherRecordInfo(status: .active, pool: 10, perUser: 0), policy: r.m.stock.policy,
                      now: r.clock.now, effects: &r.fx)
        #expect(Self.avail(&r) == 10)
        r.m.restocked(tokens: 10, now: r.clock.now, effects: &r.fx)
        let got = Self.avail(&r)
        let a = try #require(got)
        #expect(a <= Self.limit, "AVAIL \(a) > the voucher's limit \(Self.limit): the restocked 10 counted twice")
    }
}
