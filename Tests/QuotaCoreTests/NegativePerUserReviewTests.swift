import QuotaCore
import Testing

// Review of f28a257 (issue 13): `granted` now takes the no-limit path only when `limit == 0`; before, and everywhere
// else in the machine (`needsFlight`, `userLimitRefusal`, `releaseLocal`...), "a per-user limit" is `perUserLimit > 0`.
// A voucher whose `per_user` field in Redis is negative (the record reader takes any integer) was served as
// "no limit"; it now enters the per-user branch: every claim is refused (`held + qty > -1`), and with
// `durability: none` the claim's tokens, taken unpinned (`needsFlight` false), are aborted as if pinned: the
// lease's `pending` goes below zero, so that lease can never close (settle/retire wait for `pending == 0`).
@Suite("Negative per_user, review of f28a257")
struct NegativePerUserReviewTests {
    @Test func aVoucherWithANegativePerUserIsServedAsWithoutALimit() throws {
        var now = Instant(nanoseconds: 1_000_000_000)
        let policy = LeasePolicy(min: 10, max: 10, ttl: .seconds(30))
        var m = loadedMachine(.central, pool: 100, perUser: -1, policy: policy, now: now)
        var fx: [VoucherMachine.Effect] = []
        _ = m.handle(.claim(qty: 1, user: "b", req: nil), ticket: 1, now: now, effects: &fx)
        let l = try #require(leaseReqs(fx).first)
        now = now + .milliseconds(10)
        fx.removeAll()
        m.leaseAnswered(.granted(LeaseGrant(id: "L1", granted: 10, ttl: .seconds(30), poolAfter: 90)), request: l,
                        trusted: true, now: now, effects: &fx)
        fx.removeAll()
        let a = m.handle(.claim(qty: 1, user: "b", req: nil), ticket: 2, now: now, effects: &fx)
        // 6184aeb: answered with a claim id (per_user <= 0 is "no limit"). HEAD: refused USERLIMIT "limit of -1".
        if case .refused(let e)? = a { Issue.record("refused: \(e)") }
        #expect(m.stock.tokensPending >= 0, "pending tokens went negative: \(m.stock.tokensPending)")
    }
}
