import QuotaCore
import Testing

@Suite("Consolidation review (helper-40): sold out")
struct ConsolidationSoldOutTests {
    /// The host holds the region's last 100 tokens in 100 one-token leases; its lease for a bigger parked claim
    /// was answered "sold out" (its own leases are not counted as held elsewhere): soldOut is set while it holds stock.
    @Test func consolidationWhileSoldOutAnswersSoldOutWithTheTokensInThePool() throws {
        var c = FakeClock()
        var s = try spreadStock(Array(repeating: 1, count: 100), c, poolAfter: 0)
        #expect(s.claim(qty: 150, now: c.now) == .wait)
        let r = try #require(lease(&s, now: c.now, waiting: 150))
        s.leaseRefused(.soldOut(abandoned: 0), now: c.now)
        _ = r
        #expect(s.soldOut)
        // The 150 parked claim is refused SOLDOUT (right: only 100 are left). A claim of 1 is served (right).
        if case .reject(let e) = s.retryParked(qty: 150, now: c.now) { #expect(e.code == .soldout) }
        guard case .served = s.claim(qty: 1, now: c.now) else { Issue.record("1 not served"); return }
        // A claim of 70: 99 tokens here over 99 leases: consolidation gives them all back and waits.
        #expect(s.claim(qty: 70, now: c.now) == .wait)
        for ret in s.takeReturns() { s.returned(ret, applied: ret.returnedTotal) }
        c.advance(.milliseconds(5))
        // The pool now holds 99 tokens. Yet:
        let next = s.nextLease(now: c.now, waiting: 70)
        #expect(next != nil, "a lease for the parked claim of 70 is asked")
        let d = s.retryParked(qty: 70, now: c.now)
        #expect(d == .wait, "the parked 70 waits for its lease; got \(d)")
        let one = s.claim(qty: 1, now: c.now)
        if case .reject(let e) = one { #expect(e.code != .soldout, "a claim of 1 told SOLDOUT while 99 tokens were just given back: \(e)") }
    }
}

@Suite("Consolidation review (helper-40): Redis unreachable")
struct ConsolidationOutageTests {
    /// Redis unreachable (backoff): a claim of 70 over 100 one-token leases gives every lease back, returns that
    /// cannot be sent; claims of 1 that the held, valid stock could serve are refused for the whole outage.
    @Test func consolidationDuringAnOutageThrowsAwayServableStock() throws {
        let c = FakeClock()
        var s = try spreadStock(Array(repeating: 1, count: 100), c, poolAfter: 0)
        let r = try #require(lease(&s, now: c.now, waiting: 100_000))
        s.leaseFailed(now: c.now, request: r, outcomeUnknown: false)
        guard case .served = s.claim(qty: 1, now: c.now) else { Issue.record("1 not served from held stock"); return }
        let d70 = s.claim(qty: 70, now: c.now)
        #expect(d70 != .wait, "parks a claim though no lease can be asked (backoff)")
        let d = s.retryParked(qty: 70, now: c.now)
        let one = s.claim(qty: 1, now: c.now)
        guard case .served = one else { Issue.record("claim of 1 after consolidation in an outage: \(one); retryParked(70): \(d); held \(s.tokensHeld)"); return }
    }
}

@Suite("Consolidation review (helper-40): the machine and REQ")
struct ConsolidationMachineTests {
    typealias M = VoucherMachine
    @Test func aRequestWhoseStockWasConsolidatedIsToldSoldOutAndKeepsThatAnswer() throws {
        var now = Instant(nanoseconds: 1_000_000_000)
        let policy = LeasePolicy(min: 1, max: 1, ttl: .seconds(30))
        var m = loadedMachine(.central, pool: 100, perUser: 0, policy: policy, now: now)
        var fx: [M.Effect] = []
        var pool = 100
        func leases(_ fx: [M.Effect]) -> [LeaseRequest] { fx.compactMap { if case .lease(let l) = $0 { return l } else { return nil } } }
        func returns(_ fx: [M.Effect]) -> [ReturnRequest] { fx.compactMap { if case .giveBack(let r) = $0 { return r } else { return nil } } }
        func answers(_ fx: [M.Effect]) -> [(Int, M.Answer)] { fx.compactMap { if case .answer(let t, let a) = $0 { return (t, a) } else { return nil } } }
        // A claim of 150 parks; the region's last 100 tokens come one lease of one token at a time (a sale's tail).
        fx.removeAll()
        #expect(m.handle(.claim(qty: 150, user: "a", req: nil), ticket: 1, now: now, effects: &fx) == nil)
        var n = 0
        var out = fx
        while let l = leases(out).first {
            out.removeAll()
            now = now + .milliseconds(1)
            if pool > 0 {
                pool -= 1; n += 1
                m.leaseAnswered(.granted(LeaseGrant(id: "L\(n)", granted: 1, ttl: .seconds(30), poolAfter: 0)), request: l, trusted: true, now: now, effects: &out)
            } else {
                m.leaseAnswered(.refused(.soldOut(abandoned: 0)), request: l, trusted: true, now: now, effects: &out)
                break
            }
        }
        #expect(n == 100 && m.stock.available(now: now) == 100 && m.stock.soldOut)
        #expect(answers(out).first.map { "\($0.1)" }?.contains("SOLDOUT") == true, "the 150 is told SOLDOUT: \(answers(out))")
        // A claim of 70 (REQ x): 100 tokens here, over 100 leases. Consolidation: every lease back, the claim parks.
        fx.removeAll()
        let a = m.handle(.claim(qty: 70, user: "b", req: "x"), ticket: 2, now: now, effects: &fx)
        #expect(a == nil)
        let rs = returns(fx)
        #expect(rs.count == 100, "every lease given back")
        #expect(!leases(fx).isEmpty, "a lease is asked for the parked claim (the pool gets the tokens back: not sold out)")
        fx.removeAll()
        for r in rs { pool += r.returnedTotal; m.returnAnswered(r, outcome: .applied(r.returnedTotal), now: now, effects: &fx) }
        now = now + .milliseconds(10)
        m.tick(now: now, effects: &fx)
        let got = answers(fx)
        #expect(pool == 100)
        #expect(got.isEmpty, "the claim of 70 answered while the pool holds the 100 tokens it gave back: \(got)")
        // Its retry with the same REQ, after the refresh shows the pool full again:
        fx.removeAll()
        m.refreshed(VoucherRecordInfo(status: .active, pool: pool, perUser: 0), policy: policy, now: now, effects: &fx)
        fx.removeAll()
        let again = m.handle(.claim(qty: 70, user: "b", req: "x"), ticket: 3, now: now, effects: &fx)
        #expect(again == nil || again.map { "\($0)".contains("SOLDOUT") } == false, "REQ x retried with 100 in the pool: \(String(describing: again))")
    }
}

@Suite("Consolidation: a claim over the per-user limit")
struct ConsolidationPerUserTests {
    /// Left open by helper-40: the local per-user pre-check came after the stock's decision, so a claim the user's
    /// limit refuses anyway, wider than 64 of the host's leases, first gave every lease back (and parked until a
    /// new one came): one user could make the host return its whole stock with each such claim.
    @Test func aClaimOverTheUsersLimitIsRefusedBeforeTheStockGivesAnythingBack() throws {
        for mode in [ClaimRules.PerUserMode.local, .central] {
            var now = Instant(nanoseconds: 1_000_000_000)
            // The region's 100 tokens in 100 one-token leases (`durability: none`), then a per-user limit of 50.
            var m = spreadMachine(mode, grants: Array(repeating: (1, .seconds(30)), count: 100), perUser: 50,
                                  policy: LeasePolicy(min: 1, max: 1, ttl: .seconds(30)), now: &now)
            #expect(m.stock.available(now: now) == 100 && m.perUserLimit == 50)
            var fx: [VoucherMachine.Effect] = []
            for attempt in 0..<3 {
                fx.removeAll()
                let a = m.handle(.claim(qty: 70, user: "b", req: nil), ticket: 10 + attempt, now: now, effects: &fx)
                #expect(a.map { "\($0)".contains("USERLIMIT") } == true, "\(mode): a claim of 70 over a limit of 50: \(String(describing: a))")
                #expect(giveBacks(fx).count == 0, "\(mode): leases given back for a claim the limit refuses")
            }
            #expect(m.stock.counters.consolidations == 0 && m.stock.available(now: now) == 100)
        }
    }
}
