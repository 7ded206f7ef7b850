/// A lease as the sidecar holds it: tokens granted by Redis, how many of them
/// were served here, and until when they may be served.
public struct LocalLease: Sendable, Equatable {
    public let id: String
    public let granted: Int
    public internal(set) var served: Int
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
    /// Tokens asked for (the policy's size, or more when waiting claims need more).
    public var want: Int
    /// Tokens that waiting claims need at least (the script grants at least this if the pool has it).
    public var need: Int
    /// When the request was sent, on the monotonic clock: the lease's life is measured from here.
    public var sentAt: Instant
    /// Fully served leases to close in the same round trip (nothing to give back for them).
    public var close: [String] = []
}

/// Give back the unused part of a lease: `returnedTotal` is cumulative, so a retry changes nothing.
public struct ReturnRequest: Sendable, Equatable {
    public var leaseId: String
    public var returnedTotal: Int
    public var close: Bool

    public init(leaseId: String, returnedTotal: Int, close: Bool) {
        self.leaseId = leaseId
        self.returnedTotal = returnedTotal
        self.close = close
    }
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

public enum VoucherStatus: String, Sendable, Equatable {
    case active, paused, closed
}

/// The answer of the local stock to one claim.
public enum ClaimDecision: Sendable, Equatable {
    /// Granted from local leases.
    case served([ClaimShare])
    /// Not enough local stock yet, but a lease may bring it: park the claim.
    case wait
    /// Refused with this error.
    case reject(QuotaError)
}

/// Why Redis refused a lease.
public enum LeaseRefusal: Sendable, Equatable {
    case soldOut
    case inactive(VoucherStatus)
    case unknownVoucher
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
    public var rejected: [QuotaErrorCode: Int] = [:]
    public init() {}
}

/// The local stock of one voucher and every decision about it, as a value.
///
/// The I/O shell calls the mutating methods with the current monotonic time and
/// carries out what they return (send a lease, a renewal or a return). Nothing
/// here reads a clock or does I/O, so tests drive it with plain values.
///
/// Safety rules kept here:
/// - a token is served only from a lease whose deadline (`sent + ttl - margin`) is in the future;
/// - a lease leaves `leases` before its return is handed to the shell, so returned tokens are never served;
/// - `returnedTotal` of a lease is `granted - served` and is never more than what was not served.
public struct VoucherStock: Sendable {
    public var policy: LeasePolicy
    public private(set) var leases: [LocalLease] = []
    public private(set) var status: VoucherStatus = .active
    /// The pool had nothing left at the last lease or refresh.
    public private(set) var soldOut = false
    /// The region pool as last seen (lease replies and periodic refresh).
    public private(set) var poolHint = 0
    public private(set) var leaseInFlight = false
    /// Redis could not be reached: no new lease is tried before this instant.
    public private(set) var backoffUntil: Instant?
    public private(set) var consecutiveFailures = 0
    public private(set) var draining = false
    public private(set) var lastDemand: Instant?
    public var rate = RateEstimator()
    public var counters = VoucherCounters()
    private var pendingReturns: [ReturnRequest] = []
    /// Fully served leases not yet closed at Redis: they ride along on the next lease request.
    public private(set) var finishedLeases: [LocalLease] = []
    public var finished: [String] { finishedLeases.map(\.id) }
    private var finishedSince: Instant?

    public init(policy: LeasePolicy) {
        self.policy = policy
    }

    // MARK: - Claims

    /// Tokens that may be served at `now`.
    public func available(now: Instant) -> Int {
        var n = 0
        for l in leases where l.deadline > now { n += l.remaining }
        return n
    }

    /// Decide one claim of `qty` tokens.
    public mutating func claim(qty: Int, now: Instant, countDemand: Bool = true) -> ClaimDecision {
        if draining { return reject(.unavailable, "draining: this host no longer serves claims") }
        switch status {
        case .paused: return reject(.inactive, "voucher is paused")
        case .closed: return reject(.inactive, "voucher is closed")
        case .active: break
        }
        fence(now: now)
        if countDemand {
            lastDemand = now
            rate.record(qty, now: now)
        }
        if available(now: now) >= qty { return .served(take(qty)) }
        if soldOut { return reject(.soldout, "voucher sold out in this region") }
        if let b = backoffUntil, now < b, !leaseInFlight {
            return reject(.unavailable, "quota authority unreachable and no local stock")
        }
        return .wait
    }

    /// Decide a parked claim again after a lease answer: serve it, or say what to answer.
    /// Unlike ``claim(qty:now:)`` it never parks twice: no stock and no lease coming means refuse.
    public mutating func retryParked(qty: Int, now: Instant) -> ClaimDecision {
        let d = claim(qty: qty, now: now, countDemand: false)
        guard d == .wait else { return d }
        if leaseInFlight || nextLeaseWouldBeSent(now: now) { return .wait }
        return reject(.unavailable, "quota authority unreachable and no local stock")
    }

    private func nextLeaseWouldBeSent(now: Instant) -> Bool {
        !draining && status == .active && !soldOut && (backoffUntil.map { now >= $0 } ?? true)
    }

    private mutating func reject(_ code: QuotaErrorCode, _ message: String) -> ClaimDecision {
        counters.rejected[code, default: 0] += 1
        return .reject(QuotaError(code, message))
    }

    /// Count a refusal decided outside the stock (timeouts, overload).
    public mutating func countRejection(_ code: QuotaErrorCode) {
        counters.rejected[code, default: 0] += 1
    }

    private mutating func take(_ qty: Int) -> [ClaimShare] {
        var left = qty
        var shares: [ClaimShare] = []
        var i = 0
        while left > 0 && i < leases.count {
            let n = min(left, leases[i].remaining)
            if n > 0 {
                leases[i].served += n
                shares.append(ClaimShare(leaseId: leases[i].id, tokens: n))
                left -= n
            }
            i += 1
        }
        precondition(left == 0, "take() called without enough stock")
        counters.claimsOK += 1
        counters.tokensServed += qty
        // Leases fully served are done: they are closed at Redis with the next lease request.
        while let first = leases.first, first.remaining == 0 {
            finishedLeases.append(first)
            leases.removeFirst()
        }
        return shares
    }

    /// Give back tokens of a claim that did not complete (or was cancelled) to the lease they came
    /// from, if it is still held and valid: a fully served lease not yet closed at Redis is taken
    /// back into service. Returns the tokens put back; the caller must return the rest to the pool
    /// (their lease was closed or fenced with them counted as served).
    @discardableResult
    public mutating func putBack(_ shares: [ClaimShare], now: Instant) -> Int {
        var n = 0
        for s in shares {
            if let i = leases.firstIndex(where: { $0.id == s.leaseId }), leases[i].deadline > now {
                let k = min(s.tokens, leases[i].served)
                leases[i].served -= k
                n += k
            } else if let j = finishedLeases.firstIndex(where: { $0.id == s.leaseId }), finishedLeases[j].deadline > now,
                !draining, status == .active
            {
                var l = finishedLeases.remove(at: j)
                let k = min(s.tokens, l.served)
                l.served -= k
                n += k
                let i = leases.firstIndex(where: { $0.deadline > l.deadline }) ?? leases.count
                leases.insert(l, at: i)
            }
        }
        counters.tokensServed -= n
        return n
    }

    // MARK: - Fencing

    /// Stop serving every lease whose deadline passed: their unused tokens go back to Redis.
    public mutating func fence(now: Instant) {
        while let i = leases.firstIndex(where: { $0.deadline <= now }) {
            let l = leases.remove(at: i)
            counters.leasesFenced += 1
            close(l)
        }
    }

    private mutating func close(_ l: LocalLease) {
        pendingReturns.append(ReturnRequest(leaseId: l.id, returnedTotal: l.remaining, close: true))
    }

    // MARK: - Leases

    /// The lease to ask for now, if any (at most one in flight).
    /// - Parameter waiting: tokens wanted by parked claims.
    public mutating func nextLease(now: Instant, waiting: Int) -> LeaseRequest? {
        guard !leaseInFlight, nextLeaseWouldBeSent(now: now) else { return nil }
        rate.roll(now: now)
        let recentDemand = lastDemand.map { now - $0 < policy.idleReturn } ?? false
        guard waiting > 0 || recentDemand else { return nil }
        fence(now: now)
        let avail = available(now: now)
        let size = policy.leaseSize(rate: rate.rate)
        guard waiting > avail || avail <= policy.refillThreshold(leaseSize: size) else { return nil }
        let need = max(0, waiting - avail)
        leaseInFlight = true
        defer {
            finishedLeases.removeAll()
            finishedSince = nil
        }
        return LeaseRequest(want: max(size, need), need: need, sentAt: now, close: finished)
    }

    /// Close finished leases with their own round trip when no lease request took them along
    /// within `after` (or at once when no lease will come: sold out, inactive, draining).
    public mutating func closeFinished(now: Instant, after: Duration = .seconds(1)) {
        guard !finished.isEmpty else { return }
        if finishedSince == nil { finishedSince = now }
        let stale = now - finishedSince! >= after
        guard stale || draining || soldOut || status != .active else { return }
        for l in finishedLeases { pendingReturns.append(ReturnRequest(leaseId: l.id, returnedTotal: l.remaining, close: true)) }
        finishedLeases.removeAll()
        finishedSince = nil
    }

    /// Redis granted a lease requested at `sentAt`.
    public mutating func leaseGranted(_ g: LeaseGrant, sentAt: Instant, now: Instant) {
        leaseInFlight = false
        backoffUntil = nil
        consecutiveFailures = 0
        poolHint = g.poolAfter
        soldOut = g.poolAfter == 0
        guard g.granted > 0 else { return }
        counters.leasesTaken += 1
        counters.tokensLeased += g.granted
        let lease = LocalLease(
            id: g.id, granted: g.granted, deadline: policy.serveDeadline(sentAt: sentAt, ttl: g.ttl), ttl: g.ttl)
        if draining || status != .active || lease.deadline <= now {
            close(lease)
            return
        }
        let i = leases.firstIndex(where: { $0.deadline > lease.deadline }) ?? leases.count
        leases.insert(lease, at: i)
    }

    /// Redis refused the lease.
    public mutating func leaseRefused(_ r: LeaseRefusal) {
        leaseInFlight = false
        backoffUntil = nil
        consecutiveFailures = 0
        switch r {
        case .soldOut:
            soldOut = true
            poolHint = 0
        case .inactive(let s):
            setStatus(s)
        case .unknownVoucher:
            setStatus(.closed)
        }
    }

    /// Redis could not be reached (or timed out): back off before the next try.
    public mutating func leaseFailed(now: Instant, request: LeaseRequest? = nil) {
        leaseInFlight = false
        // Redis did not close them: close them with the next request. They are fully served (their
        // numbers are gone with the request), so nothing is given back for them.
        if let request {
            for id in request.close {
                finishedLeases.append(LocalLease(id: id, granted: 0, deadline: now, ttl: .zero))
            }
        }
        consecutiveFailures += 1
        let ms = min(2_000, 50 << min(consecutiveFailures, 6))
        backoffUntil = now + .milliseconds(ms)
    }

    // MARK: - Renewals

    /// Leases with stock whose serving time runs short: renew them (marked in flight).
    public mutating func renewals(now: Instant) -> [String] {
        guard !draining else { return [] }
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

    /// Redis answered a renewal sent at `sentAt`.
    public mutating func renewed(_ id: String, outcome: RenewOutcome, sentAt: Instant, now: Instant) {
        guard let i = leases.firstIndex(where: { $0.id == id }) else { return }
        leases[i].renewInFlight = false
        switch outcome {
        case .renewed(let ttl):
            counters.leasesRenewed += 1
            let d = policy.serveDeadline(sentAt: sentAt, ttl: ttl)
            if d > leases[i].deadline { leases[i].deadline = d }
            leases.sort { $0.deadline < $1.deadline }
        case .expired:
            let l = leases.remove(at: i)
            counters.leasesFenced += 1
            close(l)
        case .gone:
            let l = leases.remove(at: i)
            counters.leasesFenced += 1
            counters.tokensLost += l.remaining
        }
        fence(now: now)
    }

    /// The renewal could not be sent or answered: it is tried again; fencing still applies.
    public mutating func renewFailed(_ id: String) {
        if let i = leases.firstIndex(where: { $0.id == id }) { leases[i].renewInFlight = false }
    }

    // MARK: - Returns

    /// Returns the shell must send now (fenced, finished, idle, drained leases).
    public mutating func takeReturns() -> [ReturnRequest] {
        defer { pendingReturns.removeAll(keepingCapacity: true) }
        return pendingReturns
    }

    /// A return was acknowledged by Redis with `applied` tokens put back into the pool.
    public mutating func returned(_ r: ReturnRequest, applied: Int) {
        counters.leasesReturned += 1
        counters.tokensReturned += applied
    }

    /// A return could not be sent: keep it for the next attempt.
    public mutating func returnFailed(_ r: ReturnRequest) {
        pendingReturns.append(r)
    }

    /// Give back everything held when the voucher has been idle for `idleReturn` (or `idleFor`).
    public mutating func returnIfIdle(now: Instant, idleFor: Duration? = nil) {
        let limit = idleFor ?? policy.idleReturn
        guard !leases.isEmpty, lastDemand.map({ now - $0 >= limit }) ?? true else { return }
        returnAll()
    }

    /// Give back every held lease now.
    public mutating func returnAll() {
        for l in leases { close(l) }
        leases.removeAll()
        for l in finishedLeases { pendingReturns.append(ReturnRequest(leaseId: l.id, returnedTotal: l.remaining, close: true)) }
        finishedLeases.removeAll()
        finishedSince = nil
    }

    /// Stop claiming for good on this host and give everything back.
    public mutating func drain() {
        draining = true
        returnAll()
    }

    /// The voucher's state or pool as refreshed from Redis.
    public mutating func setStatus(_ s: VoucherStatus) {
        status = s
        if s != .active { returnAll() }
    }

    public mutating func refreshed(pool: Int) {
        poolHint = pool
        if pool > 0 { soldOut = false }
    }

    /// Unused tokens held (valid or not yet fenced).
    public var tokensHeld: Int { leases.reduce(0) { $0 + $1.remaining } }
}
