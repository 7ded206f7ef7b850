/// A lease as the sidecar holds it: tokens granted by Redis, how many of them
/// were taken here, and until when they may be served.
public struct LocalLease: Sendable, Equatable {
    public let id: String
    public let granted: Int
    /// Tokens taken from this lease by claims decided here: committed or still in flight.
    public internal(set) var served: Int
    /// Tokens whose fate is not settled yet: claims in flight (taken, not yet durable or refused)
    /// and cancellations being journaled back into this lease. A lease is never closed while this
    /// is above zero, so its closing return (`granted - served`) is final when it is sent.
    public internal(set) var pending: Int = 0
    /// Serving stops at this monotonic instant unless the lease is renewed.
    public internal(set) var deadline: Instant
    public let ttl: Duration
    public internal(set) var renewInFlight: Bool = false

    public init(id: String, granted: Int, served: Int = 0, deadline: Instant, ttl: Duration) {
        self.id = id
        self.granted = granted
        self.served = served
        self.deadline = deadline
        self.ttl = ttl
    }

    public var remaining: Int { granted - served }
}

/// What Redis answered to a successful `LEASE`.
public struct LeaseGrant: Sendable, Equatable {
    public var id: String
    public var granted: Int
    public var ttl: Duration
    /// The region pool right after this lease was taken.
    public var poolAfter: Int

    public init(id: String, granted: Int, ttl: Duration, poolAfter: Int) {
        self.id = id
        self.granted = granted
        self.ttl = ttl
        self.poolAfter = poolAfter
    }
}

/// A lease request the shell must send to Redis.
public struct LeaseRequest: Sendable, Equatable {
    /// The request id: Redis grants at most one lease per id, so a retry after a lost reply (or a
    /// restart) learns what was granted instead of taking more.
    public var req: String
    /// Tokens asked for (the policy's size, or more when waiting claims need more). 0 only resolves `req`.
    public var want: Int
    /// Tokens that waiting claims need at least (the script grants at least this if the pool has it).
    public var need: Int
    /// When the request was sent, on the monotonic clock: the lease's life is measured from here.
    public var sentAt: Instant
    /// Fully served leases to close in the same round trip.
    public var close: [ReturnRequest] = []
}

/// Give back the unused part of a lease: `returnedTotal` is cumulative, so a retry changes nothing.
public struct ReturnRequest: Sendable, Equatable {
    public var leaseId: String
    public var granted: Int
    public var returnedTotal: Int
    public var close: Bool

    public init(leaseId: String, granted: Int, returnedTotal: Int, close: Bool) {
        self.leaseId = leaseId
        self.granted = granted
        self.returnedTotal = returnedTotal
        self.close = close
    }

    /// Tokens of the lease served (and not put back) when it was closed.
    public var served: Int { granted - returnedTotal }
}

/// The part of one claim taken from one lease.
public struct ClaimShare: Sendable, Equatable {
    public var leaseId: String
    public var tokens: Int

    public init(leaseId: String, tokens: Int) {
        self.leaseId = leaseId
        self.tokens = tokens
    }
}

/// The shares of one claim, in order: at most ``ClaimEvent/maxShares``, nearly always one. One share is kept
/// inline; only a claim spread over several leases has an array. (An array for every claim was an allocation
/// on the event loop and a free on the journal thread, glibc's slow path: measured one malloc and 96
/// instructions a claim fewer; issue 13.)
public struct ClaimShares: RandomAccessCollection, ExpressibleByArrayLiteral, Sendable, Equatable {
    private enum Storage: Sendable {
        case none
        case one(ClaimShare)
        case many([ClaimShare])
    }

    private var storage: Storage

    public init() { storage = .none }
    public init(_ share: ClaimShare) { storage = .one(share) }
    public init<S: Sequence>(_ shares: S) where S.Element == ClaimShare {
        storage = .none
        for s in shares { append(s) }
    }
    public init(arrayLiteral shares: ClaimShare...) { self.init(shares) }

    public var startIndex: Int { 0 }
    public var endIndex: Int {
        switch storage {
        case .none: 0
        case .one: 1
        case .many(let a): a.count
        }
    }

    public subscript(i: Int) -> ClaimShare {
        switch storage {
        case .one(let s):
            precondition(i == 0, "ClaimShares index out of range")
            return s
        case .many(let a): return a[i]
        case .none: preconditionFailure("ClaimShares index out of range")
        }
    }

    public mutating func append(_ s: ClaimShare) {
        switch storage {
        case .none: storage = .one(s)
        case .one(let first): storage = .many([first, s])
        case .many(var a):
            storage = .none   // (so that `a` is the array's only reference: appended in place)
            a.append(s)
            storage = .many(a)
        }
    }

    public static func == (a: ClaimShares, b: ClaimShares) -> Bool { a.elementsEqual(b) }
}

public enum VoucherStatus: String, Sendable, Equatable {
    case active, paused, closed
}

/// The answer of the local stock to one claim.
public enum ClaimDecision: Sendable, Equatable {
    /// Granted from local leases.
    case served(ClaimShares)
    /// Not enough local stock yet, but a lease may bring it: park the claim.
    case wait
    /// Refused with this error.
    case reject(QuotaError)
}

/// Why Redis refused a lease.
public enum LeaseRefusal: Sendable, Equatable {
    /// The pool is empty and no host holds a lease that could still serve: the region's quota is gone.
    /// `abandoned`: leases of hosts silent for long past their expiry, left to reconciliation.
    case soldOut(abandoned: Int)
    /// The pool is empty but `held` leases (of any host) may still hold unserved tokens: they are being
    /// recalled; ask again shortly.
    case recalling(held: Int)
    case inactive(VoucherStatus)
    /// Outside the sale's schedule, as Redis's clock says (the message says when).
    case schedule(String)
    case unknownVoucher
}

/// A sale's opening and end: as Redis holds them (ms on Redis's clock, 0: none), and placed on this
/// host's monotonic clock conservatively, from a reply that read Redis's clock at some instant between
/// `sentAt` and `receivedAt`: the sale never opens here before it opens at Redis, and never serves
/// here after it ends at Redis.
public struct SaleSchedule: Sendable, Equatable {
    public var startMs: Int64 = 0
    public var endMs: Int64 = 0
    public var opensAt: Instant?
    public var endsAt: Instant?

    public init() {}

    public init(startMs: Int64, endMs: Int64, redisNowMs: Int64, sentAt: Instant, receivedAt: Instant) {
        self.startMs = startMs
        self.endMs = endMs
        opensAt = startMs > 0 ? receivedAt + .milliseconds(startMs - redisNowMs) : nil
        endsAt = endMs > 0 ? sentAt + .milliseconds(endMs - redisNowMs) : nil
    }

    /// Why a claim at `now` is outside the sale, or nil.
    public func refusal(now: Instant) -> String? {
        if let o = opensAt, now < o {
            return "sale not started: opens at \(formatUTC(ms: startMs)) (Redis time), in \(formatSeconds(o - now))"
        }
        if let e = endsAt, now >= e { return "sale ended at \(formatUTC(ms: endMs)) (Redis time)" }
        return nil
    }
}

/// `ms` since the Unix epoch as RFC 3339 UTC with milliseconds, e.g. `2026-11-29T14:35:00.250Z`.
public func formatUTC(ms: Int64) -> String {
    let days = ms >= 0 ? ms / 86_400_000 : (ms - 86_399_999) / 86_400_000
    let rest = ms - days * 86_400_000
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468
    let era = (z >= 0 ? z : z - 146_096) / 146_097
    let doe = z - era * 146_097
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100)
    let mp = (5 * doy + 2) / 153
    let d = doy - (153 * mp + 2) / 5 + 1
    let m = mp < 10 ? mp + 3 : mp - 9
    let y = yoe + era * 400 + (m <= 2 ? 1 : 0)
    func pad(_ v: Int64, _ n: Int) -> String {
        let t = String(v)
        return String(repeating: "0", count: max(0, n - t.count)) + t
    }
    return "\(pad(y, 4))-\(pad(m, 2))-\(pad(d, 2))T\(pad(rest / 3_600_000, 2)):\(pad(rest / 60000 % 60, 2)):"
        + "\(pad(rest / 1000 % 60, 2)).\(pad(rest % 1000, 3))Z"
}

/// A duration as seconds with one decimal, e.g. `3.2 s`.
public func formatSeconds(_ d: Duration) -> String {
    let n = d.nanosecondsClamped
    // Saturate rather than trap: a far-future time (year 9999) clamps to Int64.max nanoseconds.
    let tenths = n > Int64.max - 50_000_000 ? n / 100_000_000 : (n + 50_000_000) / 100_000_000
    return "\(tenths / 10).\(tenths % 10) s"
}

/// How Redis answered a renewal.
public enum RenewOutcome: Sendable, Equatable {
    case renewed(ttl: Duration)
    /// Redis's clock says the lease expired (not yet reclaimed): stop serving it, return the rest.
    case expired
    /// The lease is closed or reclaimed: nothing of it may be served or returned.
    case gone
}

/// Counters of one voucher on this host.
public struct VoucherCounters: Sendable, Equatable {
    public var claimsOK = 0
    public var tokensServed = 0
    public var leasesTaken = 0
    public var tokensLeased = 0
    public var leasesRenewed = 0
    public var leasesReturned = 0
    public var tokensReturned = 0
    public var leasesFenced = 0
    public var tokensLost = 0
    /// Claims that found the stock spread over more leases than one claim may take from (`ClaimEvent.maxShares`),
    /// so that every lease was given back for the tokens to come back as one lease (`INFO`: `stock_consolidations`).
    public var consolidations = 0
    /// Claims that had to wait for a lease (no local stock when they came).
    public var claimsWaited = 0
    public var rejected: [QuotaErrorCode: Int] = [:]
    public init() {}
}

/// The local stock of one voucher and every decision about its leases, as a value.
///
/// The I/O shell calls the mutating methods with the current monotonic time and
/// carries out what they return (send a lease, a renewal or a return). Nothing
/// here reads a clock or does I/O, so tests drive it with plain values.
///
/// Safety rules kept here:
/// - a token is served only from a lease whose deadline (`sent + ttl - margin`) is in the future;
/// - a lease leaves the stock before its return is handed to the shell, so returned tokens are never served;
/// - a lease is closed only when nothing drawn from it is in flight (`pending == 0`), and its return
///   is `granted - served`: exactly what was not served, never more;
/// - a token given back by a claim that did not complete returns to the lease it came from (the lease
///   is still held: it cannot close while the claim is in flight), never to the pool directly.
public struct VoucherStock: Sendable {
    public var policy: LeasePolicy
    /// Leases that may serve (sorted by deadline).
    public private(set) var leases: [LocalLease] = []
    public private(set) var status: VoucherStatus = .active
    /// The pool had nothing left at the last lease or refresh.
    public private(set) var soldOut = false
    /// The region pool as last seen (lease replies and periodic refresh).
    public private(set) var poolHint = 0
    public private(set) var leaseInFlight = false
    /// A lease request whose outcome is unknown (timed out): the next request reuses its id.
    public private(set) var unresolvedRequest: String?
    /// Redis could not be reached: no new lease is tried before this instant.
    public private(set) var backoffUntil: Instant?
    public private(set) var consecutiveFailures = 0
    public private(set) var draining = false
    /// The sale's schedule (``setSchedule(_:now:)``).
    public private(set) var schedule = SaleSchedule()
    /// Redis refused a lease for the schedule: claims get this answer until the instant passes.
    private var scheduleBlock: (String, Instant)?
    /// Take the opening lease in the warm-up window (the voucher was seen here, or the operator said so).
    public private(set) var warm = false
    /// Tokens of the opening lease (``prepareOpening(_:)``).
    public private(set) var openingSize = 0
    private var openingTaken = false
    private var openingInFlight = false
    private var openingSeeded = false
    /// The end of the sale is near: the region pool was seen empty, or another host recalled stock.
    /// Leases are then exactly what waiting claims need, and stock nobody waits for goes back at once.
    public private(set) var tail = false
    /// Another host recalled this voucher's stock: what no claim here waits for goes back (``sweepTail``).
    /// Cleared when this host holds nothing or is granted a lease.
    public private(set) var recalled = false
    /// Leases that may still hold unserved tokens, as the last empty-pool answer counted them.
    public private(set) var heldElsewhere = 0
    /// Leases of hosts silent long past their expiry, as the last SOLDOUT answer counted them.
    public private(set) var abandonedLeases = 0
    /// The pool was empty while leases were held: ask again at this instant (recalled stock may be back).
    public private(set) var recallPollAt: Instant?
    /// How soon a host waiting for recalled stock first asks Redis again; each further empty answer
    /// doubles the wait, up to ``recallPollMax``.
    public static let recallPoll: Duration = .milliseconds(10)
    public static let recallPollMax: Duration = .milliseconds(160)
    /// Empty-pool answers in a row (the next poll waits `recallPoll << emptyAnswers`).
    private var emptyAnswers = 0
    /// Why the authority can no longer be trusted (Redis forgot this voucher): nothing is served or returned.
    public private(set) var lost: String?
    public private(set) var lastDemand: Instant?
    public var rate = RateEstimator()
    public var counters = VoucherCounters()
    private var pendingReturns: [ReturnRequest] = []
    /// Returns handed to the shell and not answered yet: the pool may be about to grow by them.
    public private(set) var returnsOut = 0
    /// Fully served leases not yet closed at Redis: they ride along on the next lease request.
    public private(set) var finishedLeases: [LocalLease] = []
    /// Leases that may no longer serve (fenced, drained, paused) but still have claims in flight.
    public private(set) var settling: [LocalLease] = []
    public var finished: [String] { finishedLeases.map(\.id) }
    private var finishedSince: Instant?
    private let requestPrefix: String
    private var requestCount = 0

    /// - Parameter requestPrefix: makes lease request ids unique across hosts and restarts (`host.boot.voucher.`).
    public init(policy: LeasePolicy, requestPrefix: String = "r.") {
        self.policy = policy
        self.requestPrefix = requestPrefix
    }

    // MARK: - Claims

    /// Tokens that may be served at `now`.
    @inline(__always)  // called from mutating code: an out-of-line call copies all of `self` first (issue 13)
    public func available(now: Instant) -> Int {
        var n = 0
        for l in leases where l.deadline > now { n += l.remaining }
        return n
    }

    /// Decide one claim of `qty` tokens. With `inFlight` the tokens stay pending until
    /// ``commit(_:)`` or ``abort(_:now:)``; without it the claim is final at once.
    ///
    /// - Parameter refusingToGiveBack: where the claim would make this host give every lease back (stock spread
    ///   over more than ``ClaimEvent/maxShares`` leases), refuse it with this instead (a claim the user's limit
    ///   refuses as far as this host knows: one user's claims must not return the host's stock again and again).
    public mutating func claim(qty: Int, now: Instant, countDemand: Bool = true, inFlight: Bool = false,
                               refusingToGiveBack: QuotaError? = nil) -> ClaimDecision {
        if let lost { return reject(.unavailable, lost) }
        if draining { return reject(.unavailable, "draining: this host no longer serves claims") }
        switch status {
        case .paused: return reject(.inactive, "voucher is paused")
        case .closed: return reject(.inactive, "voucher is closed")
        case .active: break
        }
        if schedule.opensAt != nil || schedule.endsAt != nil || scheduleBlock != nil,
            let why = scheduleRefusal(now: now)
        {
            endIfOver(now: now)
            return reject(.inactive, why)
        }
        fence(now: now)
        if countDemand {
            lastDemand = now
            rate.record(qty, now: now)
        }
        if available(now: now) >= qty {
            // One claim takes from at most `ClaimEvent.maxShares` leases: the journal decodes no more, and a
            // cancellation marks where each share went in 64 bits. Only stock spread over many small leases (a
            // sale's tail: tokens coming back one small lease at a time while a large claim waits) gets past the
            // first two: the largest leases serve it if they can, else every lease is given back, so that its
            // tokens return to the pool, and the claim waits for a lease of what it needs.
            if spansFewLeases(qty) { return .served(take(qty, inFlight: inFlight)) }
            if let largest = largestLeasesCovering(qty) { return .served(take(qty, from: largest, inFlight: inFlight)) }
            // Give the leases back only when a lease can be asked for the claim next (Redis reachable, the voucher
            // open); else keep serving the stock to smaller claims and refuse this one, fail closed (helper-40).
            guard leaseCanFollow(now: now) else {
                return reject(.unavailable,
                              "the stock here is spread over more than \(ClaimEvent.maxShares) leases and no lease can be asked now; retry")
            }
            if let e = refusingToGiveBack { return reject(e.code, e.message) }
            counters.consolidations += 1
            // The pool gets these tokens back: it is not sold out (else the claim would be told SOLDOUT, and its
            // `REQ` would keep that answer, while the pool holds what this host just gave back).
            soldOut = false
            returnAll()
            return .wait
        }
        if soldOut { return reject(.soldout, soldOutMessage) }
        if let b = backoffUntil, now < b, !leaseInFlight {
            return reject(.unavailable, "quota authority unreachable and no local stock")
        }
        return .wait
    }

    /// Decide a parked claim again after a lease answer: serve it, or say what to answer.
    /// Unlike ``claim(qty:now:countDemand:inFlight:)`` it never parks twice: no stock and no lease coming means refuse.
    public mutating func retryParked(qty: Int, now: Instant, inFlight: Bool = false,
                                     refusingToGiveBack: QuotaError? = nil) -> ClaimDecision {
        let d = claim(qty: qty, now: now, countDemand: false, inFlight: inFlight, refusingToGiveBack: refusingToGiveBack)
        guard d == .wait else { return d }
        if leaseInFlight || recallPollAt != nil || nextLeaseWouldBeSent(now: now) { return .wait }
        return reject(.unavailable, "quota authority unreachable and no local stock")
    }

    /// Whether a lease could be asked at `now`, sold out or a recall poll aside (both end when tokens come back).
    private func leaseCanFollow(now: Instant) -> Bool {
        lost == nil && !draining && status == .active && (backoffUntil.map { now >= $0 } ?? true)
            && !(schedule.endsAt.map { now >= $0 } ?? false)
    }

    private func nextLeaseWouldBeSent(now: Instant) -> Bool {
        leaseCanFollow(now: now) && !soldOut && (recallPollAt.map { now >= $0 } ?? true)
    }

    private var soldOutMessage: String {
        abandonedLeases == 0
            ? "voucher sold out in this region"
            : "voucher sold out in this region (\(abandonedLeases) leases of hosts silent past their expiry await reconciliation)"
    }

    /// Why a claim at `now` is outside the sale (Redis's schedule as this host places it), or nil.
    public func scheduleRefusal(now: Instant) -> String? {
        if let why = schedule.refusal(now: now) { return why }
        if let (why, until) = scheduleBlock, now < until { return why }
        return nil
    }

    // MARK: - Schedule and the opening

    /// The sale's schedule as last read from Redis. Past its end, every lease goes back.
    public mutating func setSchedule(_ s: SaleSchedule, now: Instant) {
        schedule = s
        if scheduleBlock != nil {
            scheduleBlock = nil
            if consecutiveFailures == 0 { backoffUntil = nil }
        }
        endIfOver(now: now)
    }

    /// Past the sale's end: stop serving and give everything back.
    private mutating func endIfOver(now: Instant) {
        guard let e = schedule.endsAt, now >= e, !leases.isEmpty || !finishedLeases.isEmpty else { return }
        returnAll()
    }

    /// Take the opening lease of `size` tokens: in the warm-up window before a scheduled sale opens, or
    /// at once without a schedule (`quotactl voucher warm`).
    public mutating func prepareOpening(_ size: Int) {
        warm = true
        openingSize = max(1, size)
    }

    /// The opening lease, once, in the warm-up window before `opensAt`.
    private mutating func openingLease(now: Instant, opensAt: Instant) -> LeaseRequest? {
        guard warm, !openingTaken, leases.isEmpty, now >= opensAt - policy.warmup, nextLeaseWouldBeSent(now: now)
        else { return nil }
        // Demand is expected at the opening: nothing held for it goes back as idle before then.
        if lastDemand.map({ $0 < opensAt }) ?? true { lastDemand = opensAt }
        leaseInFlight = true
        openingInFlight = true
        rate.seed(Double(openingSize) / policy.targetSeconds)
        let req = unresolvedRequest ?? newRequestID()
        return LeaseRequest(req: req, want: openingSize, need: openingSize, sentAt: now, close: takeFinishedForClose())
    }

    private mutating func openingAnswered() {
        if openingInFlight { openingTaken = true }
        openingInFlight = false
    }

    // MARK: - The end: recall

    /// Another host found the pool empty while this one may hold stock: give back everything no claim
    /// here waits for (claims in flight settle first; their leases close when they do).
    /// With claims parked here (`waiting` tokens) nothing goes back: they wait for this stock, and once
    /// they are answered, the end-of-sale sweep gives back what is left. Before the opening, opening
    /// leases are meant to be held: a recall then changes nothing.
    /// `keepForParked`: the host's parked claims have priority over the recalling host's (the machine
    /// decides by host id, so two hosts never keep the last tokens for each other).
    public mutating func recall(now: Instant, waiting: Int, keepForParked: Bool = true) {
        guard lost == nil, !draining, !beforeOpening(now) else { return }
        tail = true
        recalled = true
        if (waiting == 0 || !keepForParked) && (!leases.isEmpty || !finishedLeases.isEmpty) { returnAll() }
    }

    /// The sale has a scheduled opening still ahead.
    private func beforeOpening(_ now: Instant) -> Bool { schedule.opensAt.map { now < $0 } ?? false }

    /// Near the end, stock no claim here waits for goes back at once (e.g. tokens a refused claim gave back).
    /// Only after another host recalled: a host that found the pool empty itself keeps serving what it holds.
    public mutating func sweepTail(waiting: Int, now: Instant) {
        guard tail, recalled, waiting == 0, lost == nil, !leases.isEmpty || !finishedLeases.isEmpty, !beforeOpening(now)
        else { return }
        recalled = false
        returnAll()
    }

    /// The pool as seen is large again (more quota): leave the end-of-sale mode.
    private mutating func leaveTailIfRefilled(pool: Int) {
        guard tail, pool >= 4 * policy.leaseSize(rate: rate.rate) else { return }
        tail = false
        heldElsewhere = 0
    }

    private mutating func reject(_ code: QuotaErrorCode, _ message: String) -> ClaimDecision {
        counters.rejected[code, default: 0] += 1
        return .reject(QuotaError(code, message))
    }

    /// Count a refusal decided outside the stock (timeouts, overload).
    public mutating func countRejection(_ code: QuotaErrorCode) {
        counters.rejected[code, default: 0] += 1
    }

    /// Whether `take(qty)` takes from at most `ClaimEvent.maxShares` leases (the first has enough, nearly always).
    @inline(__always)  // as `available(now:)`
    private func spansFewLeases(_ qty: Int) -> Bool {
        if let first = leases.first, first.remaining >= qty { return true }
        var left = qty
        var shares = 0
        for l in leases where l.remaining > 0 {
            shares += 1
            left -= l.remaining
            if left <= 0 { break }
        }
        return shares <= ClaimEvent.maxShares
    }

    /// Indexes into `leases` of at most `ClaimEvent.maxShares` leases, the largest first, whose tokens cover
    /// `qty`, in `leases`' order; nil if even the largest do not.
    private func largestLeasesCovering(_ qty: Int) -> [Int]? {
        let bySize = leases.indices.filter { leases[$0].remaining > 0 }.sorted { leases[$0].remaining > leases[$1].remaining }
        var left = qty
        var chosen: [Int] = []
        for i in bySize.prefix(ClaimEvent.maxShares) {
            chosen.append(i)
            left -= leases[i].remaining
            if left <= 0 { return chosen.sorted() }
        }
        return nil
    }

    /// ``take(_:inFlight:)`` from the leases at `indexes` only (in `leases`' order); every lease it empties is
    /// finished, wherever it stands.
    private mutating func take(_ qty: Int, from indexes: [Int], inFlight: Bool) -> ClaimShares {
        var left = qty
        var shares = ClaimShares()
        for i in indexes where left > 0 {
            guard let s = share(of: i, upTo: left, inFlight: inFlight) else { continue }
            shares.append(s)
            left -= s.tokens
        }
        precondition(left == 0 && shares.count <= ClaimEvent.maxShares, "take(from:) called without enough stock")
        counters.claimsOK += 1
        counters.tokensServed += qty
        for var l in leases where l.remaining == 0 {
            l.renewInFlight = false
            finishedLeases.append(l)
        }
        leases.removeAll { $0.remaining == 0 }
        return shares
    }

    /// Take up to `left` tokens of `leases[i]` (pinned until the claim settles with `inFlight`): their share,
    /// or nil when it has none left.
    @inline(__always)
    private mutating func share(of i: Int, upTo left: Int, inFlight: Bool) -> ClaimShare? {
        let n = min(left, leases[i].remaining)
        guard n > 0 else { return nil }
        leases[i].served += n
        if inFlight { leases[i].pending += n }
        return ClaimShare(leaseId: leases[i].id, tokens: n)
    }

    private mutating func take(_ qty: Int, inFlight: Bool) -> ClaimShares {
        var left = qty
        var shares: ClaimShares
        var i = 0
        // (`leases[0]` read in place: `let first = leases.first` copied the whole lease, a memcpy and a retain and a
        // release of its id, for every claim; issue 13.)
        if qty > 0, !leases.isEmpty, leases[0].remaining >= qty, let s = share(of: 0, upTo: qty, inFlight: inFlight) {
            // The usual claim: one share of the first lease (the loop below would take the same).
            shares = ClaimShares(s)
            left = 0
        } else {
            shares = ClaimShares()
        }
        while left > 0 && i < leases.count {
            if let s = share(of: i, upTo: left, inFlight: inFlight) {
                shares.append(s)
                left -= s.tokens
            }
            i += 1
        }
        precondition(left == 0, "take() called without enough stock")
        precondition(shares.count <= ClaimEvent.maxShares, "take() called for more shares than a record holds")
        counters.claimsOK += 1
        counters.tokensServed += qty
        // Leases fully served are done: they are closed at Redis with the next lease request.
        while !leases.isEmpty, leases[0].remaining == 0 {
            var first = leases.removeFirst()
            first.renewInFlight = false
            finishedLeases.append(first)
        }
        return shares
    }

    /// Where a lease held by this stock is: servable, fully served, or settling.
    private enum Place { case serving(Int), finished(Int), settling(Int) }

    private func place(_ id: String) -> Place? {
        if let i = Self.index(of: id, in: leases) { return .serving(i) }
        if let i = Self.index(of: id, in: finishedLeases) { return .finished(i) }
        if let i = Self.index(of: id, in: settling) { return .settling(i) }
        return nil
    }

    /// The index of lease `id` in `a`, read through its buffer: `firstIndex(where:)` copied each lease it
    /// looked at (its strings retained and released).
    @inline(__always)
    private static func index(of id: String, in a: [LocalLease]) -> Int? {
        a.withUnsafeBufferPointer { b in
            for i in b.indices where b[i].id == id { return i }
            return nil
        }
    }

    private mutating func modify(_ p: Place, _ body: (inout LocalLease) -> Void) {
        switch p {
        case .serving(let i): body(&leases[i])
        case .finished(let i): body(&finishedLeases[i])
        case .settling(let i): body(&settling[i])
        }
    }

    /// Is lease `id` held here (serving, fully served or settling), i.e. not yet closed?
    public func holds(_ id: String) -> Bool { place(id) != nil }

    /// A claim in flight became final (durable, answered): its tokens stay served.
    public mutating func commit(_ shares: ClaimShares) {
        // Each array changed in place by index. (Through `place` and `modify` the serving leases' array was found
        // shared at the change and copied whole, once a claim: issue 13.)
        for s in shares {
            if let i = Self.index(of: s.leaseId, in: leases) {
                leases[i].pending -= s.tokens
            } else if let i = Self.index(of: s.leaseId, in: finishedLeases) {
                finishedLeases[i].pending -= s.tokens
            } else if let i = Self.index(of: s.leaseId, in: settling) {
                settling[i].pending -= s.tokens
            }
        }
        settle()
    }

    /// A claim in flight did not complete: its tokens go back to the lease they came from (which
    /// cannot have closed meanwhile). A fully served lease still valid serves them again; a
    /// settling one returns them with its close. Returns tokens whose lease is gone (Redis said so).
    @discardableResult
    public mutating func abort(_ shares: ClaimShares, now: Instant) -> Int {
        var lost = 0
        for s in shares {
            guard let p = place(s.leaseId) else {
                lost += s.tokens
                continue
            }
            modify(p) {
                $0.pending -= s.tokens
                $0.served -= s.tokens
            }
            revive(p, now: now)
        }
        counters.tokensServed -= shares.reduce(0) { $0 + $1.tokens }
        counters.claimsOK -= 1
        counters.tokensLost += lost
        settle()
        return lost
    }

    /// A fully served lease that got tokens back serves again if it still may.
    private mutating func revive(_ p: Place, now: Instant) {
        guard case .finished(let j) = p, finishedLeases[j].remaining > 0, finishedLeases[j].deadline > now,
            !draining, status == .active, lost == nil
        else { return }
        let l = finishedLeases.remove(at: j)
        let i = leases.firstIndex(where: { $0.deadline > l.deadline }) ?? leases.count
        leases.insert(l, at: i)
    }

    /// A committed claim is being cancelled: each share whose lease is still held here is pinned
    /// (the lease cannot close until ``cancelled(_:toPool:applied:now:)``) and goes back to it; the
    /// others go to the pool (a restock by claim id). Returns the mask of shares that go to the pool.
    public mutating func pinForCancel(_ shares: ClaimShares) -> UInt64 {
        var toPool: UInt64 = 0
        for (i, s) in shares.enumerated() {
            if lost == nil, let p = place(s.leaseId) {
                modify(p) { $0.pending += s.tokens }
            } else {
                toPool |= 1 << UInt64(i)
            }
        }
        return toPool
    }

    /// The cancellation record is durable (`applied`) or could not be written: unpin, and with
    /// `applied` put the tokens back into their leases.
    public mutating func cancelled(_ shares: ClaimShares, toPool: UInt64, applied: Bool, now: Instant) {
        var back = 0
        for (i, s) in shares.enumerated() where toPool & (1 << UInt64(i)) == 0 {
            guard let p = place(s.leaseId) else { continue }
            modify(p) {
                $0.pending -= s.tokens
                if applied { $0.served -= s.tokens }
            }
            if applied {
                back += s.tokens
                revive(p, now: now)
            }
        }
        counters.tokensServed -= back
        settle()
    }

    /// Close settling leases whose claims are all settled.
    private mutating func settle() {
        guard !settling.isEmpty else { return }
        var i = 0
        while i < settling.count {
            if settling[i].pending == 0 {
                close(settling.remove(at: i))
            } else {
                i += 1
            }
        }
    }

    /// Stop serving `l`: close it now, or once its claims in flight settle.
    private mutating func retire(_ l: LocalLease) {
        var l = l
        l.renewInFlight = false
        if l.pending == 0 { close(l) } else { settling.append(l) }
    }

    // MARK: - Fencing

    /// Stop serving every lease whose deadline passed: their unused tokens go back to Redis.
    public mutating func fence(now: Instant) {
        if schedule.endsAt != nil { endIfOver(now: now) }
        // Leases are kept sorted by deadline: the first one tells whether any expired.
        guard let first = leases.first, first.deadline <= now else { return }
        while let i = leases.firstIndex(where: { $0.deadline <= now }) {
            let l = leases.remove(at: i)
            counters.leasesFenced += 1
            retire(l)
        }
    }

    private mutating func close(_ l: LocalLease) {
        precondition(l.pending == 0, "a lease is closed only when nothing drawn from it is in flight")
        guard lost == nil else { return }
        pendingReturns.append(ReturnRequest(leaseId: l.id, granted: l.granted, returnedTotal: l.remaining, close: true))
    }

    // MARK: - Leases

    /// The lease to ask for now, if any (at most one in flight).
    /// - Parameter waiting: tokens wanted by parked claims.
    public mutating func nextLease(now: Instant, waiting: Int) -> LeaseRequest? {
        guard !leaseInFlight else { return nil }
        if let req = unresolvedRequest {
            // Learn what the unanswered request got (or make sure it gets nothing) before anything else, even
            // when no new lease is wanted: a lease granted unseen must not stay outstanding. Only learned,
            // never asked for tokens again: on a sharded voucher the request's "nothing" on the shards it
            // passed is dropped after an hour, and asked again after that it could be granted a second lease
            // (more tokens go out under a new request id once this one is answered).
            guard lost == nil, backoffUntil.map({ now >= $0 }) ?? true else { return nil }
            leaseInFlight = true
            return LeaseRequest(req: req, want: 0, need: 0, sentAt: now)
        }
        guard nextLeaseWouldBeSent(now: now) else { return nil }
        if let o = schedule.opensAt {
            if now < o { return openingLease(now: now, opensAt: o) }
            if warm && !openingSeeded {
                // The sale opened: size the next leases for the demand the opening lease was sized for.
                openingSeeded = true
                rate.seed(Double(openingSize) / policy.targetSeconds)
            }
        } else if warm && !openingTaken && leases.isEmpty {
            return openingLease(now: now, opensAt: now)
        }
        rate.roll(now: now)
        let recentDemand = lastDemand.map { now - $0 < policy.idleReturn } ?? false
        guard waiting > 0 || recentDemand else { return nil }
        fence(now: now)
        let avail = available(now: now)
        let size = policy.leaseSize(rate: rate.rate)
        // Near the end, only what waiting claims need: no refill ahead of demand.
        let wanted = waiting > avail || (!tail && avail <= policy.refillThreshold(leaseSize: size))
        guard wanted else { return nil }
        let need = max(0, waiting - avail)
        leaseInFlight = true
        recallPollAt = nil
        let close = takeFinishedForClose()
        return LeaseRequest(req: newRequestID(), want: tail ? need : max(size, need), need: need, sentAt: now, close: close)
    }

    private mutating func newRequestID() -> String {
        requestCount += 1
        return requestPrefix + String(requestCount, radix: 36)
    }

    /// Fully served leases with nothing in flight, as closing returns.
    private mutating func takeFinishedForClose() -> [ReturnRequest] {
        var out: [ReturnRequest] = []
        var i = 0
        while i < finishedLeases.count {
            if finishedLeases[i].pending == 0 {
                let l = finishedLeases.remove(at: i)
                out.append(ReturnRequest(leaseId: l.id, granted: l.granted, returnedTotal: l.remaining, close: true))
            } else {
                i += 1
            }
        }
        if finishedLeases.isEmpty { finishedSince = nil }
        return out
    }

    /// Close finished leases with their own round trip when no lease request took them along
    /// within `after` (or at once when no lease will come: sold out, inactive, draining).
    public mutating func closeFinished(now: Instant, after: Duration = .seconds(1)) {
        guard !finishedLeases.isEmpty else { return }
        if finishedSince == nil { finishedSince = now }
        let stale = now - finishedSince! >= after
        guard stale || draining || soldOut || tail || status != .active || lost != nil else { return }
        let closing = takeFinishedForClose()
        if lost == nil { pendingReturns += closing }
    }

    /// Redis granted a lease requested at `sentAt`.
    public mutating func leaseGranted(_ g: LeaseGrant, sentAt: Instant, now: Instant) {
        leaseInFlight = false
        unresolvedRequest = nil
        backoffUntil = nil
        consecutiveFailures = 0
        poolHint = g.poolAfter
        recallPollAt = nil
        if g.granted > 0 {
            heldElsewhere = 0
            emptyAnswers = 0
            recalled = false
        }
        // An empty pool after this grant is not the end yet (other hosts may hold stock), but it is near.
        // (Before the opening it means nothing: the opening leases took the pool, as they should.)
        if g.poolAfter == 0 { if !beforeOpening(now) { tail = true } } else { soldOut = false }
        leaveTailIfRefilled(pool: g.poolAfter)
        openingAnswered()
        guard g.granted > 0 else { return }
        counters.leasesTaken += 1
        counters.tokensLeased += g.granted
        let lease = LocalLease(
            id: g.id, granted: g.granted, deadline: policy.serveDeadline(sentAt: sentAt, ttl: g.ttl), ttl: g.ttl)
        if draining || status != .active || lease.deadline <= now || lost != nil {
            close(lease)
            return
        }
        let i = leases.firstIndex(where: { $0.deadline > lease.deadline }) ?? leases.count
        leases.insert(lease, at: i)
    }

    /// Redis granted a lease that may not be served (its grant could not be journaled): give it back in
    /// full at once.
    public mutating func leaseGrantedUnusable(_ g: LeaseGrant) {
        leaseInFlight = false
        openingAnswered()
        unresolvedRequest = nil
        poolHint = g.poolAfter
        guard g.granted > 0, lost == nil else { return }
        counters.tokensLeased += g.granted
        pendingReturns.append(ReturnRequest(leaseId: g.id, granted: g.granted, returnedTotal: g.granted, close: true))
    }

    /// Redis refused the lease.
    public mutating func leaseRefused(_ r: LeaseRefusal, now: Instant) {
        leaseInFlight = false
        unresolvedRequest = nil
        backoffUntil = nil
        consecutiveFailures = 0
        recallPollAt = nil
        let openingRefused = openingInFlight
        openingAnswered()
        switch r {
        case .soldOut, .recalling:
            poolHint = 0
            // Before the opening, an empty pool means the opening leases took it: nothing ends yet.
            if beforeOpening(now) { break }
            tail = true
            if case .recalling(let held) = r {
                heldElsewhere = held
            } else if case .soldOut(let abandoned) = r {
                heldElsewhere = 0
                abandonedLeases = abandoned
                // Claims in flight here may still give tokens back (a journal write that fails), and this
                // host's own returns in flight are about to refill the pool: sold out only once both settle.
                if tokensPending == 0 && returnsOut == 0 { soldOut = true; break }
            }
            let wait = min(Self.recallPoll * (1 << min(emptyAnswers, 8)), Self.recallPollMax)
            emptyAnswers += 1
            recallPollAt = now + wait
        case .inactive(let s):
            setStatus(s)
        case .schedule(let why):
            // Redis's clock says the sale is not open (the schedule changed since this host last read it):
            // what is held goes back, and nothing is served until the next refresh brings the new schedule.
            scheduleBlock = (why, .max)
            returnAll()
            if openingRefused { openingTaken = false }
            // Not again before the next refresh has read the schedule (setSchedule lifts this).
            backoffUntil = now + .seconds(1)
        case .unknownVoucher:
            setStatus(.closed)
        }
    }

    /// Redis could not be reached or did not answer in time: back off before the next try. When the
    /// request may have been executed (`outcomeUnknown`), the next request reuses its id, so Redis
    /// answers with what it granted instead of granting twice.
    public mutating func leaseFailed(now: Instant, request: LeaseRequest, outcomeUnknown: Bool = true) {
        leaseInFlight = false
        openingInFlight = false
        if outcomeUnknown { unresolvedRequest = request.req }
        // The leases it was to close: closing returns are cumulative, so sending them again is safe.
        if lost == nil { pendingReturns += request.close }
        consecutiveFailures += 1
        let ms = min(2_000, 50 << min(consecutiveFailures, 6))
        backoffUntil = now + .milliseconds(ms)
    }

    // MARK: - Renewals

    /// Leases with stock whose serving time runs short: renew them (marked in flight).
    public mutating func renewals(now: Instant) -> [String] {
        guard !draining, lost == nil else { return [] }
        var ids: [String] = []
        for i in leases.indices
        where leases[i].remaining > 0 && !leases[i].renewInFlight && leases[i].deadline > now
            && leases[i].deadline - now <= policy.renewAhead
        {
            leases[i].renewInFlight = true
            ids.append(leases[i].id)
        }
        return ids
    }

    /// Redis answered a renewal sent at `sentAt`. Returns the lease when Redis says it is gone
    /// (closed or reclaimed): it was dropped without a return.
    @discardableResult
    public mutating func renewed(_ id: String, outcome: RenewOutcome, sentAt: Instant, now: Instant) -> LocalLease? {
        guard let i = leases.firstIndex(where: { $0.id == id }) else {
            // Served to its last token while the renewal was on the wire: it waits among the finished leases
            // for its claims in flight, and must never serve again once Redis does not hold it open, not even
            // tokens an aborted or cancelled claim gives back to it (``revive(_:now:)``).
            guard let j = finishedLeases.firstIndex(where: { $0.id == id }) else { return nil }
            switch outcome {
            case .renewed:
                return nil
            case .expired:
                // Still open at Redis: it closes as finished leases do, returning what it holds. Its deadline is
                // put at the start of time, not at `now`: an event whose clock was read before this answer's
                // (the clock is read before the voucher's lock is taken) must not find it still servable.
                // (A second renewal of it may have been on the wire too: the lease is fenced, and counted, once.)
                if finishedLeases[j].deadline != .min { counters.leasesFenced += 1 }
                finishedLeases[j].deadline = .min
                return nil
            case .gone:
                // As for a serving lease: this host's record of it ends here, nothing returned. Tokens of its
                // claims in flight that abort are lost; cancellations of its claims go to the pool.
                let l = finishedLeases.remove(at: j)
                if finishedLeases.isEmpty { finishedSince = nil }
                return dropGone(l)
            }
        }
        leases[i].renewInFlight = false
        var gone: LocalLease?
        switch outcome {
        case .renewed(let ttl):
            counters.leasesRenewed += 1
            let d = policy.serveDeadline(sentAt: sentAt, ttl: ttl)
            if d > leases[i].deadline { leases[i].deadline = d }
            leases.sort { $0.deadline < $1.deadline }
        case .expired:
            let l = leases.remove(at: i)
            counters.leasesFenced += 1
            retire(l)
        case .gone:
            gone = dropGone(leases.remove(at: i))
        }
        fence(now: now)
        return gone
    }

    /// Redis no longer holds lease `l` for this host (closed or reclaimed): it is dropped without a return,
    /// fenced, and what it still held is counted lost.
    private mutating func dropGone(_ l: LocalLease) -> LocalLease {
        counters.leasesFenced += 1
        counters.tokensLost += l.remaining
        return l
    }

    /// The renewal could not be sent or answered: it is tried again; fencing still applies.
    public mutating func renewFailed(_ id: String) {
        if let i = leases.firstIndex(where: { $0.id == id }) { leases[i].renewInFlight = false }
    }

    // MARK: - Returns

    /// Returns the shell must send now (fenced, finished, idle, drained leases).
    public mutating func takeReturns() -> [ReturnRequest] {
        guard !pendingReturns.isEmpty else { return [] }
        returnsOut += pendingReturns.count
        defer { pendingReturns.removeAll(keepingCapacity: true) }
        return pendingReturns
    }

    /// A return was acknowledged by Redis with `applied` tokens put back into the pool.
    public mutating func returned(_ r: ReturnRequest, applied: Int) {
        returnsOut = max(0, returnsOut - 1)
        counters.leasesReturned += 1
        counters.tokensReturned += applied
    }

    /// Redis said the lease of a return is already closed or not this host's: nothing changed, nothing to retry.
    public mutating func returnGone(_ r: ReturnRequest) {
        returnsOut = max(0, returnsOut - 1)
    }

    /// A return could not be sent: keep it for the next attempt.
    public mutating func returnFailed(_ r: ReturnRequest) {
        returnsOut = max(0, returnsOut - 1)
        if lost == nil { pendingReturns.append(r) }
    }

    /// Give back everything held when the voucher has been idle for `idleReturn` (or `idleFor`).
    public mutating func returnIfIdle(now: Instant, idleFor: Duration? = nil) {
        let limit = idleFor ?? policy.idleReturn
        guard !leases.isEmpty, lastDemand.map({ now - $0 >= limit }) ?? true else { return }
        returnAll()
    }

    /// Give back every held lease now (or as soon as its claims in flight settle).
    public mutating func returnAll() {
        let all = leases + finishedLeases
        leases.removeAll()
        finishedLeases.removeAll()
        finishedSince = nil
        for l in all { retire(l) }
    }

    /// Stop claiming for good on this host and give everything back.
    public mutating func drain() {
        draining = true
        returnAll()
    }

    /// Redis no longer knows this voucher's state as this host does (it lost data, or the voucher
    /// was created again): serve nothing, return nothing (a return would create quota in a pool
    /// that does not account for these leases), and leave the tokens to reconciliation.
    public mutating func loseAuthority(_ reason: String) {
        guard lost == nil else { return }
        lost = reason
        for l in leases + finishedLeases + settling { counters.tokensLost += l.remaining }
        leases.removeAll()
        finishedLeases.removeAll()
        settling.removeAll()
        pendingReturns.removeAll()
        unresolvedRequest = nil
    }

    /// The voucher's state or pool as refreshed from Redis.
    public mutating func setStatus(_ s: VoucherStatus) {
        status = s
        if s != .active { returnAll() }
    }

    /// This host's own restock put `tokens` back into the region's pool (a cancelled claim whose lease had
    /// closed): the pool is not empty any more, so claims here ask for a lease again at once instead of being
    /// told SOLDOUT until the next refresh (up to `avail_refresh` later). Redis still decides what a lease gets.
    public mutating func poolRestocked(_ tokens: Int) {
        guard tokens > 0 else { return }
        // At least `tokens` are in the pool now. Not `+=`: a refresh or a lease answer that read the pool after the
        // restock may have been taken in already, and AVAIL would count the same tokens twice (helper-38).
        poolHint = max(poolHint, tokens)
        soldOut = false
    }

    public mutating func refreshed(pool: Int) {
        poolHint = pool
        if pool > 0 { soldOut = false }
        leaveTailIfRefilled(pool: pool)
    }

    /// Unused tokens held (valid or not yet fenced, fully served or settling).
    public var tokensHeld: Int {
        leases.reduce(0) { $0 + $1.remaining } + finishedLeases.reduce(0) { $0 + $1.remaining }
            + settling.reduce(0) { $0 + $1.remaining }
    }

    /// Tokens of claims (and cancellations) still in flight.
    public var tokensPending: Int {
        leases.reduce(0) { $0 + $1.pending } + finishedLeases.reduce(0) { $0 + $1.pending }
            + settling.reduce(0) { $0 + $1.pending }
    }

    /// Nothing held, nothing to give back, no lease request on the wire or unresolved.
    public var isSettled: Bool {
        leases.isEmpty && finishedLeases.isEmpty && settling.isEmpty && pendingReturns.isEmpty && !leaseInFlight
            && (unresolvedRequest == nil || lost != nil)
    }
}
