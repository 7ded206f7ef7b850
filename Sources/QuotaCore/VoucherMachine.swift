/// When a granted claim's reply is sent (the `durability` config key).
public enum Durability: String, Sendable, CaseIterable {
    /// At once; journal and Kafka follow in the background. Unsafe: a crash can lose answered claims.
    case none
    /// After the claim record is on the local disk (fsync'd, group commit). The default.
    case journal
    /// After the record is on the local disk and acknowledged by Kafka (acks=all).
    case kafka
}

/// What the claim lifecycle needs to know of the configuration.
public struct ClaimRules: Sendable {
    public enum PerUserMode: String, Sendable { case central, local }
    public enum OnUnavailable: String, Sendable { case failClosed = "fail-closed", local }

    public var region: String
    public var host: String
    /// Claim ids are `idPrefix` + the claim's sequence number in base 36. Fixed for the machine's life: answers
    /// carry only the number, and the runtime spells them with its own copy of it (helper-47).
    public let idPrefix: String
    public var durability: Durability
    public var perUserMode: PerUserMode = .central
    public var onUnavailable: OnUnavailable = .failClosed
    /// A claim not answered within this is answered UNAVAILABLE (its tokens settle when its I/O does).
    public var claimTimeout: Duration = .seconds(2) {
        didSet { claimTimeoutNanoseconds = claimTimeout.nanosecondsClamped }
    }
    /// ``claimTimeout`` in nanoseconds, for a waiting claim's deadline (``Instant/adding(nanoseconds:)``).
    public private(set) var claimTimeoutNanoseconds: Int64 = 2_000_000_000
    /// `REQ` answers are kept this long.
    public var dedupeWindow: Duration = .seconds(60)
    /// Claims parked per voucher waiting for stock (or for the voucher's load).
    public var maxWaiting = 10_000
    /// Users remembered per voucher for the local per-user pre-check.
    public var maxTrackedUsers = 1_000_000
    /// The process-wide bound of `REQ` answers kept (nil: unbounded). A new request id that finds it full
    /// of answers still within their window is refused BUSY, never forgotten early.
    public var dedupeBudget: DedupeBudget?
    /// At the end of a sale, how long a claim waits for stock recalled from other hosts before it is
    /// answered UNAVAILABLE (`limits.tail_wait_ms`).
    public var tailWait: Duration = .seconds(1)
    /// A deliberate bug, only for the chaos checker's self-test (`QUOTAD_INJECT_BUG`): `skip-user-check`
    /// (the per-user check always passes) or `no-timeout-cancel` (a claim that lands after its timeout is
    /// not cancelled, yet its tokens serve again). Never set in production.
    public var injectedBug: String?
    /// `durability: none` only: whether background records (``VoucherMachine/Effect/recordLater(_:)``)
    /// go anywhere: claims when there is a journal or a Kafka producer, per-user intents only when there
    /// is a journal. When they would go nowhere the machine does not build them (issue 13: building the
    /// intent copies the event).
    public var recordsClaims = true
    public var recordsIntents = true

    public init(region: String, host: String, idPrefix: String, durability: Durability) {
        self.region = region
        self.host = host
        self.idPrefix = idPrefix
        self.durability = durability
    }
}

/// One voucher on one host: its stock and every claim's life, as a value.
///
/// A claim is decided from local stock, then (if the voucher has a per-user limit) its intent is
/// journaled and the user checked in Redis, then the claim is recorded as the durability mode
/// requires, then answered. Every step that needs I/O is an ``Effect`` the shell carries out,
/// reporting back with the matching event method. Nothing here reads a clock or does I/O.
///
/// What is kept here (docs/accounting.md):
/// - tokens of a claim in flight stay pinned to their lease until the claim commits (durable and
///   answered) or aborts (refused, failed, timed out): an abort puts them back into the same lease,
///   which cannot have closed meanwhile;
/// - a claim answered with its id is remembered for `UNCLAIM`; one answered otherwise never is;
/// - a claim that became durable after its caller was told UNAVAILABLE is cancelled by a journaled
///   cancellation before its tokens are served again;
/// - a per-user count that may have been taken for a claim that did not complete is released.
public struct VoucherMachine: Sendable {
    public typealias Ticket = Int

    public enum Request: Sendable, Equatable {
        case claim(qty: Int, user: String, req: String?)
        case avail
    }

    public enum Answer: Sendable, Equatable {
        case claimID(String)
        /// A claim answered with its id, given as its sequence number: the id is the rules' `idPrefix`
        /// followed by it (``ClaimEvent/claimID(prefix:seq:)``), written straight into the reply with no
        /// `String` made. Every claim made by this machine is answered so; `claimID` is for ids of other
        /// runs (a `REQ` answer recovered from the journal).
        case claimNumber(Int)
        case integer(Int)
        case ok
        case refused(QuotaError)
    }

    public enum Phase: Sendable, Equatable {
        /// Metadata is being fetched from Redis.
        case loading
        /// Redis does not know the voucher: NOVOUCHER until `until`.
        case missing(until: Instant)
        /// Redis could not be reached for the metadata: UNAVAILABLE until `until`.
        case failed(until: Instant)
        case ready
    }

    /// Outcome of a per-user check in Redis.
    public enum UserCheckResult: Sendable, Equatable {
        case counted
        case overLimit
        /// Redis had already released this claim's count (it was given up): never counted.
        case released
        /// The call failed before it could reach Redis: nothing was counted by this attempt.
        case notSent(String)
        /// The call timed out or its reply was lost: it may have been counted.
        case unknown(String)
    }

    /// Which cancellation a journal answer is about.
    public enum CancelRef: Sendable, Hashable {
        /// `UNCLAIM`, answered on this ticket.
        case unclaim(Ticket)
        /// A claim whose record became durable after its caller was told UNAVAILABLE.
        case claim(Int)
    }

    /// I/O the shell must carry out, in order.
    public enum Effect: Sendable, Equatable {
        /// Complete a client's reply.
        case answer(Ticket, Answer)
        /// Fetch the voucher's record; answer with ``loaded(_:policy:now:effects:)``.
        case load
        /// Journal `.leaseRequested` (durably, unless durability is `none`), then send the lease;
        /// answer with ``leaseAnswered(_:request:trusted:now:effects:)``.
        case lease(LeaseRequest)
        /// Journal a lease grant durably before anything is served from it; answer with
        /// ``grantRecorded(_:request:ok:now:effects:)``.
        indirect case recordGrant(JournalRecord, LeaseGrant, LeaseRequest)
        /// Renew a lease; answer with ``renewAnswered(_:outcome:sentAt:now:effects:)``.
        case renew(String)
        /// Send a return; answer with ``returnAnswered(_:outcome:now:effects:)``.
        case giveBack(ReturnRequest)
        /// Append a record now, under the voucher's lock: it must precede what follows in the journal.
        case journal(JournalRecord)
        /// Journal a claim's per-user intent durably; answer with ``intentJournaled(seq:ok:now:effects:)``.
        case journalIntent(ClaimEvent, seq: Int)
        /// Check a claim's user in Redis (idempotent by claim id); answer with
        /// ``usersChecked(seqs:results:now:effects:)``, a batch's results at once.
        case checkUser(ClaimEvent, seq: Int, limit: Int)
        /// Record a claim durably; answer with ``claimsRecorded(seqs:ok:now:effects:)`` (and, with
        /// `durability: kafka`, ``claimAcknowledged(seq:now:effects:)`` once Kafka has it).
        case recordClaim(ClaimEvent, seq: Int)
        /// Record in the background (`durability: none`): no answer comes back.
        case recordLater(ClaimEvent)
        /// Remember an answered claim for `UNCLAIM`.
        case remember(ClaimEvent, seq: Int)
        /// Remember an answered claim for `UNCLAIM`, from its parts: a claim that nothing records or
        /// checks (`durability: none`, no journal or Kafka, no per-user limit) builds no ``ClaimEvent``.
        /// Its id is the rules' `idPrefix` and `seq` (``ClaimEvent/claimID(prefix:seq:)``).
        case rememberGranted(GrantedClaim)
        /// Journal a cancellation durably; answer with ``cancelRecorded(_:ok:now:effects:)``.
        case recordCancel(ClaimEvent, CancelRef)
        /// Give a cancellation's pool shares back to the pool (once per claim id), retried until done.
        case restock(ClaimEvent)
        /// Release a per-user count that may have been taken (idempotent by claim id), retried until done.
        /// With `answer`, that ticket is answered `+OK` after the first attempt (`UNCLAIM`: the user may
        /// claim again as soon as the reply comes).
        case releaseUser(ClaimEvent, answer: Ticket?)
        /// An `UNCLAIM` could not be journaled: the claim may be cancelled again later.
        case unclaimFailed(claimID: String)
        /// Call ``tick(now:effects:)`` at this instant (recalled stock may be back in the pool by then).
        case wake(Instant)
    }

    private struct Parked: Sendable {
        var qty: Int
        var user: String
        var req: String?
        var deadline: Instant
        var ticket: Ticket
        var parkedAt: Instant
    }

    private enum Stage: Sendable, Equatable {
        /// Waiting for the per-user intent to be durable.
        case intent
        /// Waiting for the per-user check (`retryAt`: ask again then).
        case checking(retryAt: Instant?)
        /// Waiting for the claim record to be durable.
        case recording
        /// Durable, waiting for Kafka (`durability: kafka`).
        case acking
        /// Durable after its caller was told UNAVAILABLE: its cancellation (with the shares that go to
        /// the pool, decided once) is being journaled.
        case cancelling(toPool: UInt64, retryAt: Instant?)
    }

    private struct InFlight: Sendable {
        var event: ClaimEvent
        var ticket: Ticket
        var deadline: Instant
        var stage: Stage
        /// The user's count in Redis may have been taken for this claim.
        var mayBeCounted = false
        /// Its caller was answered UNAVAILABLE before the claim settled.
        var timedOut = false
        /// Its tokens were taken pinned (in flight), so they must be committed or aborted.
        var pinned = true
    }

    private struct Unclaim: Sendable {
        var event: ClaimEvent
        /// The cancellation as journaled (its time, and the shares that go to the pool).
        var cancel: ClaimEvent
        var pinned: Bool
    }

    private enum Dedupe: Sendable {
        case pending([Ticket])
        case done(Answer, expires: Instant)
        /// Recovered from the journal, not yet acknowledged by Kafka (`durability: kafka`).
        case awaitingAck(claimID: String, expires: Instant)
    }

    /// A `REQ` answer recovered from a previous run's journal.
    public struct RecoveredAnswer: Sendable {
        public var req: String
        public var claimID: String
        public var expires: Instant
        /// Answer it only once Kafka acknowledges it (`UNAVAILABLE` until then).
        public var awaitingAck: Bool
        public init(req: String, claimID: String, expires: Instant, awaitingAck: Bool) {
            self.req = req
            self.claimID = claimID
            self.expires = expires
            self.awaitingAck = awaitingAck
        }
    }

    public let voucher: String
    public var rules: ClaimRules
    public var stock: VoucherStock
    public private(set) var phase: Phase = .loading
    /// 0: the voucher has no per-user limit.
    public private(set) var perUserLimit = 0
    public private(set) var record: VoucherRecordInfo?
    /// A fresh claim sequence number (claim ids are unique per host boot).
    private let nextSeq: @Sendable () -> Int
    /// Wall-clock milliseconds, for event timestamps (never for decisions).
    private let wallClock: @Sendable () -> Int64
    /// A refusal decided outside the voucher (journal or Kafka backlog: fail closed), or nil.
    private let admission: @Sendable () -> QuotaError?
    private var loadWaiters: [(Request, Ticket)] = []
    /// The operator asked for the opening lease (``warm(now:effects:)``).
    private var warmWanted = false
    private var loadStarted = false
    private var parked: [Parked] = []
    private var parkedHead = 0
    private var parkedTokens = 0
    private var inFlight = SeqMap<InFlight>()
    /// Claims in flight by deadline (deadlines grow with time: the front is the oldest).
    private var deadlines: [(Instant, Int)] = []
    private var deadlinesHead = 0
    private var retries = 0
    private var unclaims: [Ticket: Unclaim] = [:]
    /// Tokens each user holds through this host (a lower bound of the global count), by the user id's bytes.
    private var localUsers: [ByteKey: Int] = [:]
    /// `REQ` answers by the request id's bytes. Every entry is charged to `rules.dedupeBudget`.
    private var dedupe: [ByteKey: Dedupe] = [:]
    /// Expiries of answered entries in the order they were answered (expiries grow with it): the
    /// oldest is forgotten first, and only once its window has passed.
    private var dedupeOrder: [(key: ByteKey, expires: Instant)] = []
    private var dedupeOrderHead = 0
    /// The last request of any kind (claims and AVAIL): how long the voucher has been idle.
    public private(set) var lastUse: Instant?
    /// A request of a run was decided while ready: the run's end asks for leases and returns (``endRun(now:effects:)``).
    private var collectOwed = false

    public init(voucher: String, rules: ClaimRules, policy: LeasePolicy, requestPrefix: String,
                nextSeq: @escaping @Sendable () -> Int, wallClock: @escaping @Sendable () -> Int64 = { 0 },
                admission: @escaping @Sendable () -> QuotaError? = { nil }) {
        self.voucher = voucher
        self.rules = rules
        self.stock = VoucherStock(policy: policy, requestPrefix: requestPrefix)
        self.nextSeq = nextSeq
        self.wallClock = wallClock
        self.admission = admission
    }

    // MARK: - Requests

    /// Decide `CLAIM` or `AVAIL`. Returns the answer now, or nil when it comes later on `ticket`.
    public mutating func handle(_ req: Request, ticket: Ticket, now: Instant, effects fx: inout [Effect]) -> Answer? {
        let a = handleInRun(req, ticket: ticket, now: now, effects: &fx)
        endRun(now: now, effects: &fx)
        return a
    }

    /// ``handle(_:ticket:now:effects:)`` for one request of a run decided together (a connection's pipelined
    /// claims, under one taking of the voucher's lock): the leases and returns the run calls for are asked
    /// once, by ``endRun(now:effects:)`` after its last request, not after each (issue 13: that was ~2 % of
    /// `none`'s CPU). Nothing a later request of the run decides depends on it: taking stock fences expired
    /// leases itself, and every effect of the run is carried out after the run anyway. Only the lease asked
    /// may differ: sized after the whole run, it may be asked a little earlier or a little larger (the demand
    /// of the run's claims lands in one rate window), never missed.
    public mutating func handleInRun(_ req: Request, ticket: Ticket, now: Instant, effects fx: inout [Effect]) -> Answer? {
        lastUse = now
        switch phase {
        case .loading:
            return parkForLoad(req, ticket: ticket, &fx)
        case .missing(let until):
            if now < until { return .refused(QuotaError(.novoucher, "no such voucher '\(voucher)'")) }
            phase = .loading
            return parkForLoad(req, ticket: ticket, &fx)
        case .failed(let until):
            if now < until { return .refused(QuotaError(.unavailable, "quota authority unreachable")) }
            phase = .loading
            return parkForLoad(req, ticket: ticket, &fx)
        case .ready:
            collectOwed = true
            return decideReady(req, ticket: ticket, now: now, &fx)
        }
    }

    /// The end of a run of ``handleInRun(_:ticket:now:effects:)``: ask for the leases and returns it calls for.
    public mutating func endRun(now: Instant, effects fx: inout [Effect]) {
        guard collectOwed else { return }
        collectOwed = false
        if phase == .ready { collect(now: now, &fx) }
    }

    private mutating func parkForLoad(_ req: Request, ticket: Ticket, _ fx: inout [Effect]) -> Answer? {
        guard loadWaiters.count < rules.maxWaiting else {
            return .refused(QuotaError(.busy, "too many requests waiting for voucher '\(voucher)'"))
        }
        loadWaiters.append((req, ticket))
        if !loadStarted {
            loadStarted = true
            fx.append(.load)
        }
        return nil
    }

    private mutating func decideReady(_ req: Request, ticket: Ticket, now: Instant, _ fx: inout [Effect]) -> Answer? {
        switch req {
        case .avail:
            return .integer(max(0, stock.poolHint) + stock.available(now: now))
        case .claim(let qty, let user, nil):
            return claim(qty: qty, user: user, req: nil, ticket: ticket, now: now, &fx)
        case .claim(let qty, let user, let req?):
            return claimOnce(qty: qty, user: user, req: req, ticket: ticket, now: now, &fx)
        }
    }

    /// `CLAIM … REQ id`: the same request id gets the same final answer within the dedupe window;
    /// racing retries wait for the first. Transient refusals (UNAVAILABLE, BUSY) are not kept.
    private mutating func claimOnce(qty: Int, user: String, req: String, ticket: Ticket, now: Instant,
                                    _ fx: inout [Effect]) -> Answer? {
        let key = ByteKey(req)
        switch dedupe[key] {
        case .done(let a, let exp) where now < exp:
            return a
        case .awaitingAck(_, let exp) where now < exp:
            return .refused(QuotaError(.unavailable, "the claim made for this request id is not yet acknowledged by Kafka; retry"))
        case .pending(var waiters):
            waiters.append(ticket)
            dedupe[key] = .pending(waiters)
            return nil
        case nil:
            // A request id not known here: it needs room in the table before anything is decided for it.
            guard admitDedupe(key, now: now) else {
                rules.dedupeBudget?.countRefusal()
                stock.countRejection(.busy)
                let b = rules.dedupeBudget
                return .refused(QuotaError(.busy, "REQ table full: \(b?.entries ?? 0) request ids answered within their "
                    + "\(rules.dedupeWindow) window (claims.max_dedupe_entries = \(b?.maxEntries ?? 0), claims.max_dedupe_bytes = "
                    + "\(b?.maxBytes ?? 0)); retry with the same REQ"))
            }
        default:
            // An answer whose window has passed: replaced (its charge is reused).
            break
        }
        dedupe[key] = .pending([])
        let a = claim(qty: qty, user: user, req: req, ticket: ticket, now: now, &fx)
        if let a {
            if Self.isFinal(a) { dedupeDone(key, a, expires: now + rules.dedupeWindow) } else { dedupeRemove(key) }
        }
        return a
    }

    // MARK: - The REQ table

    /// Room for a request id not in the table: charged to the budget (the caller then enters it), after
    /// this voucher's expired answers are forgotten (oldest first) if the budget is full. False: full of
    /// live answers.
    private mutating func admitDedupe(_ key: ByteKey, now: Instant) -> Bool {
        guard let budget = rules.dedupeBudget else { return true }
        let cost = DedupeBudget.cost(key)
        if budget.tryCharge(cost) { return true }
        sweepDedupe(now: now)
        return budget.tryCharge(cost)
    }

    /// Keep `a` for `key` until `expires`.
    private mutating func dedupeDone(_ key: ByteKey, _ a: Answer, expires: Instant) {
        if dedupe.updateValue(.done(a, expires: expires), forKey: key) == nil {
            rules.dedupeBudget?.forceCharge(DedupeBudget.cost(key))
        }
        dedupeOrder.append((key, expires))
    }

    /// Forget `key` (a transient answer, or an expired one) and release its charge.
    private mutating func dedupeRemove(_ key: ByteKey) {
        if dedupe.removeValue(forKey: key) != nil { rules.dedupeBudget?.release(DedupeBudget.cost(key)) }
    }

    /// Forget answers whose window has passed, oldest first. Entries answered again since (a request id
    /// reused after its window) or still pending are kept.
    private mutating func sweepDedupe(now: Instant) {
        while dedupeOrderHead < dedupeOrder.count, dedupeOrder[dedupeOrderHead].expires <= now {
            let key = dedupeOrder[dedupeOrderHead].key
            dedupeOrderHead += 1
            switch dedupe[key] {
            case .done(_, let exp) where exp <= now: dedupeRemove(key)
            case .awaitingAck(_, let exp) where exp <= now: dedupeRemove(key)
            default: break
            }
        }
        if dedupeOrderHead == dedupeOrder.count {
            dedupeOrder.removeAll(keepingCapacity: dedupeOrder.count <= 4096)
            dedupeOrderHead = 0
        } else if dedupeOrderHead > 1024 && dedupeOrderHead * 2 > dedupeOrder.count {
            dedupeOrder.removeFirst(dedupeOrderHead)
            dedupeOrderHead = 0
        }
    }

    /// `REQ` answers kept (answered, waiting for Kafka, or pending).
    public var dedupeCount: Int { dedupe.count }

    static func isFinal(_ a: Answer) -> Bool {
        if case .refused(let e) = a { return e.code != .unavailable && e.code != .busy }
        return true
    }

    /// Answers remembered from the journal of a previous run (claim ids of requests with `REQ`).
    /// They are kept even over the table's bound: forgetting one within its window could grant a second claim.
    public mutating func restoreDedupe(_ entries: [RecoveredAnswer]) {
        for e in entries.sorted(by: { $0.expires < $1.expires }) {
            let key = ByteKey(e.req)
            let value: Dedupe = e.awaitingAck ? .awaitingAck(claimID: e.claimID, expires: e.expires)
                : .done(.claimID(e.claimID), expires: e.expires)
            if dedupe.updateValue(value, forKey: key) == nil { rules.dedupeBudget?.forceCharge(DedupeBudget.cost(key)) }
            dedupeOrder.append((key, e.expires))
        }
    }

    /// Kafka acknowledged the recovered claim of `req`: it answers retries from now on.
    public mutating func acknowledged(req: String) {
        let key = ByteKey(req)
        if case .awaitingAck(let id, let exp) = dedupe[key] { dedupe[key] = .done(.claimID(id), expires: exp) }
    }

    /// Whether a claim's tokens stay pinned until it settles (anything that can still refuse it).
    private var needsFlight: Bool { rules.durability != .none || perUserLimit > 0 }

    private mutating func claim(qty: Int, user: String, req: String?, ticket: Ticket, now: Instant,
                                _ fx: inout [Effect]) -> Answer? {
        if stock.lost == nil, let refusal = admission() {
            stock.countRejection(.unavailable)
            return .refused(refusal)
        }
        switch stock.claim(qty: qty, now: now, inFlight: needsFlight, refusingToGiveBack: userLimitRefusal(user: user, qty: qty)) {
        case .served(let shares):
            return granted(shares, qty: qty, user: user, req: req, ticket: ticket, now: now, &fx)
        case .reject(let e):
            return .refused(e)
        case .wait:
            guard parked.count - parkedHead < rules.maxWaiting else {
                stock.countRejection(.busy)
                return .refused(QuotaError(.busy, "too many claims waiting for stock of '\(voucher)'"))
            }
            parked.append(Parked(qty: qty, user: user, req: req, deadline: now.adding(nanoseconds: rules.claimTimeoutNanoseconds), ticket: ticket,
                                 parkedAt: now))
            stock.counters.claimsWaited += 1
            parkedTokens += qty
            return nil
        }
    }

    /// The refusal of a claim the user's limit refuses as far as this host knows (its count here, claims in
    /// flight included), for the stock to give instead of giving every lease back (which a claim wider than 64
    /// of them makes it do; helper-40: one user's claims could make the host return its stock again and again).
    /// Any other use is left to ``granted``'s check, which sees counts released meanwhile (a claim in flight
    /// that fails). Nil without a per-user limit. (`qty > limit - held`: a huge `qty` must not overflow.)
    @inline(__always)  // called from mutating code: an out-of-line call copies all of `self` first (issue 13)
    private func userLimitRefusal(user: String, qty: Int) -> QuotaError? {
        guard perUserLimit > 0, qty > perUserLimit - localUsers[ByteKey(user), default: 0] else { return nil }
        return Self.userLimitError(perUserLimit)
    }

    private static func userLimitError(_ limit: Int) -> QuotaError {
        QuotaError(.userlimit, "user already holds the voucher's limit of \(limit)")
    }

    /// Tokens were taken from local stock for a claim: check the user's limit if the voucher has one,
    /// then record the claim as the durability mode requires. Returns the answer if it is known now.
    private mutating func granted(_ shares: ClaimShares, qty: Int, user: String, req: String?, ticket: Ticket,
                                  now: Instant, _ fx: inout [Effect]) -> Answer? {
        let seq = nextSeq()
        let limit = perUserLimit
        if limit == 0 && rules.durability == .none && !rules.recordsClaims {
            // Nothing records, checks or pins this claim (its tokens were taken unpinned: `needsFlight` is
            // false): it is answered now and only the UNCLAIM book needs it. The same as `record` below
            // does for it, without an event, its fields' copies and its timestamp (issue 13).
            fx.append(.rememberGranted(GrantedClaim(seq: seq, user: user, qty: qty, shares: shares)))
            return .claimNumber(seq)
        }
        // With a per-user limit the id's text is read several times (the intent record, the user check, the
        // ledger's owed releases): made once here. Without one, kept as its parts and never made (helper-47).
        let event = limit > 0
            ? ClaimEvent(claimID: ClaimEvent.claimID(prefix: rules.idPrefix, seq: seq), voucher: voucher, user: user, qty: qty,
                         region: rules.region, host: rules.host, shares: shares, tsMs: wallClock(), req: req)
            : ClaimEvent(idPrefix: rules.idPrefix, seq: seq, voucher: voucher, user: user, qty: qty,
                         region: rules.region, host: rules.host, shares: shares, tsMs: wallClock(), req: req)
        // The claim timeout applies only to a claim that waits (a durable record, a per-user check): with
        // `durability: none` and no per-user limit it is answered now, and its deadline is never read.
        let waits = rules.durability != .none || limit > 0
        let deadline = waits ? now.adding(nanoseconds: rules.claimTimeoutNanoseconds) : now
        if limit <= 0 {
            // (The event moved into its entry: the copy kept for the per-user branch below was a retain and a
            // release a claim; issue 13. `<= 0` as everywhere a limit is tested: a negative `per_user` read from
            // Redis is no limit; helper-61 found `== 0` refusing every claim of such a voucher.)
            return record(seq: seq, InFlight(event: consume event, ticket: ticket, deadline: deadline, stage: .recording,
                                             pinned: needsFlight), &fx)
        }
        var flight = InFlight(event: event, ticket: ticket, deadline: deadline, stage: .recording, pinned: needsFlight)
        // This host's own count is a lower bound of the user's global count: over it, refuse at once.
        let userKey = ByteKey(user)
        let held = localUsers[userKey, default: 0]
        if held + qty > limit {
            stock.abort(shares, now: now)
            stock.countRejection(.userlimit)
            return .refused(Self.userLimitError(limit))
        }
        // Reserved until the claim settles. The map is bounded: past the bound it only keeps users
        // it already has (the pre-check then misses, and Redis decides).
        if held > 0 || localUsers.count < rules.maxTrackedUsers { localUsers[userKey] = held + qty }
        if rules.perUserMode == .central && rules.injectedBug != "skip-user-check" {
            var intent = event
            if rules.durability == .none {
                if rules.recordsIntents {
                    intent.kind = .intent
                    fx.append(.recordLater(intent))
                }
                flight.stage = .checking(retryAt: nil)
                flight.mayBeCounted = true
                fx.append(.checkUser(event, seq: seq, limit: limit))
            } else {
                intent.kind = .intent
                flight.stage = .intent
                fx.append(.journalIntent(intent, seq: seq))
            }
            track(seq, flight)
            return nil
        }
        return record(seq: seq, consume flight, &fx)
    }

    private mutating func track(_ seq: Int, _ f: consuming InFlight) {
        deadlines.append((f.deadline, seq))
        inFlight[seq] = consume f
    }

    /// Record a claim whose user (if any) is settled: at once with `durability: none` (returns the
    /// answer), else durably (returns nil: ``claimsRecorded(seqs:ok:now:effects:)`` continues).
    /// (`f` is consumed: no `var f = f` copy of it here. With `recorded` taking the entry out of the map this
    /// measured −253 instructions a claim; a DWARF profile still shows outlined copies of `InFlight` in `granted`,
    /// `record` and `claimsRecorded`, one each: left for later; issue 13.)
    private mutating func record(seq: Int, _ f: consuming InFlight, _ fx: inout [Effect]) -> Answer? {
        if rules.durability == .none {
            if f.pinned { stock.commit(f.event.shares) }
            if !inFlight.isEmpty { inFlight.removeValue(forKey: seq) }   // (a lookup of an empty map still hashes)
            if rules.recordsClaims { fx.append(.recordLater(f.event)) }
            fx.append(.remember(f.event, seq: seq))
            return idAnswer(f.event)
        }
        f.stage = .recording
        fx.append(.recordClaim(f.event, seq: seq))
        if inFlight[seq] == nil {
            track(seq, consume f)
        } else {
            inFlight[seq] = f
        }
        return nil
    }

    /// A granted claim's answer: its sequence number when its id is this machine's prefix and that number (every
    /// claim made here: no `String` is made for the id, the reply writes it), else the id's text.
    @inline(__always)  // as `userLimitRefusal`
    private func idAnswer(_ e: ClaimEvent) -> Answer {
        // (Compared in place: `claimNumber` gives a copy of the prefix, a retain and a release; issue 13.)
        if let seq = e.claimNumber(ifPrefix: rules.idPrefix) { return .claimNumber(seq) }
        return .claimID(e.claimID)
    }

    /// Complete `ticket` (and every racing retry with the same request id).
    private mutating func finish(_ ticket: Ticket, req: String?, _ a: Answer, now: Instant, _ fx: inout [Effect]) {
        fx.append(.answer(ticket, a))
        guard let req else { return }
        let key = ByteKey(req)
        if case .pending(let waiters) = dedupe[key] {
            for w in waiters { fx.append(.answer(w, a)) }
        }
        if Self.isFinal(a) { dedupeDone(key, a, expires: now + rules.dedupeWindow) } else { dedupeRemove(key) }
    }

    // MARK: - Claim events

    /// The per-user intent is durable (or could not be written).
    public mutating func intentJournaled(seq: Int, ok: Bool, now: Instant, effects fx: inout [Effect]) {
        guard var f = inFlight[seq], f.stage == .intent else { return }
        if !ok {
            abort(seq, QuotaError(.unavailable, "claim could not be journaled"), now: now, &fx)
        } else if f.timedOut {
            abort(seq, nil, now: now, &fx)
        } else {
            f.stage = .checking(retryAt: nil)
            f.mayBeCounted = true
            inFlight[seq] = f
            fx.append(.checkUser(f.event, seq: seq, limit: perUserLimit))
        }
        settleEffects(now: now, &fx)
    }

    /// Redis answered (or did not answer) the per-user checks of one batch: `results[i]` is `seqs[i]`'s. Each
    /// is taken in turn, then what waits is served and the leases asked for once, after them all (as
    /// ``claimsRecorded(seqs:ok:now:effects:)``): a waiting claim is decided after the whole batch has given
    /// back its tokens and its users' counts.
    public mutating func usersChecked(seqs: [Int], results: [UserCheckResult], now: Instant, effects fx: inout [Effect]) {
        assert(seqs.count == results.count, "one result per check")   // (a missing one: that claim times out)
        for (seq, result) in zip(seqs, results) { userChecked(seq: seq, result, now: now, &fx) }
        settleEffects(now: now, &fx)
    }

    private mutating func userChecked(seq: Int, _ result: UserCheckResult, now: Instant, _ fx: inout [Effect]) {
        guard var f = inFlight[seq], case .checking = f.stage else { return }
        switch result {
        case .counted:
            if f.timedOut {
                abort(seq, nil, now: now, &fx)
            } else if let a = record(seq: seq, f, &fx) {
                finish(f.ticket, req: f.event.req, a, now: now, &fx)
            }
        case .overLimit:
            // The script undid its own count: nothing to release in Redis for this attempt.
            f.mayBeCounted = f.mayBeCounted && f.timedOut
            inFlight[seq] = f
            abort(seq, Self.userLimitError(perUserLimit), now: now, &fx)
        case .released:
            abort(seq, QuotaError(.unavailable, "per-user check ran after the claim was given up"), now: now, &fx)
        case .notSent(let why), .unknown(let why):
            if rules.onUnavailable == .local && !f.timedOut {
                // Decide on this host's record alone (already reserved within the limit): the documented risk.
                if let a = record(seq: seq, f, &fx) { finish(f.ticket, req: f.event.req, a, now: now, &fx) }
            } else if case .unknown = result, now < f.deadline, !f.timedOut {
                // Ask again (idempotent by claim id) rather than leak a count that may have been taken.
                f.stage = .checking(retryAt: now + .milliseconds(50))
                inFlight[seq] = f
                retries += 1
            } else {
                abort(seq, QuotaError(.unavailable, "per-user check unavailable: \(why)"), now: now, &fx)
            }
        }
    }

    /// The claim records of one journal batch are durable (`ok`) or could not be written, each in turn, with
    /// what waits served and the leases asked for once, after them all (issue 13: once per claim was a tenth
    /// of the journal thread's work).
    public mutating func claimsRecorded(seqs: [Int], ok: Bool, now: Instant, effects fx: inout [Effect]) {
        for seq in seqs { recorded(seq: seq, ok: ok, now: now, &fx) }
        settleEffects(now: now, &fx)
    }

    private mutating func recorded(seq: Int, ok: Bool, now: Instant, _ fx: inout [Effect]) {
        // Taken out of the map (moved, not copied: issue 13); every way but a commit puts it back first.
        guard var f = inFlight.removeValue(forKey: seq) else { return }
        guard f.stage == .recording else {
            inFlight[seq] = f
            return
        }
        if !ok {
            inFlight[seq] = f
            abort(seq, QuotaError(.unavailable, "claim could not be made durable: journal write failed"), now: now, &fx)
        } else if f.timedOut {
            // Durable, but its caller was told UNAVAILABLE: cancel it before its tokens serve again.
            if rules.injectedBug == "no-timeout-cancel" {
                inFlight[seq] = f
                abort(seq, nil, now: now, &fx)
            } else {
                startCancel(seq, &f, &fx)   // (puts it back, cancelling)
            }
        } else if rules.durability == .kafka {
            f.stage = .acking
            inFlight[seq] = f
        } else {
            commit(seq, f.event, ticket: f.ticket, now: now, &fx)
        }
    }

    /// Kafka acknowledged the claim record (`durability: kafka`).
    public mutating func claimAcknowledged(seq: Int, now: Instant, effects fx: inout [Effect]) {
        guard let f = inFlight.removeValue(forKey: seq) else { return }
        guard f.stage == .acking, !f.timedOut else {
            inFlight[seq] = f
            return
        }
        commit(seq, f.event, ticket: f.ticket, now: now, &fx)
        settleEffects(now: now, &fx)
    }

    /// A claim taken out of the in-flight map is committed: its tokens are sold, its caller is answered.
    /// (Its event and ticket, not the in-flight entry: a whole entry passed in was copied twice here; issue 13.)
    private mutating func commit(_ seq: Int, _ event: ClaimEvent, ticket: Ticket, now: Instant, _ fx: inout [Effect]) {
        stock.commit(event.shares)
        fx.append(.remember(event, seq: seq))
        finish(ticket, req: event.req, idAnswer(event), now: now, &fx)
    }

    /// A claim in flight ends without being a claim: tokens back to their lease, user released, caller told.
    private mutating func abort(_ seq: Int, _ error: QuotaError?, now: Instant, _ fx: inout [Effect]) {
        guard let f = inFlight.removeValue(forKey: seq) else { return }
        if f.pinned { stock.abort(f.event.shares, now: now) }
        if perUserLimit > 0 { releaseLocal(user: f.event.user, qty: f.event.qty) }
        if f.mayBeCounted { fx.append(.releaseUser(f.event, answer: nil)) }
        if !f.timedOut {
            let e = error ?? QuotaError(.unavailable, "claim did not complete")
            stock.countRejection(e.code)
            finish(f.ticket, req: f.event.req, .refused(e), now: now, &fx)
        }
    }

    /// The mask of shares whose lease this host no longer holds (they can only go to the pool).
    private func sharesNotHeld(_ shares: ClaimShares) -> UInt64 {
        var m: UInt64 = 0
        for (i, s) in shares.enumerated() where !stock.holds(s.leaseId) { m |= 1 << UInt64(i) }
        return m
    }

    private mutating func startCancel(_ seq: Int, _ f: inout InFlight, _ fx: inout [Effect]) {
        // Its tokens are still pinned to their leases (the claim never settled), so they go back there;
        // only a lease Redis said is gone can no longer take them. Decided once, journaled as decided.
        var toPool = sharesNotHeld(f.event.shares)
        if case .cancelling(let decided, _) = f.stage { toPool = decided }
        f.stage = .cancelling(toPool: toPool, retryAt: nil)
        inFlight[seq] = f
        // A count the user's check may have taken is released after the cancellation (``abort``); owed in the
        // journal with it, as an `UNCLAIM`'s is, so that a crash before Redis has it does not keep the count
        // taken for good (helper-43: the claim's record had already resolved its intent).
        if f.mayBeCounted { fx.append(.journal(.releaseOwed(voucher: voucher, user: f.event.user, claimID: f.event.claimID))) }
        fx.append(.recordCancel(f.event.cancellation(tsMs: wallClock(), toPool: toPool), .claim(seq)))
    }

    /// A cancellation record is durable (`ok`) or could not be written.
    public mutating func cancelRecorded(_ ref: CancelRef, ok: Bool, now: Instant, effects fx: inout [Effect]) {
        switch ref {
        case .claim(let seq):
            guard var f = inFlight[seq], case .cancelling(let toPool, _) = f.stage else { return }
            if ok {
                // Pool shares (a lease Redis said is gone) are restocked by claim id, if Redis still takes them.
                abort(seq, nil, now: now, &fx)
                if toPool != 0 { fx.append(.restock(f.event.cancellation(tsMs: wallClock(), toPool: toPool))) }
            } else {
                // Keep trying: the claim is durable, and its caller was told it failed.
                f.stage = .cancelling(toPool: toPool, retryAt: now + .milliseconds(200))
                inFlight[seq] = f
                retries += 1
            }
        case .unclaim(let ticket):
            guard let u = unclaims.removeValue(forKey: ticket) else { return }
            if u.pinned { stock.cancelled(u.event.shares, toPool: u.cancel.toPool, applied: ok, now: now) }
            if ok {
                if perUserLimit > 0 { releaseLocal(user: u.event.user, qty: u.event.qty) }
                // The restock carries the cancellation's own time (the horizon is measured from it).
                if u.cancel.toPool != 0 { fx.append(.restock(u.cancel)) }
                if releasesOnUnclaim {
                    fx.append(.releaseUser(u.event, answer: ticket))
                } else {
                    fx.append(.answer(ticket, .ok))
                }
            } else {
                fx.append(.unclaimFailed(claimID: u.event.claimID))
                fx.append(.answer(ticket, .refused(QuotaError(.unavailable, "cancellation could not be journaled"))))
            }
        }
        settleEffects(now: now, &fx)
    }

    /// `UNCLAIM` of a claim made through this host (taken from the book by the caller). Shares whose
    /// lease is still held here go back to it; the others go to the pool. Answered on `ticket`.
    public mutating func unclaim(_ e: ClaimEvent, ticket: Ticket, tsMs: Int64, effects fx: inout [Effect]) {
        let pinned = phase == .ready
        let all: UInt64 = e.shares.count >= 64 ? .max : (1 << UInt64(e.shares.count)) - 1
        let toPool = pinned ? stock.pinForCancel(e.shares) : all
        let cancel = e.cancellation(tsMs: tsMs, toPool: toPool)
        unclaims[ticket] = Unclaim(event: e, cancel: cancel, pinned: pinned)
        if releasesOnUnclaim {
            // Owed until Redis has it: journaled with the cancellation, so a crash cannot forget it.
            fx.append(.journal(.releaseOwed(voucher: voucher, user: e.user, claimID: e.claimID)))
        }
        fx.append(.recordCancel(cancel, .unclaim(ticket)))
    }

    /// Whether a cancellation releases the user's count in Redis (a voucher not loaded yet may have a limit).
    private var releasesOnUnclaim: Bool { rules.perUserMode == .central && (perUserLimit > 0 || phase != .ready) }

    /// This host's record of `user` goes down by `qty`; gone at zero.
    private mutating func releaseLocal(user: String, qty: Int) {
        let key = ByteKey(user)
        guard let held = localUsers[key] else { return }
        if held - qty <= 0 { localUsers.removeValue(forKey: key) } else { localUsers[key] = held - qty }
    }

    /// After any change: serve what waits, ask for leases and returns.
    private mutating func settleEffects(now: Instant, _ fx: inout [Effect]) {
        guard phase == .ready else { return }
        serveParked(now: now, &fx)
        stock.sweepTail(waiting: parkedTokens, now: now)
        collect(now: now, &fx)
    }

    // MARK: - Parked claims

    /// Serve or refuse parked claims, in order, after the stock changed.
    private mutating func serveParked(now: Instant, _ fx: inout [Effect]) {
        while parkedHead < parked.count {
            let w = parked[parkedHead]
            let answer: Answer
            if w.deadline <= now {
                stock.countRejection(.unavailable)
                answer = .refused(QuotaError(.unavailable, "no lease arrived within the claim timeout"))
            } else if stock.tail, stock.heldElsewhere > 0, now - w.parkedAt >= rules.tailWait,
                stock.available(now: now) < w.qty
            {
                stock.countRejection(.unavailable)
                answer = .refused(QuotaError(
                    .unavailable, "the region's last tokens are on \(stock.heldElsewhere) leases being recalled; "
                        + "retry (with the same REQ)"))
            } else if stock.lost == nil, let refusal = admission() {
                stock.countRejection(.unavailable)
                answer = .refused(refusal)
            } else {
                switch stock.retryParked(qty: w.qty, now: now, inFlight: needsFlight,
                                         refusingToGiveBack: userLimitRefusal(user: w.user, qty: w.qty)) {
                case .served(let shares):
                    popParked()
                    if let a = granted(shares, qty: w.qty, user: w.user, req: w.req, ticket: w.ticket, now: now, &fx) {
                        finish(w.ticket, req: w.req, a, now: now, &fx)
                    }
                    continue
                case .reject(let e): answer = .refused(e)
                case .wait: return
                }
            }
            popParked()
            finish(w.ticket, req: w.req, answer, now: now, &fx)
        }
    }

    private mutating func popParked() {
        parkedTokens -= parked[parkedHead].qty
        parkedHead += 1
        if parkedHead == parked.count {
            parked.removeAll(keepingCapacity: true)
            parkedHead = 0
        } else if parkedHead > 1024 && parkedHead * 2 > parked.count {
            parked.removeFirst(parkedHead)
            parkedHead = 0
        }
    }

    private mutating func failParked(_ e: QuotaError, now: Instant, _ fx: inout [Effect]) {
        while parkedHead < parked.count {
            let w = parked[parkedHead]
            popParked()
            stock.countRejection(e.code)
            finish(w.ticket, req: w.req, .refused(e), now: now, &fx)
        }
    }

    private mutating func collect(now: Instant, _ fx: inout [Effect]) {
        if let l = stock.nextLease(now: now, waiting: parkedTokens) { fx.append(.lease(l)) }
        stock.closeFinished(now: now)
        for r in stock.takeReturns() { fx.append(.giveBack(r)) }
    }

    // MARK: - Load, leases, returns

    /// The voucher's record from Redis (nil: unknown), or a failure to fetch it.
    public mutating func loaded(_ result: Result<VoucherRecordInfo?, QuotaError>, policy: LeasePolicy, now: Instant,
                                effects fx: inout [Effect]) {
        loadStarted = false
        let waiters = loadWaiters
        loadWaiters.removeAll()
        switch result {
        case .success(let rec?):
            apply(rec, policy: policy, now: now)
            phase = .ready
            // Decide the requests that waited for the load, in arrival order.
            for (req, t) in waiters {
                guard let a = decideReady(req, ticket: t, now: now, &fx) else { continue }
                if case .claim(_, _, let r?) = req, case .pending = dedupe[ByteKey(r)] {
                    finish(t, req: r, a, now: now, &fx)
                } else {
                    fx.append(.answer(t, a))
                }
            }
            collect(now: now, &fx)
        case .success(nil):
            phase = .missing(until: now + .seconds(1))
            for (_, t) in waiters { fx.append(.answer(t, .refused(QuotaError(.novoucher, "no such voucher '\(voucher)'")))) }
        case .failure(let e):
            phase = .failed(until: now + .milliseconds(250))
            for (_, t) in waiters { fx.append(.answer(t, .refused(e))) }
        }
    }

    private mutating func apply(_ rec: VoucherRecordInfo, policy: LeasePolicy, now: Instant) {
        record = rec
        perUserLimit = rec.perUser
        stock.policy = policy
        stock.setStatus(rec.status)
        stock.refreshed(pool: rec.pool)
        stock.setSchedule(rec.schedule, now: now)
        // A voucher seen here before its sale opens (or one the operator warms) takes its opening lease.
        let beforeOpening = rec.schedule.opensAt.map { now < $0 } ?? false
        if (beforeOpening || warmWanted) && rec.opening > 0 && !stock.warm { stock.prepareOpening(rec.opening) }
    }

    /// Fresh metadata from the periodic refresh.
    public mutating func refreshed(_ rec: VoucherRecordInfo, policy: LeasePolicy, now: Instant, effects fx: inout [Effect]) {
        guard phase == .ready else { return }
        let recalledAgain = (record.map { rec.recallMs > $0.recallMs } ?? false) && rec.recallHost != rules.host
        apply(rec, policy: policy, now: now)
        // Another host found the pool empty while leases were out (a recall this host may have missed):
        // give back what no claim here waits for, so the last tokens are not stranded here.
        if recalledAgain { stock.recall(now: now, waiting: parkedTokens, keepForParked: keepsForParked(against: rec.recallHost)) }
        settleEffects(now: now, &fx)
    }

    /// This host's restock of a cancelled claim put `tokens` back into the pool (``VoucherStock/poolRestocked(_:)``).
    public mutating func restocked(tokens: Int, now: Instant, effects fx: inout [Effect]) {
        guard phase == .ready else { return }
        stock.poolRestocked(tokens)
        settleEffects(now: now, &fx)
    }

    /// Another host asked for this voucher's stock back (it found the pool empty while leases were out).
    public mutating func recall(now: Instant, from host: String? = nil, effects fx: inout [Effect]) {
        guard phase == .ready else { return }
        stock.recall(now: now, waiting: parkedTokens, keepForParked: keepsForParked(against: host))
        settleEffects(now: now, &fx)
    }

    /// Whether stock that parked claims here wait for is kept when `host` recalls it: a fixed order of
    /// host ids decides, so two hosts each holding part of what both need never keep it for each other.
    /// An unknown recaller (an older sidecar's message, a refresh without `recall_host`) does not take it.
    private func keepsForParked(against host: String?) -> Bool {
        guard let host, !host.isEmpty else { return true }
        return rules.host < host
    }

    /// The operator listed this voucher to warm (`quotactl voucher warm`): load it if needed, then take
    /// its opening lease (in the warm-up window of a scheduled sale, at once otherwise).
    public mutating func warm(now: Instant, effects fx: inout [Effect]) {
        guard !warmWanted else { return }
        warmWanted = true
        switch phase {
        case .ready:
            if let r = record, r.opening > 0, !stock.warm { stock.prepareOpening(r.opening) }
            collect(now: now, &fx)
        case .loading, .missing, .failed:
            if !loadStarted {
                loadStarted = true
                phase = .loading
                fx.append(.load)
            }
        }
    }

    /// Redis no longer holds this voucher as this host knew it: fail closed for good on this host.
    public mutating func authorityLost(_ reason: String, now: Instant, effects fx: inout [Effect]) {
        stock.loseAuthority(reason)
        failParked(QuotaError(.unavailable, reason), now: now, &fx)
    }

    public enum LeaseAnswer: Sendable, Equatable {
        case granted(LeaseGrant)
        case refused(LeaseRefusal)
        /// No lease: it could not be sent (`outcomeUnknown` false) or no reply came (it may have been granted).
        case failed(String, outcomeUnknown: Bool)
    }

    /// Redis answered a lease request (or did not). `trusted`: served counts journaled from now on are exact.
    public mutating func leaseAnswered(_ answer: LeaseAnswer, request: LeaseRequest, trusted: Bool, now: Instant,
                                       effects fx: inout [Effect]) {
        switch answer {
        case .granted(let g):
            for c in request.close { fx.append(.journal(.leaseClosed(closeRecord(c)))) }
            if g.granted > 0 {
                let record = JournalRecord.leaseGranted(LeaseGrantRecord(
                    voucher: voucher, lease: g.id, granted: g.granted, req: request.req, region: rules.region,
                    host: rules.host, durability: trusted ? rules.durability.rawValue : Durability.none.rawValue,
                    tsMs: wallClock()))
                if rules.durability != .none {
                    // Nothing is served from it until its grant is on disk: a claim of a lease the journal
                    // does not hold could not be accounted for after a crash. (The request stays in flight.)
                    fx.append(.recordGrant(record, g, request))
                    return
                }
                fx.append(.journal(record))
            } else {
                fx.append(.journal(.leaseAnswered(voucher: voucher, req: request.req)))
            }
            stock.leaseGranted(g, sentAt: request.sentAt, now: now)
        case .refused(let r):
            for c in request.close { fx.append(.journal(.leaseClosed(closeRecord(c)))) }
            fx.append(.journal(.leaseAnswered(voucher: voucher, req: request.req)))
            stock.leaseRefused(r, now: now)
            if let at = stock.recallPollAt { fx.append(.wake(at)) }
        case .failed(_, let unknown):
            stock.leaseFailed(now: now, request: request, outcomeUnknown: unknown)
        }
        settleEffects(now: now, &fx)
    }

    /// The grant record of a lease is durable (`ok`), or could not be written: then the lease is given
    /// back in full at once (nothing was served from it), and if that return is lost too, recovery
    /// resolves the request id it was granted to.
    public mutating func grantRecorded(_ g: LeaseGrant, request: LeaseRequest, ok: Bool, now: Instant,
                                       effects fx: inout [Effect]) {
        if ok {
            stock.leaseGranted(g, sentAt: request.sentAt, now: now)
        } else {
            stock.leaseGrantedUnusable(g)
        }
        settleEffects(now: now, &fx)
    }

    private func closeRecord(_ c: ReturnRequest) -> LeaseClose {
        LeaseClose(voucher: voucher, lease: c.leaseId, region: rules.region, host: rules.host, granted: c.granted,
                   served: c.served, returned: c.returnedTotal, tsMs: wallClock())
    }

    public enum ReturnOutcome: Sendable, Equatable {
        /// Redis applied it (`applied` tokens went back now).
        case applied(Int)
        /// The lease is already closed or was reclaimed: nothing changes, and it is done.
        case gone
        case failed(String)
    }

    /// Redis answered a return (or did not).
    public mutating func returnAnswered(_ r: ReturnRequest, outcome: ReturnOutcome, now: Instant,
                                        effects fx: inout [Effect]) {
        switch outcome {
        case .applied(let n):
            stock.returned(r, applied: n)
            if r.close { fx.append(.journal(.leaseClosed(closeRecord(r)))) }
        case .gone:
            stock.returnGone(r)
            fx.append(.journal(.leaseClosed(closeRecord(r))))
        case .failed:
            stock.returnFailed(r)
        }
    }

    /// Redis answered a renewal (nil: it failed).
    public mutating func renewAnswered(_ lease: String, outcome: RenewOutcome?, sentAt: Instant, now: Instant,
                                       effects fx: inout [Effect]) {
        guard let outcome else {
            stock.renewFailed(lease)
            return
        }
        if let gone = stock.renewed(lease, outcome: outcome, sentAt: sentAt, now: now) {
            // Closed or reclaimed at Redis: this host's record of it ends here, nothing returned.
            fx.append(.journal(.leaseClosed(LeaseClose(voucher: voucher, lease: gone.id, region: rules.region,
                                                       host: rules.host, granted: gone.granted,
                                                       served: gone.served - gone.pending, returned: 0,
                                                       tsMs: wallClock(), gone: true))))
        }
        collect(now: now, &fx)
    }

    // MARK: - Periodic work

    /// Fencing, renewals, idle returns, parked and in-flight timeouts, retries.
    public mutating func tick(now: Instant, effects fx: inout [Effect]) {
        sweepDedupe(now: now)
        guard phase == .ready else { return }
        stock.fence(now: now)
        expireInFlight(now: now, &fx)
        serveParked(now: now, &fx)
        stock.sweepTail(waiting: parkedTokens, now: now)
        for id in stock.renewals(now: now) { fx.append(.renew(id)) }
        stock.returnIfIdle(now: now)
        collect(now: now, &fx)
    }

    /// Whether this voucher's state here can be dropped (and built again from Redis on the next request)
    /// without losing anything: nothing held or owed (no lease, return, lease request, claim in flight,
    /// parked or waiting for the load, no cancellation in flight), no `REQ` answer within its window,
    /// not failing closed, and unused for `lease.idle_return_seconds` (by then its stock went back as
    /// idle); an unknown voucher (`missing`) at once, a failed load once its retry pause is over. A scheduled
    /// voucher before its opening is kept (it takes its opening lease in the warm-up window), and so is one
    /// the operator warms (`quotactl voucher warm`).
    public func isEvictable(now: Instant) -> Bool {
        guard stock.isSettled, stock.lost == nil, inFlight.isEmpty, unclaims.isEmpty, parkedHead == parked.count,
            loadWaiters.isEmpty, !loadStarted, dedupe.isEmpty
        else { return false }
        switch phase {
        case .loading: return false
        case .missing: return true
        case .failed(let until): return now >= until
        case .ready:
            // Warmed by the operator (the region's warm list, read at every heartbeat): kept, or the next
            // heartbeat would build it again and take another opening lease.
            if warmWanted { return false }
            if let opens = stock.schedule.opensAt, now < opens { return false }
            return lastUse.map { now - $0 >= stock.policy.idleReturn } ?? true
        }
    }

    /// Claims in flight past their deadline are answered UNAVAILABLE; their I/O still settles them.
    private mutating func expireInFlight(now: Instant, _ fx: inout [Effect]) {
        while deadlinesHead < deadlines.count, deadlines[deadlinesHead].0 <= now {
            let seq = deadlines[deadlinesHead].1
            deadlinesHead += 1
            guard var f = inFlight[seq], !f.timedOut else { continue }
            f.timedOut = true
            inFlight[seq] = f
            stock.countRejection(.unavailable)
            finish(f.ticket, req: f.event.req, .refused(QuotaError(.unavailable, "claim not settled within the claim timeout")),
                   now: now, &fx)
            if f.stage == .acking {
                if rules.injectedBug == "no-timeout-cancel" { abort(seq, nil, now: now, &fx) } else { startCancel(seq, &f, &fx) }
            }
        }
        if deadlinesHead > 0 && deadlinesHead * 2 >= deadlines.count {
            deadlines.removeFirst(deadlinesHead)
            deadlinesHead = 0
        }
        // Retries that are due: per-user checks whose outcome was unknown, cancellations not yet written.
        guard retries > 0 else { return }
        retries = 0
        for (seq, var f) in inFlight {
            switch f.stage {
            case .checking(let at?):
                if at > now {
                    retries += 1
                } else if f.timedOut {
                    abort(seq, nil, now: now, &fx)
                } else {
                    f.stage = .checking(retryAt: nil)
                    inFlight[seq] = f
                    fx.append(.checkUser(f.event, seq: seq, limit: perUserLimit))
                }
            case .cancelling(_, let at?):
                if at > now { retries += 1 } else { startCancel(seq, &f, &fx) }
            default:
                break
            }
        }
    }

    // MARK: - Drain

    /// Stop claiming for good and give everything back.
    public mutating func drain(now: Instant, effects fx: inout [Effect]) {
        stock.drain()
        failParked(QuotaError(.unavailable, "draining: this host no longer serves claims"), now: now, &fx)
        for (_, t) in loadWaiters {
            fx.append(.answer(t, .refused(QuotaError(.unavailable, "draining: this host no longer serves claims"))))
        }
        loadWaiters.removeAll()
        collect(now: now, &fx)
    }

    /// Retry returns that failed (Redis down) during drain or shutdown.
    public mutating func retryReturns(now: Instant, effects fx: inout [Effect]) {
        collect(now: now, &fx)
    }

    /// Nothing held, nothing to give back, nothing in flight.
    public var isSettled: Bool { stock.isSettled && inFlight.isEmpty && unclaims.isEmpty }

    // MARK: - Stats

    public var parkedCount: Int { parked.count - parkedHead }
    public var inFlightCount: Int { inFlight.count }
}

/// What the claim lifecycle needs of a voucher's record in Redis.
public struct VoucherRecordInfo: Sendable, Equatable {
    public var status: VoucherStatus
    public var pool: Int
    public var perUser: Int
    /// When a host last found the pool empty while leases were out (Redis ms), or 0.
    public var recallMs: Int
    /// The host that recalled at `recallMs` (a host ignores its own recalls).
    public var recallHost: String
    /// The sale's schedule, placed on this host's clock.
    public var schedule: SaleSchedule
    /// Tokens of this host's opening lease before a scheduled opening (0: none).
    public var opening: Int
    public init(status: VoucherStatus, pool: Int, perUser: Int, recallMs: Int = 0, recallHost: String = "",
                schedule: SaleSchedule = SaleSchedule(), opening: Int = 0) {
        self.status = status
        self.pool = pool
        self.perUser = perUser
        self.recallMs = recallMs
        self.recallHost = recallHost
        self.schedule = schedule
        self.opening = opening
    }
}
