import Glibc
import Logging
import NIOConcurrencyHelpers
import NIOCore
import QuotaCore
import QuotaRedis

/// One voucher on this host: the ``VoucherStock`` value behind a lock, the claims parked
/// waiting for a lease, and the I/O that the stock asks for.
///
/// The claim path takes the lock, decides, and releases it; it never holds the lock
/// across I/O and never completes a promise while holding it.
final class VoucherRuntime: @unchecked Sendable {
    let id: String
    private unowned let engine: SidecarEngine
    private let lock = NIOLock()

    enum Phase {
        /// Metadata is being fetched from Redis.
        case loading
        /// Redis does not know the voucher: NOVOUCHER until `until`.
        case missing(until: Instant)
        /// Redis could not be reached for the metadata: UNAVAILABLE until `until`.
        case failed(until: Instant)
        case ready
    }

    enum Request: Sendable {
        case claim(qty: Int, user: String, req: String?)
        case avail
    }

    private struct Parked {
        var qty: Int
        var user: String
        var req: String?
        var deadline: Instant
        var promise: EventLoopPromise<Reply>
    }

    // Guarded by `lock`.
    private var phase: Phase = .loading
    private var stock: VoucherStock
    private var parked = CircularBuffer<Parked>()
    private var parkedTokens = 0
    private var loadWaiters: [(Request, EventLoopPromise<Reply>)] = []
    private var record: VoucherRecord?
    private var ioInFlight = 0
    /// Tokens each user holds through this host (a lower bound of the global count).
    private var localUsers: [String: Int] = [:]
    /// `REQ` answers: pending (in progress) or final, until they expire.
    private enum Dedupe {
        case pending(EventLoopFuture<Reply>)
        case done(Reply, expires: Instant)
    }
    private var dedupe: [String: Dedupe] = [:]
    private var lastDedupeSweep = Instant(nanoseconds: 0)

    /// What to do after the lock is released.
    private struct Actions {
        var lease: LeaseRequest?
        var renew: [String] = []
        var returns: [ReturnRequest] = []
        var load = false
        var completions: [(EventLoopPromise<Reply>, Reply)] = []
        var cascades: [(EventLoopFuture<Reply>, EventLoopPromise<Reply>)] = []
        var userChecks: [(ClaimEvent, Int, Int, EventLoopPromise<Reply>)] = []
    }

    init(id: String, engine: SidecarEngine, policy: LeasePolicy) {
        self.id = id
        self.engine = engine
        self.stock = VoucherStock(policy: policy)
    }

    // MARK: - Requests (event loop threads)

    func handle(_ req: Request, now: Instant, loop: any EventLoop) -> Outcome {
        var a = Actions()
        let outcome: Outcome
        lock.lock()
        switch phase {
        case .loading:
            outcome = parkForLoad(req, loop: loop, &a)
        case .missing(let until):
            if now < until {
                engine.countRejection(.novoucher)
                outcome = .now(.error(QuotaError(.novoucher, "no such voucher '\(id)'")))
            } else {
                phase = .loading
                a.load = true
                outcome = parkForLoad(req, loop: loop, &a)
            }
        case .failed(let until):
            if now < until {
                engine.countRejection(.unavailable)
                outcome = .now(.error(QuotaError(.unavailable, "quota authority unreachable")))
            } else {
                phase = .loading
                a.load = true
                outcome = parkForLoad(req, loop: loop, &a)
            }
        case .ready:
            outcome = decideReady(req, now: now, loop: loop, &a)
        }
        lock.unlock()
        perform(a)
        return outcome
    }

    private func decideReady(_ req: Request, now: Instant, loop: any EventLoop, _ a: inout Actions) -> Outcome {
        switch req {
        case .avail:
            return .now(.value(.integer(max(0, stock.poolHint) + stock.available(now: now))))
        case .claim(let qty, let user, nil):
            return claimReady(qty: qty, user: user, req: nil, now: now, loop: loop, &a)
        case .claim(let qty, let user, let req?):
            return claimOnce(qty: qty, user: user, req: req, now: now, loop: loop, &a)
        }
    }

    private func parkForLoad(_ req: Request, loop: any EventLoop, _ a: inout Actions) -> Outcome {
        guard loadWaiters.count < engine.config.limits.maxWaitingClaims else {
            return .now(.error(QuotaError(.busy, "too many requests waiting for voucher '\(id)'")))
        }
        let p = loop.makePromise(of: Reply.self)
        loadWaiters.append((req, p))
        return .later(p.futureResult)
    }

    /// `CLAIM … REQ id`: the same request id gets the same final answer within the dedupe window;
    /// racing retries wait for the first. Transient refusals (UNAVAILABLE, BUSY) are not kept.
    private func claimOnce(qty: Int, user: String, req: String, now: Instant, loop: any EventLoop,
                           _ a: inout Actions) -> Outcome {
        switch dedupe[req] {
        case .done(let r, let exp) where now < exp:
            return .now(r)
        case .pending(let f):
            return .later(f.hop(to: loop))
        default:
            break
        }
        let outcome = claimReady(qty: qty, user: user, req: req, now: now, loop: loop, &a)
        let window = engine.config.claims.dedupeWindow
        switch outcome {
        case .now(let r):
            if Self.isFinal(r) { dedupe[req] = .done(r, expires: now + window) } else { dedupe.removeValue(forKey: req) }
        case .later(let f):
            dedupe[req] = .pending(f)
            f.whenSuccess { [self] r in
                lock.withLock {
                    if Self.isFinal(r) {
                        dedupe[req] = .done(r, expires: monotonicNow() + window)
                    } else {
                        dedupe.removeValue(forKey: req)
                    }
                }
            }
        }
        return outcome
    }

    static func isFinal(_ r: Reply) -> Bool {
        switch r {
        case .claimID, .value: return true
        case .error(let e): return e.code != .unavailable && e.code != .busy
        }
    }

    /// Answers remembered from the journal of a previous run (claim ids of requests with `REQ`).
    func restoreDedupe(_ entries: [(req: String, claimID: String, expires: Instant)]) {
        lock.withLock {
            for e in entries { dedupe[e.req] = .done(.claimID(e.claimID), expires: e.expires) }
        }
    }

    private func claimReady(qty: Int, user: String, req: String?, now: Instant, loop: any EventLoop,
                            _ a: inout Actions) -> Outcome {
        if let refusal = engine.pipeline.refusal() {
            stock.countRejection(.unavailable)
            return .now(.error(refusal))
        }
        let outcome: Outcome
        switch stock.claim(qty: qty, now: now) {
        case .served(let shares):
            outcome = granted(shares, qty: qty, user: user, req: req, loop: loop, promise: nil, &a)
        case .reject(let e):
            outcome = .now(.error(e))
        case .wait:
            if parked.count >= engine.config.limits.maxWaitingClaims {
                stock.countRejection(.busy)
                outcome = .now(.error(QuotaError(.busy, "too many claims waiting for stock of '\(id)'")))
            } else {
                let p = loop.makePromise(of: Reply.self)
                parked.append(Parked(qty: qty, user: user, req: req, deadline: now + engine.config.limits.claimTimeout,
                                     promise: p))
                parkedTokens += qty
                outcome = .later(p.futureResult)
            }
        }
        collect(now: now, &a)
        return outcome
    }

    /// A claim was granted from local stock: check the user's limit if the voucher has one, then
    /// record it as the durability mode requires, then answer. Called under the lock.
    private func granted(_ shares: [ClaimShare], qty: Int, user: String, req: String?, loop: any EventLoop,
                         promise: EventLoopPromise<Reply>?, _ a: inout Actions) -> Outcome {
        let (claimID, seq) = engine.nextClaimID()
        let event = ClaimEvent(claimID: claimID, voucher: self.id, user: user, qty: qty,
                               region: engine.config.region, host: engine.config.hostID, shares: shares,
                               tsMs: wallClockMs(), req: req)
        let limit = record?.perUser ?? 0
        guard limit > 0 else { return recordClaim(event, seq: seq, loop: loop, promise: promise, &a) }
        // This host's own count is a lower bound of the user's global count: over it, refuse at once.
        let held = localUsers[user, default: 0]
        if held + qty > limit {
            takeBack(shares, claimID: event.claimID, code: .userlimit)
            let r = Reply.error(QuotaError(.userlimit, "user already holds the voucher's limit of \(limit)"))
            if let promise { a.completions.append((promise, r)) }
            return .now(r)
        }
        // Reserved until the check answers. The map is bounded: past `claims.max_tracked` users it only
        // keeps users it already has (the pre-check then misses, and Redis decides).
        if held > 0 || localUsers.count < engine.config.claims.maxTracked { localUsers[user] = held + qty }
        if engine.config.perUser.mode == .local {
            return recordClaim(event, seq: seq, loop: loop, promise: promise, &a)
        }
        let p = promise ?? loop.makePromise(of: Reply.self)
        a.userChecks.append((event, seq, limit, p))
        return .later(p.futureResult)
    }

    /// Journal the intent (durable unless `none`), then ask Redis; `userChecked` continues.
    private func startUserCheck(_ event: ClaimEvent, seq: Int, limit: Int, promise: EventLoopPromise<Reply>) {
        let check = QuotaStore.UserCheck(
            voucher: id, group: QuotaStore.userGroup(user: event.user, groups: engine.config.perUser.groups),
            limit: limit, user: event.user, qty: event.qty, claimID: event.claimID)
        let batcher = engine.userChecks
        let loop = promise.futureResult.eventLoop
        let ask: @Sendable () -> Void = { [self] in
            batcher.submit(check, on: loop) { r in self.userChecked(event, seq: seq, result: r, promise: promise) }
        }
        var intent = event
        intent.kind = .intent
        if engine.pipeline.durability == .none || engine.pipeline.journal == nil {
            engine.pipeline.journal?.append(.claim(intent))
            ask()
        } else {
            engine.pipeline.journal!.append(.claim(intent)) { [self] r in
                if case .failure = r {
                    self.userChecked(event, seq: seq, result: .failure(.unreachable("journal")), promise: promise)
                } else {
                    ask()
                }
            }
        }
    }

    private func userChecked(_ event: ClaimEvent, seq: Int, result: Result<Bool, RedisError>,
                             promise: EventLoopPromise<Reply>) {
        var a = Actions()
        lock.lock()
        let counted: Bool
        var refusal: QuotaError?
        switch result {
        case .success(true):
            counted = true
        case .success(false):
            counted = false
            refusal = QuotaError(.userlimit, "user already holds the voucher's limit of \(record?.perUser ?? 0)")
        case .failure(let e):
            // This host's count (already reserved) is within the limit, or the claim was refused locally.
            counted = engine.config.perUser.onUnavailable == .local
            if !counted { refusal = QuotaError(.unavailable, "per-user check unavailable: \(e)") }
        }
        if counted {
            _ = recordClaim(event, seq: seq, loop: promise.futureResult.eventLoop, promise: promise, &a)
        } else {
            releaseLocal(user: event.user, qty: event.qty)
            takeBack(event.shares, claimID: event.claimID, code: refusal!.code)
            a.completions.append((promise, .error(refusal!)))
        }
        lock.unlock()
        perform(a)
    }

    /// Record a claim as the durability mode requires. `promise` (parked or checked claims) is completed;
    /// otherwise the outcome is returned.
    private func recordClaim(_ event: ClaimEvent, seq: Int, loop: any EventLoop, promise: EventLoopPromise<Reply>?,
                             _ a: inout Actions) -> Outcome {
        let id = event.claimID
        let pipeline = engine.pipeline
        let book = engine.claimBook
        if pipeline.durability == .none {
            _ = pipeline.recordClaim(event) { _ in }
            book.add(event, seq: seq)
            if let promise { a.completions.append((promise, .claimID(id))) }
            return .now(.claimID(id))
        }
        let p = promise ?? loop.makePromise(of: Reply.self)
        let once = ReplyOnce(p)
        let shares = event.shares
        _ = pipeline.recordClaim(event) { [self] ok in
            if ok {
                book.add(event, seq: seq)
                once.complete(.claimID(id))
            } else if once.complete(.error(QuotaError(.unavailable, "claim could not be made durable: \(pipeline.refusal()?.message ?? "journal write failed")"))) {
                self.putBack(shares, claimID: id, user: event.user, code: .unavailable)
            }
        }
        if pipeline.durability == .kafka {
            loop.scheduleTask(in: .nanoseconds(engine.config.limits.claimTimeout.nanosecondsClamped)) { [self] in
                if once.complete(.error(QuotaError(.unavailable, "Kafka did not acknowledge the claim in time"))) {
                    // The record may still ship: journal its cancellation so the stream nets to zero.
                    pipeline.recordCancellation(event)
                    self.putBack(shares, claimID: id, user: event.user, code: .unavailable)
                    if (record?.perUser ?? 0) > 0 { engine.releaseUser(event) }
                }
            }
        }
        return .later(p.futureResult)
    }

    /// Tokens of a claim that was not completed go back to local stock (under the lock); what its
    /// lease can no longer take (closed or fenced meanwhile) goes back to the pool.
    private func takeBack(_ shares: [ClaimShare], claimID: String, code: QuotaErrorCode) {
        let n = stock.putBack(shares, now: monotonicNow())
        let rest = shares.reduce(0) { $0 + $1.tokens } - n
        if rest > 0 { engine.restock(voucher: id, claimID: claimID, qty: rest) }
        stock.counters.claimsOK -= 1
        stock.countRejection(code)
    }

    /// Tokens of a claim that was not made durable go back to local stock.
    private func putBack(_ shares: [ClaimShare], claimID: String, user: String, code: QuotaErrorCode) {
        lock.withLock {
            takeBack(shares, claimID: claimID, code: code)
            if (record?.perUser ?? 0) > 0 { releaseLocal(user: user, qty: shares.reduce(0) { $0 + $1.tokens }) }
        }
    }

    /// `UNCLAIM`: the cancelled claim's tokens go back to their lease if this host still holds it.
    /// Returns the tokens put back locally (the rest must go back to the pool).
    func unclaimed(_ e: ClaimEvent) -> Int {
        lock.withLock {
            releaseLocal(user: e.user, qty: e.qty)
            guard case .ready = phase else { return 0 }
            let n = stock.putBack(e.shares, now: monotonicNow())
            return n
        }
    }

    var perUserLimit: Int { lock.withLock { record?.perUser ?? 0 } }

    /// This host's record of `user` goes down by `qty` (under the lock); gone at zero.
    private func releaseLocal(user: String, qty: Int) {
        guard let held = localUsers[user] else { return }
        if held - qty <= 0 { localUsers.removeValue(forKey: user) } else { localUsers[user] = held - qty }
    }

    /// Serve or refuse parked claims, in order, after the stock changed.
    private func serveParked(now: Instant, _ a: inout Actions) {
        while let w = parked.first {
            let reply: Reply
            if w.deadline <= now {
                stock.countRejection(.unavailable)
                reply = .error(QuotaError(.unavailable, "no lease arrived within the claim timeout"))
            } else {
                if let refusal = engine.pipeline.refusal() {
                    stock.countRejection(.unavailable)
                    reply = .error(refusal)
                } else {
                    switch stock.retryParked(qty: w.qty, now: now) {
                    case .served(let shares):
                        parked.removeFirst()
                        parkedTokens -= w.qty
                        _ = granted(shares, qty: w.qty, user: w.user, req: w.req,
                                    loop: w.promise.futureResult.eventLoop, promise: w.promise, &a)
                        continue
                    case .reject(let e): reply = .error(e)
                    case .wait: return
                    }
                }
            }
            parked.removeFirst()
            parkedTokens -= w.qty
            a.completions.append((w.promise, reply))
        }
    }

    private func failParked(_ e: QuotaError, _ a: inout Actions) {
        while let w = parked.popFirst() {
            stock.countRejection(e.code)
            a.completions.append((w.promise, .error(e)))
        }
        parkedTokens = 0
    }

    private func collect(now: Instant, _ a: inout Actions) {
        if a.lease == nil, let l = stock.nextLease(now: now, waiting: parkedTokens) { a.lease = l }
        stock.closeFinished(now: now)
        a.returns += stock.takeReturns()
    }

    // MARK: - Periodic work (ticker)

    func tick(now: Instant) {
        var a = Actions()
        lock.lock()
        if case .ready = phase {
            stock.fence(now: now)
            serveParked(now: now, &a)
            a.renew = stock.renewals(now: now)
            stock.returnIfIdle(now: now)
            collect(now: now, &a)
            if now - lastDedupeSweep >= .seconds(1) {
                lastDedupeSweep = now
                dedupe = dedupe.filter { if case .done(_, let exp) = $0.value { return exp > now } else { return true } }
            }
        }
        lock.unlock()
        perform(a)
    }

    /// Fresh metadata from the periodic refresh (nil: the voucher is gone from Redis).
    func refreshed(_ rec: VoucherRecord?, regionPolicy: LeasePolicyOverride, now: Instant) {
        var a = Actions()
        lock.lock()
        if case .ready = phase {
            if let rec {
                let starvedAgain = record.map { rec.starvedMs > $0.starvedMs } ?? false
                record = rec
                stock.policy = regionPolicy.overlaid(by: rec.policy).applied(to: engine.config.lease)
                stock.setStatus(rec.status)
                stock.refreshed(pool: rec.pool)
                // Another host found the pool empty: give back stock this host is not using,
                // so the last tokens are not stranded here.
                if starvedAgain { stock.returnIfIdle(now: now, idleFor: .seconds(1)) }
            } else {
                stock.setStatus(.closed)
                phase = .missing(until: now + .seconds(1))
                failParked(QuotaError(.novoucher, "voucher '\(id)' was deleted"), &a)
            }
            serveParked(now: now, &a)
            collect(now: now, &a)
        }
        lock.unlock()
        perform(a)
    }

    var isReady: Bool {
        lock.withLock {
            if case .ready = phase { return true }
            return false
        }
    }

    // MARK: - Drain

    func drain() {
        var a = Actions()
        lock.lock()
        stock.drain()
        failParked(QuotaError(.unavailable, "draining: this host no longer serves claims"), &a)
        for (_, p) in loadWaiters {
            a.completions.append((p, .error(QuotaError(.unavailable, "draining: this host no longer serves claims"))))
        }
        loadWaiters.removeAll()
        a.returns += stock.takeReturns()
        lock.unlock()
        perform(a)
    }

    /// Nothing held, nothing to give back, nothing on the wire.
    var isSettled: Bool {
        lock.withLock { stock.tokensHeld == 0 && stock.finished.isEmpty && ioInFlight == 0 && !stock.leaseInFlight }
    }

    /// Retry returns that failed (Redis down) during drain or shutdown.
    func retryReturns() {
        var a = Actions()
        lock.lock()
        a.returns = stock.takeReturns()
        lock.unlock()
        perform(a)
    }

    // MARK: - Stats

    struct Snapshot {
        var status: String
        var counters: VoucherCounters
        var local: Int
        var pool: Int
        var leases: Int
        var rate: Double
        var parked: Int
        var soldOut: Bool
        var leaseSize: Int
    }

    func snapshot(now: Instant) -> Snapshot? {
        lock.withLock {
            guard case .ready = phase else { return nil }
            return Snapshot(
                status: stock.draining ? "draining" : stock.status.rawValue, counters: stock.counters,
                local: stock.available(now: now), pool: stock.poolHint, leases: stock.leases.count,
                rate: stock.rate.rate, parked: parked.count, soldOut: stock.soldOut,
                leaseSize: stock.policy.leaseSize(rate: stock.rate.rate))
        }
    }

    // MARK: - I/O

    private func perform(_ a: Actions) {
        for (p, r) in a.completions { p.succeed(r) }
        for (e, seq, limit, p) in a.userChecks { startUserCheck(e, seq: seq, limit: limit, promise: p) }
        for (f, p) in a.cascades { f.cascade(to: p) }
        if a.load { startLoad() }
        if let l = a.lease { startLease(l) }
        for r in a.renew { startRenew(r) }
        for r in a.returns { startReturn(r) }
    }

    private func beginIO() { lock.withLock { ioInFlight += 1 } }

    private var loadStarted = false

    /// Start the first metadata load (the runtime was created in `.loading`).
    func startLoadOnce() {
        let first = lock.withLock { () -> Bool in
            defer { loadStarted = true }
            return !loadStarted
        }
        if first { startLoad() }
    }

    func startLoad() {
        let store = engine.store
        Task {
            let result = await attempt { () async throws(RedisError) in try await store.voucher(self.id) }
            let policy = self.engine.regionPolicy
            self.loaded(result, regionPolicy: policy)
        }
    }

    private func loaded(_ result: Result<VoucherRecord?, RedisError>, regionPolicy: LeasePolicyOverride) {
        var a = Actions()
        let now = monotonicNow()
        lock.lock()
        switch result {
        case .success(let rec?):
            record = rec
            stock.policy = regionPolicy.overlaid(by: rec.policy).applied(to: engine.config.lease)
            stock.setStatus(rec.status)
            stock.refreshed(pool: rec.pool)
            phase = .ready
            // Decide the requests that waited for the load, in arrival order, before any new request
            // can see the voucher ready (it takes this lock): nobody overtakes them.
            for (req, p) in loadWaiters {
                switch decideReady(req, now: now, loop: p.futureResult.eventLoop, &a) {
                case .now(let r): a.completions.append((p, r))
                case .later(let f): a.cascades.append((f, p))
                }
            }
        case .success(nil):
            phase = .missing(until: now + .seconds(1))
            for _ in loadWaiters { engine.countRejection(.novoucher) }
            a.completions = loadWaiters.map { ($0.1, .error(QuotaError(.novoucher, "no such voucher '\(id)'"))) }
        case .failure(let e):
            engine.logger.warning("voucher load failed", metadata: ["quota.voucher": "\(id)", "error": "\(e)"])
            phase = .failed(until: now + .milliseconds(250))
            for _ in loadWaiters { engine.countRejection(.unavailable) }
            a.completions = loadWaiters.map {
                ($0.1, .error(QuotaError(.unavailable, "quota authority unreachable: \(e)")))
            }
        }
        loadWaiters.removeAll()
        lock.unlock()
        perform(a)
    }

    private func startLease(_ l: LeaseRequest) {
        let engine = self.engine
        let ttl = lock.withLock { stock.policy.ttl }
        Task {
            let result = await attempt { () async throws(RedisError) in
                try await engine.store.lease(voucher: self.id, host: engine.config.hostID, want: l.want,
                                             need: l.need, ttl: ttl, close: l.close)
            }
            self.leaseDone(result, request: l)
        }
    }

    private func leaseDone(_ result: Result<LeaseReply, RedisError>, request: LeaseRequest) {
        var a = Actions()
        let now = monotonicNow()
        engine.logger.debug("lease answer", metadata: ["quota.voucher": "\(id)", "want": "\(request.want)",
                                                       "need": "\(request.need)", "result": "\(result)"])
        lock.lock()
        if case .success = result {
            for closed in request.close { engine.pipeline.recordLease(.leaseClosed(voucher: id, lease: closed)) }
        }
        switch result {
        case .success(.granted(let g)):
            if g.granted > 0 { engine.pipeline.recordLease(.leaseGranted(voucher: id, lease: g.id, granted: g.granted)) }
            stock.leaseGranted(g, sentAt: request.sentAt, now: now)
        case .success(.refused(let r)): stock.leaseRefused(r)
        case .failure(let e):
            engine.logger.warning("lease failed", metadata: ["quota.voucher": "\(id)", "error": "\(e)"])
            engine.redisErrors.add(1, ordering: .relaxed)
            stock.leaseFailed(now: now, request: request)
        }
        serveParked(now: now, &a)
        collect(now: now, &a)
        lock.unlock()
        perform(a)
    }

    private func startRenew(_ leaseID: String) {
        let engine = self.engine
        let ttl = lock.withLock { stock.policy.ttl }
        let sentAt = monotonicNow()
        beginIO()
        Task {
            let result = await attempt { () async throws(RedisError) in
                try await engine.store.renew(voucher: self.id, lease: leaseID, host: engine.config.hostID, ttl: ttl)
            }
            var a = Actions()
            let now = monotonicNow()
            self.lock.lock()
            self.ioInFlight -= 1
            switch result {
            case .success(let o):
                if o != .renewed(ttl: ttl) {
                    engine.logger.warning("lease not renewed", metadata: ["quota.voucher": "\(self.id)",
                                                                          "quota.lease": "\(leaseID)", "outcome": "\(o)"])
                }
                if o == .gone { engine.pipeline.recordLease(.leaseClosed(voucher: self.id, lease: leaseID)) }
                self.stock.renewed(leaseID, outcome: o, sentAt: sentAt, now: now)
            case .failure:
                engine.redisErrors.add(1, ordering: .relaxed)
                self.stock.renewFailed(leaseID)
            }
            self.collect(now: now, &a)
            self.lock.unlock()
            self.perform(a)
        }
    }

    private func startReturn(_ r: ReturnRequest) {
        let engine = self.engine
        beginIO()
        Task {
            let result = await attempt { () async throws(RedisError) in
                try await engine.store.giveBack(voucher: self.id, lease: r.leaseId, host: engine.config.hostID,
                                                returnedTotal: r.returnedTotal, close: r.close)
            }
            self.lock.withLock {
                self.ioInFlight -= 1
                switch result {
                case .success(let n):
                    if r.close { engine.pipeline.recordLease(.leaseClosed(voucher: self.id, lease: r.leaseId)) }
                    self.stock.returned(r, applied: n)
                case .failure:
                    engine.redisErrors.add(1, ordering: .relaxed)
                    self.stock.returnFailed(r)
                }
            }
        }
    }
}

/// Run a Redis call and keep its typed error.
func attempt<T>(_ body: () async throws(RedisError) -> T) async -> Result<T, RedisError> {
    do { return .success(try await body()) } catch { return .failure(error) }
}

/// Completes a reply promise exactly once (durable, failed or timed out, whichever is first).
final class ReplyOnce: @unchecked Sendable {
    private let lock = NIOLock()
    private var done = false
    private let promise: EventLoopPromise<Reply>

    init(_ p: EventLoopPromise<Reply>) { promise = p }

    /// Returns true if this call completed the promise.
    @discardableResult
    func complete(_ r: Reply) -> Bool {
        let first = lock.withLock { () -> Bool in
            defer { done = true }
            return !done
        }
        if first { promise.succeed(r) }
        return first
    }
}

@inline(__always)
func wallClockMs() -> Int64 {
    var ts = timespec()
    clock_gettime(CLOCK_REALTIME_COARSE, &ts)
    return Int64(ts.tv_sec) * 1000 + Int64(ts.tv_nsec) / 1_000_000
}
