import QuotaCore
import Testing

/// Second review of the sale's two ends, after cea9814 ("Sale review fixes"). Each test states a
/// promise of the README ("A sale's two ends") or of the contract and fails on the code under review.
@Suite("Sale review 2: recall, SOLDOUT, schedule refusals")
struct SaleReview2Tests {
    static let redisNow: Int64 = 1_800_000_000_000

    /// A machine (journal durability) on a fake clock, loaded with `info`; a copy of SaleReviewTests' rig
    /// with the host name, the claim timeout and `tail_wait` as parameters.
    struct Review2Rig {
        var m: VoucherMachine
        var clock = FakeClock()
        var fx: [VoucherMachine.Effect] = []
        var ticket = 0

        init(policy: LeasePolicy, info: VoucherRecordInfo, host: String = "h", tailWait: Duration = .seconds(1),
             claimTimeout: Duration = .seconds(2)) {
            var rules = ClaimRules(region: "sg", host: host, idPrefix: "sg.\(host).b.", durability: .journal)
            rules.tailWait = tailWait
            rules.claimTimeout = claimTimeout
            let seq = SeqSource()
            m = VoucherMachine(voucher: "v", rules: rules, policy: policy, requestPrefix: "\(host).b.",
                               nextSeq: { seq.next() }, wallClock: { 1_000 })
            var e: [VoucherMachine.Effect] = []
            _ = m.handle(.avail, ticket: -1, now: clock.now, effects: &e)
            m.loaded(.success(info), policy: policy, now: clock.now, effects: &e)
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

        mutating func refuse(_ l: LeaseRequest, _ r: LeaseRefusal) {
            m.leaseAnswered(.refused(r), request: l, trusted: true, now: clock.now, effects: &fx)
        }

        /// Make every claim record so far durable.
        mutating func commitRecords() {
            for (_, seq) in fx.records { m.claimsRecorded(seqs: [seq], ok: true, now: clock.now, effects: &fx) }
        }

        mutating func tick(_ d: Duration) {
            clock.advance(d)
            m.tick(now: clock.now, effects: &fx)
        }

        /// A host holding `held` tokens of lease "1" (a lease of `held + 1`, one token sold), not in
        /// end-of-sale mode, with nothing in flight.
        static func holding(_ held: Int, host: String = "h", tailWait: Duration = .seconds(1)) throws -> Review2Rig {
            let policy = LeasePolicy(min: held + 1, max: held + 1, ttl: .seconds(10), lowWatermark: 0)
            var r = Review2Rig(policy: policy, info: VoucherRecordInfo(status: .active, pool: 100, perUser: 0), host: host,
                               tailWait: tailWait)
            _ = r.take()
            let (t, _) = r.claim()
            let asked = r.leaseRequest()
            let l = try #require(asked)
            r.grant(l, id: "1", granted: held + 1, poolAfter: 50)
            r.commitRecords()
            let fx = r.take()
            guard fx.answers[t]?.isGranted == true else {
                Issue.record("setup: the first claim was not served: \(fx)")
                return r
            }
            #expect(r.m.stock.available(now: r.clock.now) == held)
            #expect(!r.m.stock.tail)
            return r
        }
    }

    // MARK: - Recall and parked claims

    /// README: "with claims parked it keeps the stock they wait for and gives back the rest once they are
    /// answered". When the parked claim is answered in `tick` (tail_wait or the claim timeout), nothing
    /// gives the kept stock back: `sweepTail` only runs in `settleEffects`, which `tick` never calls, and no
    /// lease answer follows (no claim is parked, so none is asked for). The recalled tokens stay on this host
    /// until the next refresh (or idle return), while the host that recalled them answers UNAVAILABLE.
    @Test func stockKeptForAParkedClaimGoesBackOnceTheClaimIsAnsweredInTick() throws {
        var r = try Review2Rig.holding(1)
        // A claim of 2: 1 here, 1 more needed; the pool is empty and another host holds a lease.
        let (t, a) = r.claim(qty: 2)
        #expect(a == nil, "parked")
        let asked = r.leaseRequest()
        let first = try #require(asked)
        r.refuse(first, .recalling(held: 1))
        // The other host, finding the pool empty too, recalls this host's stock: kept for the parked claim.
        r.m.recall(now: r.clock.now, effects: &r.fx)
        #expect(r.take().returns.isEmpty, "kept for the parked claim (as designed)")
        // Polls go on; every one finds the pool still empty.
        var answer: VoucherMachine.Answer?
        var returned: [ReturnRequest] = []
        for _ in 0..<150 {
            r.tick(.milliseconds(10))
            if let l = r.leaseRequest() { r.refuse(l, .recalling(held: 1)) }
            let fx = r.take()
            returned += fx.returns
            if let x = fx.answers[t] { answer = x; break }
        }
        guard case .refused(let e)? = answer, e.code == .unavailable else {
            Issue.record("the parked claim was not answered UNAVAILABLE after tail_wait: \(String(describing: answer))")
            return
        }
        // Nobody waits here any more: the kept token must go back now (the other host is polling for it).
        for _ in 0..<20 {
            r.tick(.milliseconds(10))
            if let l = r.leaseRequest() { r.refuse(l, .recalling(held: 1)) }
            returned += r.take().returns
        }
        #expect(returned.contains { $0.leaseId == "1" && $0.returnedTotal == 1 },
                "200 ms after its parked claim was answered, the recalled token is still held here")
        #expect(r.m.stock.tokensHeld == 0, "still held here: \(r.m.stock.tokensHeld)")
    }

    /// Two hosts each hold one of the region's last two tokens and each gets a steady stream of `QTY 2`
    /// claims (two clients per host). Every recall reaches a host with a claim parked, so it keeps its
    /// token; every parked claim is answered UNAVAILABLE after tail_wait; the clients retry. Neither
    /// claim is ever granted and nobody ever answers SOLDOUT, for as long as demand lasts: the two tokens
    /// are stranded (invariant 6) and every claim is stuck at UNAVAILABLE. tail_wait bounds each claim,
    /// not the stalemate.
    @Test func twoHostsKeepingTheLastTokensForTheirOwnParkedClaimsDoNotStallForever() throws {
        var sim = try Review2TwoHosts()
        let granted = sim.run(seconds: 10)
        let held = sim.hosts.map { $0.m.stock.tokensHeld }
        #expect(granted > 0, "10 s of QTY 2 claims on two hosts holding one token each: nothing granted, \(sim.answered) claims answered (\(sim.unavailable) UNAVAILABLE, \(sim.soldOut) SOLDOUT); tokens still held: \(held), pool \(sim.region.pool)")
    }

    // MARK: - SOLDOUT

    /// A claim of 3 on a host holding 2, at an empty pool with no other lease: LEASE says sold out, the
    /// claim gets SOLDOUT (fair: only 2 are left), and then `sweepTail` (nobody parked) gives this host's 2
    /// tokens back to the pool, while `soldOut` stays set. The next claim of 1 on this host is answered
    /// SOLDOUT although the region pool holds the 2 tokens this very host just returned; it stays so until
    /// the next refresh, and every further multi-token claim repeats it.
    @Test func soldOutIsNotAnsweredForTokensThisHostJustGaveBackToThePool() throws {
        var r = try Review2Rig.holding(2)
        let (t, a) = r.claim(qty: 3)
        #expect(a == nil, "parked")
        let asked = r.leaseRequest()
        let l = try #require(asked)
        r.refuse(l, .soldOut(abandoned: 0))
        let fx = r.take()
        if case .refused(let e)? = fx.answers[t] { #expect(e.code == .soldout) }
        let back = fx.returns.reduce(0) { $0 + $1.returnedTotal }
        for ret in fx.returns { r.m.returnAnswered(ret, outcome: .applied(ret.returnedTotal), now: r.clock.now, effects: &r.fx) }
        _ = r.take()
        // The pool now holds `back` tokens (2). A claim of 1 must not be told the quota is gone.
        let (t2, a2) = r.claim(qty: 1)
        let answer = a2 ?? r.take().answers[t2]
        if case .refused(let e)? = answer {
            #expect(e.code != .soldout,
                    "SOLDOUT for a claim of 1 while the pool holds the \(back) tokens this host just returned: \(e)")
        }
    }

    /// A recall makes this host give everything back (nobody parked here); a claim arrives before the
    /// return reached Redis; its LEASE runs before the return (durability none sends both at once; a
    /// return retried after a timeout is sent after the lease), finds the pool empty and no OTHER host's
    /// lease (the caller's own are not counted), and says sold out. The claim is answered SOLDOUT while
    /// this host's own unserved tokens are on their way back to the pool, and SOLDOUT then sticks on this
    /// host until the next refresh. Claims in flight defer SOLDOUT (`tokensPending`); returns in flight do not.
    @Test func soldOutWaitsForThisHostsOwnReturnsInFlight() throws {
        var r = try Review2Rig.holding(4)
        r.m.recall(now: r.clock.now, effects: &r.fx)
        let returns = r.take().returns
        #expect(returns.map(\.returnedTotal) == [4], "the recall gives the 4 tokens back")
        // The return is on the wire. A claim comes.
        let (t, a) = r.claim(qty: 1)
        #expect(a == nil, "parked")
        let asked = r.leaseRequest()
        let l = try #require(asked)
        // Redis runs the LEASE first: pool 0, this host's own open lease not counted, no other lease.
        r.refuse(l, .soldOut(abandoned: 0))
        let answer = r.take().answers[t]
        if case .refused(let e)? = answer {
            #expect(e.code != .soldout, "SOLDOUT while this host's own return of 4 tokens is in flight: \(e)")
        }
        // The return lands: the pool holds 4. This host still answers SOLDOUT (sticky until a refresh).
        for ret in returns { r.m.returnAnswered(ret, outcome: .applied(ret.returnedTotal), now: r.clock.now, effects: &r.fx) }
        _ = r.take()
        let (t2, a2) = r.claim(qty: 1)
        if case .refused(let e)? = a2 ?? r.take().answers[t2] {
            #expect(e.code != .soldout, "SOLDOUT with the 4 tokens this host returned back in the pool: \(e)")
        }
    }

    /// The same without any multi-token claim: this host holds the region's last tokens and asks for a
    /// refill ahead of demand at its low watermark (`need` 0, no claim waiting). LEASE finds the pool empty
    /// and no other host's lease: sold out. The host sets `soldOut`, then `sweepTail` (tail, nobody parked)
    /// gives every token it was serving from back to the pool, and the next claim of 1 is answered SOLDOUT
    /// with the region's last 5 tokens in the pool, until the next refresh.
    @Test func aRefillAheadOfDemandThatFindsThePoolEmptyDoesNotEndTheSaleHere() throws {
        let policy = LeasePolicy(min: 10, max: 10, ttl: .seconds(10), lowWatermark: 0.5)
        var r = Review2Rig(policy: policy, info: VoucherRecordInfo(status: .active, pool: 100, perUser: 0))
        _ = r.take()
        let (t0, _) = r.claim()
        let asked = r.leaseRequest()
        let first = try #require(asked)
        r.grant(first, id: "1", granted: 10, poolAfter: 50)
        r.commitRecords()
        guard r.take().answers[t0]?.isGranted == true else { Issue.record("setup: not served"); return }
        // Four more claims take local stock to the watermark (5): a refill is asked for, nobody waits.
        var refill: LeaseRequest?
        for _ in 0..<4 {
            let (t, a) = r.claim()
            if a == nil { r.commitRecords() }
            if let l = r.leaseRequest() { refill = l }
            guard (a ?? r.take().answers[t])?.isGranted == true else { Issue.record("setup: not served"); return }
        }
        let l = try #require(refill, "a refill ahead of demand")
        #expect(l.need == 0)
        #expect(r.m.stock.available(now: r.clock.now) == 5)
        // Meanwhile the other hosts sold the rest of the pool and closed their leases: the region's last 5
        // tokens are here. Redis: pool empty, no other host's lease.
        r.refuse(l, .soldOut(abandoned: 0))
        let fx = r.take()
        #expect(fx.returns.isEmpty, "the 5 tokens this host serves from were given back: \(fx.returns)")
        for ret in fx.returns { r.m.returnAnswered(ret, outcome: .applied(ret.returnedTotal), now: r.clock.now, effects: &r.fx) }
        _ = r.take()
        let (t, a) = r.claim()
        if case .refused(let e)? = a ?? r.take().answers[t] {
            #expect(e.code != .soldout, "SOLDOUT for a claim of 1 with the region's last 5 tokens in the pool: \(e)")
        }
    }

    // MARK: - Schedule refusals

    /// A LEASE refused for the schedule (set-schedule moved the opening later, or the end earlier, since the
    /// last refresh) returns everything and blocks claims until the next refresh, but nothing stops the next
    /// LEASE: the refill rule (recent demand, stock at the watermark) still holds, no backoff is set, so the
    /// refusal's own `settleEffects` asks for another lease at once, which is refused again, and so on: a hot
    /// loop of journal fsyncs and EVALSHAs on the voucher's hot key until the refresh (for as long as it fails).
    @Test func aScheduleRefusalIsNotFollowedByAnotherLeaseBeforeTheScheduleIsReadAgain() throws {
        var r = try Review2Rig.holding(4)
        // Serve down to the watermark so that a refill is due (lowWatermark 0: when local stock is out).
        var asked: LeaseRequest?
        for _ in 0..<4 {
            let (t, a) = r.claim()
            if a == nil { r.commitRecords() }
            if let l = r.leaseRequest() { asked = l }
            guard (a ?? r.take().answers[t])?.isGranted == true else { Issue.record("setup: not served"); return }
        }
        let refill = try #require(asked, "a refill is asked for")
        r.refuse(refill, .schedule("sale not started: opens at \(formatUTC(ms: Self.redisNow + 3_600_000)) (Redis time), in 3600.0 s"))
        // Every further LEASE is refused the same way (Redis's schedule has not changed), until a refresh.
        var leases = 0
        for _ in 0..<50 {
            while leases < 1000, let l = r.leaseRequest() {
                leases += 1
                r.refuse(l, .schedule("sale not started"))
            }
            _ = r.take()
            r.tick(.milliseconds(10))
        }
        #expect(leases == 0, "\(leases) LEASE requests (capped at 1000) in the 500 ms after Redis refused one for the schedule")
    }

    /// The same loop for an opening lease Redis refuses as early (the opening moved later, or the host's
    /// clock runs ahead of Redis's): `openingTaken` is reset, and `openingLease` asks again at once.
    @Test func anOpeningLeaseRefusedAsEarlyIsNotAskedAgainAtOnce() throws {
        var s = VoucherStock(policy: LeasePolicy(min: 10, max: 1000, ttl: .seconds(10)))
        var c = FakeClock()
        s.setSchedule(SaleSchedule(startMs: Self.redisNow + 5_000, endMs: 0, redisNowMs: Self.redisNow, sentAt: c.now,
                                   receivedAt: c.now), now: c.now)
        s.prepareOpening(100)
        c.advance(.seconds(1))
        _ = try #require(lease(&s, now: c.now, waiting: 0), "the opening lease")
        s.leaseRefused(.schedule("sale not started: opens at ... (Redis time), in 14.0 s"), now: c.now)
        var again = 0
        for _ in 0..<10 {
            if lease(&s, now: c.now, waiting: 0) != nil {
                again += 1
                s.leaseRefused(.schedule("sale not started"), now: c.now)
            }
            c.advance(.milliseconds(10))
        }
        #expect(again == 0, "the opening lease was asked for \(again) more times within 100 ms of an 'early' refusal")
    }
}

// MARK: - Two hosts and a model of the region's Redis

/// The LEASE / RETURN / RENEW scripts of cea9814 reduced to what the end of a sale needs: the pool, the
/// leases, the held window (other hosts' leases, expiry at most 3 s past) and the recall publish
/// (at most every 50 ms, recorded in `recallMs`/`recallHost`).
struct Review2Region {
    struct Lease {
        var host: String
        var granted: Int
        var returned: Int
        var open: Bool
        var expiresMs: Int64
    }

    var pool: Int
    var leases: [String: Lease] = [:]
    var seq = 0
    var recallMs: Int64 = 0
    var recallHost = ""
    /// Recalls published and not yet delivered (the publishing host).
    var published: [String] = []

    mutating func giveBack(_ r: ReturnRequest, host: String) -> Int {
        guard var l = leases[r.leaseId], l.host == host, l.open else { return 0 }
        let total = min(r.returnedTotal, l.granted)
        var delta = 0
        if total > l.returned {
            delta = total - l.returned
            l.returned = total
            pool += delta
        }
        if r.close { l.open = false }
        leases[r.leaseId] = l
        return delta
    }

    mutating func lease(_ req: LeaseRequest, host: String, nowMs: Int64) -> VoucherMachine.LeaseAnswer {
        for c in req.close { _ = giveBack(c, host: host) }
        if req.want <= 0 { return .granted(LeaseGrant(id: "", granted: 0, ttl: .zero, poolAfter: pool)) }
        var n = min(req.want, max(req.need, Int((Double(pool) * LeasePolicy.exhaustionFraction).rounded(.up))))
        n = min(n, pool)
        if n <= 0 {
            var held = 0
            var abandoned = 0
            for l in leases.values where l.open && l.host != host {
                if l.expiresMs > nowMs - 3000 { held += 1 } else { abandoned += 1 }
            }
            if held > 0 {
                if nowMs - recallMs >= 50 {
                    recallMs = nowMs
                    recallHost = host
                    published.append(host)
                }
                return .refused(.recalling(held: held))
            }
            return .refused(.soldOut(abandoned: abandoned))
        }
        seq += 1
        let id = "\(seq)"
        pool -= n
        leases[id] = Lease(host: host, granted: n, returned: 0, open: true, expiresMs: nowMs + 10_000)
        return .granted(LeaseGrant(id: id, granted: n, ttl: .seconds(10), poolAfter: pool))
    }

    mutating func renew(_ id: String, host: String, nowMs: Int64) -> RenewOutcome {
        guard var l = leases[id], l.host == host, l.open else { return .gone }
        if l.expiresMs <= nowMs { return .expired }
        l.expiresMs = nowMs + 10_000
        leases[id] = l
        return .renewed(ttl: .seconds(10))
    }
}

/// Two sidecars (journal durability, every write durable at once, Redis answering at once) over one
/// `Review2Region`, with two clients per host claiming `QTY 2` in a loop (the second starting 500 ms after the
/// first), ticked every 10 ms and refreshed every second.
struct Review2TwoHosts {
    struct Host {
        var name: String
        var m: VoucherMachine
        var answers: [Int: VoucherMachine.Answer] = [:]
        var ticket = 0
        /// Each client's outstanding ticket (nil: idle), and when it starts.
        var clients: [Int?] = [nil, nil]
    }

    var hosts: [Host] = []
    var region = Review2Region(pool: 40)
    var clock = FakeClock()
    var granted = 0
    var answered = 0
    var unavailable = 0
    var soldOut = 0
    let policy = LeasePolicy(min: 2, max: 2, ttl: .seconds(10), lowWatermark: 0)
    let start: Instant

    init() throws {
        start = clock.now
        for name in ["a", "b"] {
            var rules = ClaimRules(region: "sg", host: name, idPrefix: "sg.\(name).b.", durability: .journal)
            rules.tailWait = .seconds(1)
            rules.claimTimeout = .seconds(2)
            let seq = SeqSource()
            var m = VoucherMachine(voucher: "v", rules: rules, policy: policy, requestPrefix: "\(name).b.",
                                   nextSeq: { seq.next() }, wallClock: { 1_000 })
            var e: [VoucherMachine.Effect] = []
            _ = m.handle(.avail, ticket: -1, now: clock.now, effects: &e)
            m.loaded(.success(VoucherRecordInfo(status: .active, pool: 40, perUser: 0)), policy: policy, now: clock.now,
                     effects: &e)
            hosts.append(Host(name: name, m: m))
        }
        // Each host sells one token of a lease of two: each holds one. A third host takes and sells the
        // rest of the pool: the region's last two tokens are the two hosts' own.
        for i in hosts.indices {
            let t = submit(i, qty: 1)
            try #require(hosts[i].answers[t].map(\.isGranted) == true,
                         "setup: host \(hosts[i].name)'s first claim was not served")
        }
        granted = 0
        answered = 0
        #expect(region.pool == 36)
        region.pool = 0
        #expect(hosts.map { $0.m.stock.available(now: clock.now) } == [1, 1])
    }

    var nowMs: Int64 { Int64(clock.now.nanoseconds / 1_000_000) }

    /// A claim on host `i`, its effects carried out. Returns its ticket.
    mutating func submit(_ i: Int, qty: Int) -> Int {
        hosts[i].ticket += 1
        let t = hosts[i].ticket
        var fx: [VoucherMachine.Effect] = []
        if let a = hosts[i].m.handle(.claim(qty: qty, user: "\(hosts[i].name)\(t)", req: nil), ticket: t, now: clock.now,
                                     effects: &fx) {
            note(i, t, a)
        }
        pump(i, fx)
        return t
    }

    mutating func note(_ i: Int, _ t: Int, _ a: VoucherMachine.Answer) {
        hosts[i].answers[t] = a
        answered += 1
        switch a {
        case .claimID, .claimNumber: granted += 1
        case .refused(let e) where e.code == .unavailable: unavailable += 1
        case .refused(let e) where e.code == .soldout: soldOut += 1
        default: break
        }
    }

    /// Carry out host `i`'s effects (and everything they lead to), then deliver recalls.
    mutating func pump(_ i: Int, _ initial: [VoucherMachine.Effect]) {
        var queue = initial
        while !queue.isEmpty {
            let e = queue.removeFirst()
            var fx: [VoucherMachine.Effect] = []
            let now = clock.now
            switch e {
            case .answer(let t, let a):
                note(i, t, a)
            case .lease(let l):
                let a = region.lease(l, host: hosts[i].name, nowMs: nowMs)
                hosts[i].m.leaseAnswered(a, request: l, trusted: true, now: now, effects: &fx)
            case .recordGrant(_, let g, let l):
                hosts[i].m.grantRecorded(g, request: l, ok: true, now: now, effects: &fx)
            case .recordClaim(_, let seq):
                hosts[i].m.claimsRecorded(seqs: [seq], ok: true, now: now, effects: &fx)
            case .giveBack(let r):
                let n = region.giveBack(r, host: hosts[i].name)
                hosts[i].m.returnAnswered(r, outcome: .applied(n), now: now, effects: &fx)
            case .renew(let id):
                let o = region.renew(id, host: hosts[i].name, nowMs: nowMs)
                hosts[i].m.renewAnswered(id, outcome: o, sentAt: now, now: now, effects: &fx)
            default:
                break
            }
            queue += fx
        }
        while !region.published.isEmpty {
            let from = region.published.removeFirst()
            for j in hosts.indices where hosts[j].name != from {
                var fx: [VoucherMachine.Effect] = []
                hosts[j].m.recall(now: clock.now, from: from, effects: &fx)
                pump(j, fx)
            }
        }
    }

    /// Run the sale's end for `seconds`; returns the claims granted meanwhile.
    mutating func run(seconds: Int) -> Int {
        let steps = seconds * 100
        for step in 0..<steps {
            // Clients: both hosts' claims are sent before either host's effects are carried out.
            var sent: [(Int, [VoucherMachine.Effect])] = []
            for i in hosts.indices {
                for c in hosts[i].clients.indices {
                    if let t = hosts[i].clients[c], hosts[i].answers[t] == nil { continue }
                    if c == 1 && step < 50 { continue }  // the second client starts after 500 ms
                    hosts[i].ticket += 1
                    let t = hosts[i].ticket
                    hosts[i].clients[c] = t
                    var fx: [VoucherMachine.Effect] = []
                    if let a = hosts[i].m.handle(.claim(qty: 2, user: "\(hosts[i].name)\(t)", req: nil), ticket: t,
                                                 now: clock.now, effects: &fx) {
                        note(i, t, a)
                    }
                    sent.append((i, fx))
                }
            }
            for (i, fx) in sent { pump(i, fx) }
            clock.advance(.milliseconds(10))
            for i in hosts.indices {
                var fx: [VoucherMachine.Effect] = []
                hosts[i].m.tick(now: clock.now, effects: &fx)
                pump(i, fx)
            }
            // The periodic refresh (every second, the two hosts 300 ms apart).
            let ms = Int((clock.now - start).nanosecondsClamped / 1_000_000)
            for i in hosts.indices where ms % 1000 == 250 + 300 * i {
                var fx: [VoucherMachine.Effect] = []
                let info = VoucherRecordInfo(status: .active, pool: region.pool, perUser: 0, recallMs: Int(region.recallMs),
                                             recallHost: region.recallHost)
                hosts[i].m.refreshed(info, policy: policy, now: clock.now, effects: &fx)
                pump(i, fx)
            }
        }
        return granted
    }
}
