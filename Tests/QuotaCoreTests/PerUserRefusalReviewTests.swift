import QuotaCore
import Testing

// helper-42's review of cd54ab7 (the per-user limit checked before consolidation, then by a separate
// `VoucherStock.wouldGiveBack` that disagreed with `claim`): every test failed on it. The refusal is now given by
// `claim` itself, in the branch that would give the leases back (`refusingToGiveBack:`); the stock tests compare
// a claim with and without it.


func leaseReqs(_ fx: [VoucherMachine.Effect]) -> [LeaseRequest] { fx.compactMap { if case .lease(let l) = $0 { return l } else { return nil } } }
func giveBacks(_ fx: [VoucherMachine.Effect]) -> [ReturnRequest] { fx.compactMap { if case .giveBack(let r) = $0 { return r } else { return nil } } }
func answers(_ fx: [VoucherMachine.Effect]) -> [(Int, VoucherMachine.Answer)] { fx.compactMap { if case .answer(let t, let a) = $0 { return (t, a) } else { return nil } } }

/// A machine (`durability: none`, per-user mode `mode`) whose voucher is loaded with `pool` tokens and a per-user limit.
func loadedMachine(_ mode: ClaimRules.PerUserMode, pool: Int, perUser: Int, policy: LeasePolicy, now: Instant) -> VoucherMachine {
    var rules = ClaimRules(region: "sg", host: "h", idPrefix: "c.", durability: .none)
    rules.perUserMode = mode
    let src = SeqSource()
    var m = VoucherMachine(voucher: "v", rules: rules, policy: policy, requestPrefix: "r.", nextSeq: { src.next() }, wallClock: { 1 })
    var fx: [VoucherMachine.Effect] = []
    _ = m.handle(.avail, ticket: -1, now: now, effects: &fx)
    fx.removeAll()
    m.loaded(.success(VoucherRecordInfo(status: .active, pool: pool, perUser: perUser)), policy: policy, now: now, effects: &fx)
    return m
}

/// A loaded machine (`durability: none`, per-user mode `mode`) whose stock is the leases `grants` (tokens, ttl), taken
/// for a parked claim of user "a" that is then told SOLDOUT; then the voucher's per-user limit becomes `perUser`.
func spreadMachine(_ mode: ClaimRules.PerUserMode, grants: [(Int, Duration)], perUser: Int, policy: LeasePolicy,
                   now: inout Instant) -> VoucherMachine {
    var m = loadedMachine(mode, pool: 100_000, perUser: 0, policy: policy, now: now)
    var fx: [VoucherMachine.Effect] = []
    fx.removeAll()
    _ = m.handle(.claim(qty: 100_000, user: "a", req: nil), ticket: 1, now: now, effects: &fx)
    var out = fx
    var n = 0
    while let l = leaseReqs(out).first {
        out.removeAll()
        now = now + .milliseconds(1)
        if n < grants.count {
            let (tokens, ttl) = grants[n]
            n += 1
            m.leaseAnswered(.granted(LeaseGrant(id: "L\(n)", granted: tokens, ttl: ttl, poolAfter: 0)), request: l,
                            trusted: true, now: now, effects: &out)
        } else {
            m.leaseAnswered(.refused(.soldOut(abandoned: 0)), request: l, trusted: true, now: now, effects: &out)
            break
        }
    }
    fx.removeAll()
    m.refreshed(VoucherRecordInfo(status: .active, pool: 0, perUser: perUser), policy: policy, now: now, effects: &fx)
    return m
}

@Suite("Per-user refusal instead of giving back, review (helper-42): the stock")
struct PerUserPrecheckStockTests {
    /// A stock of one lease of 100 tokens with a short life (earliest deadline: first in `leases`) and 100 one-token
    /// leases. Once the first lease's deadline passes (no tick has fenced it yet), `claim` fences it and then has to
    /// give every lease back for a claim of 70; cd54ab7's `wouldGiveBack` looked at the unfenced list, saw the expired lease
    /// cover 70 (`spansFewLeases`), and said no.
    @Test func aClaimIsRefusedInsteadOfGivingBackWhenTheFirstLeaseJustExpired() throws {
        var now = Instant(nanoseconds: 1_000_000_000)
        let policy = LeasePolicy(min: 1, max: 1, ttl: .seconds(30)) // safety margin 6 s
        var s = VoucherStock(policy: policy)
        let r0 = try #require(lease(&s, now: now, waiting: 100_000))
        s.leaseGranted(LeaseGrant(id: "big", granted: 100, ttl: .seconds(8), poolAfter: 1_000), sentAt: r0.sentAt, now: now)
        for i in 0..<100 {
            let r = try #require(lease(&s, now: now, waiting: 100_000), "lease \(i)")
            s.leaseGranted(LeaseGrant(id: "s\(i)", granted: 1, ttl: .seconds(30), poolAfter: 1_000), sentAt: r.sentAt, now: now)
        }
        now = now + .seconds(5) // "big" (deadline +2 s) expired, the others (+24 s) not
        #expect(s.available(now: now) == 100)
        expectRefusedExactlyWhereItWouldGiveBack(s, now: now, "first lease expired")
    }

    /// States in which `claim` refuses before it could give anything back, while the stock is still held:
    /// Redis unreachable (backoff: `leaseCanFollow` false → UNAVAILABLE) and a sale rescheduled to open later
    /// (`setSchedule` keeps the leases → INACTIVE). cd54ab7's `wouldGiveBack` ignored both and said yes.
    @Test func aClaimRefusedForAnotherReasonKeepsThatReason() throws {
        for state in ["backoff", "rescheduled"] {
            let c = FakeClock()
            var s = try spreadStock(Array(repeating: 1, count: 100), c, poolAfter: 0)
            switch state {
            case "backoff":
                let r = try #require(lease(&s, now: c.now, waiting: 100_000))
                s.leaseFailed(now: c.now, request: r, outcomeUnknown: false)
            default:
                s.setSchedule(SaleSchedule(startMs: 1_800_000_060_000, endMs: 0, redisNowMs: 1_800_000_000_000,
                                           sentAt: c.now, receivedAt: c.now), now: c.now)
            }
            expectRefusedExactlyWhereItWouldGiveBack(s, now: c.now, state)
        }
    }

    /// A claim of 70 decided on two copies of `s`: given a refusal, it is refused exactly where it would
    /// otherwise give every lease back, nothing is given back, and elsewhere it is decided the same.
    func expectRefusedExactlyWhereItWouldGiveBack(_ s: VoucherStock, now: Instant, _ what: String) {
        var plain = s, refusing = s
        let before = s.counters.consolidations
        let d = plain.claim(qty: 70, now: now)
        let gaveBack = plain.counters.consolidations > before
        let r = refusing.claim(qty: 70, now: now, refusingToGiveBack: QuotaError(.userlimit, "over the limit"))
        // (Fencing may close an expired lease in both: only the valid stock must stay.)
        #expect(refusing.counters.consolidations == before, "\(what): gave back; \(r)")
        if gaveBack {
            #expect(r == .reject(QuotaError(.userlimit, "over the limit")), "\(what): \(r)")
            #expect(refusing.available(now: now) == s.available(now: now) && plain.available(now: now) == 0,
                    "\(what): the valid stock stays (\(refusing.available(now: now)) of \(s.available(now: now)))")
        } else {
            #expect(r == d, "\(what): \(r) but without the refusal \(d)")
        }
    }
}

@Suite("Per-user refusal instead of giving back, review (helper-42): the machine")
struct PerUserPrecheckMachineTests {
    /// The fenced-lease miss, on the machine: a claim of 70 over a limit of 50 still makes the host give back its 100
    /// valid one-token leases (and parks), exactly what cd54ab7 set out to prevent.
    @Test func anOverLimitClaimStillConsolidatesWhenTheFirstLeaseJustExpired() throws {
        for mode in [ClaimRules.PerUserMode.local, .central] {
            var now = Instant(nanoseconds: 1_000_000_000)
            let policy = LeasePolicy(min: 1, max: 1, ttl: .seconds(30)) // safety margin 6 s
            let grants = [(100, Duration.seconds(8))] + Array(repeating: (1, Duration.seconds(30)), count: 100)
            var m = spreadMachine(mode, grants: grants, perUser: 50, policy: policy, now: &now)
            #expect(m.perUserLimit == 50 && m.stock.soldOut)
            now = now + .seconds(5) // L1 (100 tokens, deadline +2 s) expired but not fenced yet; the others serve
            #expect(m.stock.available(now: now) == 100)
            var fx: [VoucherMachine.Effect] = []
            let a = m.handle(.claim(qty: 70, user: "b", req: "x"), ticket: 10, now: now, effects: &fx)
            let back = giveBacks(fx)
            #expect(a.map { "\($0)".contains("USERLIMIT") } == true, "\(mode): claim of 70 over a limit of 50: \(String(describing: a))")
            #expect(m.stock.counters.consolidations == 0,
                    "\(mode): consolidated; \(back.count) leases given back (\(back.filter { $0.leaseId != "L1" }.count) valid ones), stock left \(m.stock.available(now: now))")
        }
    }

    /// The pre-check runs only for a new claim: a claim over the user's limit that parked (no stock yet) is retried by
    /// `serveParked` → `retryParked` → `claim`, which still gives every lease back once its tokens are here over
    /// more than 64 leases. (Not a regression of cd54ab7: the path it left open; the refusal now covers it.)
    @Test func aParkedClaimOverTheLimitStillMakesTheHostGiveEverythingBack() throws {
        var now = Instant(nanoseconds: 1_000_000_000)
        let policy = LeasePolicy(min: 1, max: 1, ttl: .seconds(30))
        var m = loadedMachine(.local, pool: 100, perUser: 50, policy: policy, now: now)
        var fx: [VoucherMachine.Effect] = []
        // No stock here yet: the claim of 70 (over the limit of 50 whatever the count) parks.
        #expect(m.handle(.claim(qty: 70, user: "b", req: "x"), ticket: 1, now: now, effects: &fx) == nil)
        var all: [VoucherMachine.Effect] = []
        var out = fx
        var n = 0
        while let l = leaseReqs(out).first, n < 80 {
            out.removeAll()
            now = now + .milliseconds(1)
            n += 1
            m.leaseAnswered(.granted(LeaseGrant(id: "L\(n)", granted: 1, ttl: .seconds(30), poolAfter: 0)), request: l,
                            trusted: true, now: now, effects: &out)
            all += out
        }
        #expect(giveBacks(all).isEmpty && m.stock.counters.consolidations == 0,
                "leases given back for a parked claim the limit refuses: \(giveBacks(all).count), consolidations \(m.stock.counters.consolidations); answers \(answers(all).map { "\($0.1)" })")
    }

    /// `localUsers[user] + qty` is computed for every claim of a voucher with a per-user limit, before the stock is
    /// asked (before, `held + qty` in `granted` was only reached with `qty` tokens in hand): a QTY near Int.max from a
    /// user this host already counts traps (arithmetic overflow) instead of being refused.
    @Test func aHugeQtyFromAUserWithACountIsRefusedNotACrash() async {
        await #expect(processExitsWith: .success) {
            var now = Instant(nanoseconds: 1_000_000_000)
            let policy = LeasePolicy(min: 10, max: 10, ttl: .seconds(30))
            var rules = ClaimRules(region: "sg", host: "h", idPrefix: "c.", durability: .none)
            rules.perUserMode = .local
            var m = VoucherMachine(voucher: "v", rules: rules, policy: policy, requestPrefix: "r.", nextSeq: { 1 }, wallClock: { 1 })
            var fx: [VoucherMachine.Effect] = []
            _ = m.handle(.avail, ticket: -1, now: now, effects: &fx)
            m.loaded(.success(VoucherRecordInfo(status: .active, pool: 100, perUser: 10)), policy: policy, now: now, effects: &fx)
            fx.removeAll()
            _ = m.handle(.claim(qty: 1, user: "b", req: nil), ticket: 1, now: now, effects: &fx)
            if let l = leaseReqs(fx).first {
                now = now + .milliseconds(200)
                fx.removeAll()
                m.leaseAnswered(.granted(LeaseGrant(id: "L1", granted: 10, ttl: .seconds(30), poolAfter: 90)), request: l,
                                trusted: true, now: now, effects: &fx)
            }
            fx.removeAll()
            _ = m.handle(.claim(qty: Int.max, user: "b", req: nil), ticket: 2, now: now, effects: &fx)
        }
    }
}
