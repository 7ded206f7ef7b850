import Glibc
import Logging
import NIOConcurrencyHelpers
import NIOCore
import QuotaCore
import QuotaJournal
import QuotaRedis
import Synchronization

/// One voucher on this host: the ``VoucherMachine`` value behind a lock, and the I/O it asks for.
///
/// Every entry point takes the lock, feeds the machine one event, and carries out the effects it
/// returns: journal appends happen before the lock is released (their order in the journal is
/// the order of the decisions), everything else (replies, Redis calls) after. The lock is never
/// held across I/O and no promise is completed under it.
final class VoucherRuntime: @unchecked Sendable {
    let id: String
    private unowned let engine: SidecarEngine
    /// This voucher's number in the claim book (``ClaimBook/voucherIndex(_:)``), taken at its first claim
    /// (not at creation: a runtime is made for any well-formed id before Redis says the voucher exists, and
    /// the book's table of ids is bounded and never shrinks). -2: not yet; -1: the table was full.
    private let bookIndexState = Atomic<Int>(-2)
    private var bookIndex: UInt16? {
        let v = bookIndexState.load(ordering: .relaxed)
        if v >= -1 { return v >= 0 ? UInt16(v) : nil }
        let i = engine.claimBook.voucherIndex(id)   // idempotent: racing first claims get the same index
        bookIndexState.store(i.map(Int.init) ?? -1, ordering: .relaxed)
        return i
    }
    private let lock = NIOLock()

    // Guarded by `lock`.
    private var machine: VoucherMachine
    /// Who waits for each ticket's answer: a promise, or a connection's ``ReplyAddress``.
    private var waiters = SeqMap<Waiter>()
    private var nextTicket = 0
    private var ioInFlight = 0
    /// The voucher's generation in Redis, learned at load: every script call says it.
    private var generation: String?
    /// The highest lease id this host has been granted (Redis's `lease_seq` must never go below it).
    /// The highest lease number granted so far, per shard (one entry, 0, for an unsharded voucher).
    private var maxLeaseIDs: [Int: Int] = [:]
    private var lostReason: String?
    /// Dropped from the engine's registry (idle, or an unknown voucher): requests must look it up again.
    private var evicted = false
    /// The effects buffer of `handle`, kept (emptied, with its capacity) between claims: no allocation per claim.
    private var scratch: [VoucherMachine.Effect] = []


    init(id: String, engine: SidecarEngine, policy: LeasePolicy, rules: ClaimRules, requestPrefix: String) {
        self.id = id
        self.engine = engine
        // A claim's reply carries its number only; its connection writes the engine's prefix before it.
        precondition(rules.idPrefix == engine.claimPrefix, "a voucher's claim prefix is not the process's")
        let pipeline = engine.pipeline
        let chores = engine.chores
        let maxJobs = engine.config.limits.maxBackgroundJobs
        let claimSequence = engine.claimSequence
        machine = VoucherMachine(
            voucher: id, rules: rules, policy: policy, requestPrefix: requestPrefix,
            nextSeq: { claimSequence.next() }, wallClock: { wallClockMs() },
            admission: { pipeline.refusal() ?? chores.refusal(limit: maxJobs) })
    }

    /// Where a ticket's answer goes.
    private enum Waiter {
        case promise(EventLoopPromise<Reply>)
        case address(ReplyAddress)
    }

    /// An answer and where it goes. (A struct, not a tuple: an array of tuples is destroyed through the tuple's
    /// metadata, ~120 instructions an element; issue 13.)
    private struct WaiterReply {
        let waiter: Waiter
        let reply: Reply
    }

    /// Deferred work: what happens after the lock is released.
    private enum Deferred {
        /// An answer for a promise (one for a connection's place goes straight to the delivered list instead).
        case reply(EventLoopPromise<Reply>, Reply)
        case effect(VoucherMachine.Effect)
        /// Release a user's count once, then answer `+OK` (the release is retried in the background if it failed).
        case releaseThenOK(ClaimEvent, Waiter)
        /// A completion that came while the lock was held (``append(_:_:then:)``).
        case run(@Sendable () -> Void)
    }

    // MARK: - Requests (event loop threads)

    /// Nil: this runtime was evicted since it was looked up; look the voucher up again. With an `address`,
    /// an answer that is not known now goes there (``Outcome/pending``), else to a promise (``Outcome/later``).
    func handle(_ req: VoucherMachine.Request, now: Instant, loop: any EventLoop,
                address: ReplyAddress? = nil) -> Outcome? {
        var out: Outcome?
        guard decide({ fx in out = admit(req, now: now, loop: loop, address: address, &fx) }) else { return nil }
        return out
    }

    /// ``handle(_:now:loop:address:)`` for several requests under one taking of the lock, in order; their
    /// effects are carried out together (journal appends in decision order under the lock, the rest after).
    /// With a `box`, request `i`'s answer, if not known now, goes to its place `firstSeq + i`.
    func handleMany(_ reqs: [VoucherMachine.Request], now: Instant, loop: any EventLoop,
                    box: ReplyBox? = nil, firstSeq: Int = 0) -> [Outcome]? {
        var outcomes: [Outcome] = []
        outcomes.reserveCapacity(reqs.count)
        guard decide({ fx in
            for (i, req) in reqs.enumerated() {
                let address = box.map { ReplyAddress(box: $0, seq: firstSeq + i) }
                outcomes.append(admit(req, now: now, loop: loop, address: address, inRun: true, &fx))
            }
            machine.endRun(now: now, effects: &fx)
        }) else { return nil }
        return outcomes
    }

    /// Run `body` under the lock with the reused effects buffer, then carry the effects out. False: evicted.
    private func decide(_ body: (inout [VoucherMachine.Effect]) -> Void) -> Bool {
        lock.lock()
        if evicted {
            lock.unlock()
            return false
        }
        var fx = scratch
        scratch = []
        body(&fx)
        var addressed: [AddressedReply] = []
        let deferred = performLocked(&fx, &addressed)
        fx.removeAll(keepingCapacity: true)
        scratch = fx
        lock.unlock()
        perform(deferred, addressed)
        return true
    }

    /// One request to the machine (under the lock): its answer now, or a promise registered for it.
    private func admit(_ req: VoucherMachine.Request, now: Instant, loop: any EventLoop, address: ReplyAddress?,
                       inRun: Bool = false, _ fx: inout [VoucherMachine.Effect]) -> Outcome {
        let ticket = nextTicket
        nextTicket &+= 1
        let answer = inRun ? machine.handleInRun(req, ticket: ticket, now: now, effects: &fx)
            : machine.handle(req, ticket: ticket, now: now, effects: &fx)
        if let answer { return .now(reply(answer)) }
        // (The effects, answers among them, are carried out after every request of the call was admitted.)
        if let address {
            waiters[ticket] = .address(address)
            return .pending
        }
        let p = loop.makePromise(of: Reply.self)
        waiters[ticket] = .promise(p)
        return .later(p.futureResult)
    }

    /// `UNCLAIM` of a claim of this voucher made through this host. Nil: evicted, look it up again.
    func unclaim(_ e: ClaimEvent, loop: any EventLoop) -> Outcome? {
        guard !lock.withLock({ evicted }) else { return nil }
        let p = loop.makePromise(of: Reply.self)
        var taken = false
        event(now: monotonicNow()) { m, now, fx in
            taken = true
            let t = self.nextTicket
            self.nextTicket &+= 1
            self.waiters[t] = .promise(p)
            m.unclaim(e, ticket: t, tsMs: wallClockMs(), effects: &fx)
        }
        guard taken else {
            // Evicted between the check and the event: nothing was done; the caller looks it up again.
            p.succeed(.value(.ok))
            return nil
        }
        return .later(p.futureResult)
    }

    private func reply(_ a: VoucherMachine.Answer) -> Reply {
        switch a {
        case .claimID(let id): return .claimID(id)
        // The machine's prefix is the engine's, which the connection writes (checked at init).
        case .claimNumber(let seq): return .claimNumber(seq: seq)
        case .integer(let n): return .value(.integer(n))
        case .ok: return .value(.ok)
        case .refused(let e): return .error(e)
        }
    }

    /// Feed the machine one event under the lock, then carry out what it asks for.
    /// (Into the reused effects buffer, as ``decide(_:)``: a journal batch's claims made a fresh array grow
    /// by doubling, ~300 instructions a claim; issue 13.)
    private func event(now: Instant, _ body: (inout VoucherMachine, Instant, inout [VoucherMachine.Effect]) -> Void) {
        lock.lock()
        // An evicted runtime holds nothing and has nothing in flight: late ticks and recalls change nothing.
        guard !evicted else { return lock.unlock() }
        var fx = scratch
        scratch = []
        body(&machine, now, &fx)
        var addressed: [AddressedReply] = []
        let deferred = performLocked(&fx, &addressed)
        fx.removeAll(keepingCapacity: true)
        scratch = fx
        lock.unlock()
        perform(deferred, addressed)
    }

    // MARK: - Effects

    /// Journal appends now (under the lock, in decision order); the rest after the lock is released.
    /// (Each effect is taken out of `fx`, a payload-free one left in its place: the caller empties it after.)
    /// An answer for a connection's place goes to `addressed` as it will be delivered, not through a `Deferred`
    /// and a ``WaiterReply`` first (each a copy of the reply and its address: measured 1.9 atomic reference-count
    /// operations and 266 instructions a claim; issue 13).
    private func performLocked(_ fx: inout [VoucherMachine.Effect], _ addressed: inout [AddressedReply]) -> [Deferred] {
        guard !fx.isEmpty else { return [] }
        var out: [Deferred] = []
        // A batch's answers at once (a claim answered now usually defers nothing: no array for it).
        if fx.count > 16 { addressed.reserveCapacity(fx.count) }
        let pipeline = engine.pipeline
        let book = engine.claimBook   // (once: each read through the `unowned` engine is an atomic retain and release)
        // (By index, each effect taken out: `for e in fx` and `switch fx[i]` copied each effect (an outlined copy of
        // the enum, ~146 instructions, and a retain and a release of its event) and destroyed the copy; issue 13.)
        for i in fx.indices {
            var e = VoucherMachine.Effect.load
            swap(&e, &fx[i])
            switch e {
            case .answer(let t, let a):
                switch waiters.removeValue(forKey: t) {
                case .address(let place)?: addressed.append(AddressedReply(place, reply(a)))
                case .promise(let p)?: out.append(.reply(p, reply(a)))
                case nil:
                    engine.answersWithoutWaiter.add(1, ordering: .relaxed)
                    engine.logger.error("an answer for a ticket nobody waits for", metadata: ["quota.voucher": "\(id)", "ticket": "\(t)"])
                }
            case .journal(let r):
                pipeline.append(r)
            case .recordLater(let c):
                pipeline.append(.claim(c))
            case .journalIntent(let c, let seq):
                append(.claim(c), &out) { [self] ok, _ in
                    event(now: monotonicNow()) { m, now, fx in m.intentJournaled(seq: seq, ok: ok, now: now, effects: &fx) }
                }
            case .recordClaim(let c, let seq):
                // Answered with the rest of its write batch (``journaled(tokens:positions:)``).
                if !pipeline.append(.claim(c), sink: self, token: seq) {
                    out.append(.run { [self] in failed([seq]) })
                }
            case .recordGrant(let r, let g, let request):
                append(r, &out) { [self] ok, _ in
                    event(now: monotonicNow()) { m, now, fx in m.grantRecorded(g, request: request, ok: ok, now: now, effects: &fx) }
                }
            case .recordCancel(let c, let ref):
                append(.claim(c), &out) { [self] ok, _ in
                    event(now: monotonicNow()) { m, now, fx in m.cancelRecorded(ref, ok: ok, now: now, effects: &fx) }
                }
            case .remember(let c, let seq):
                // Done here, not deferred: the claim book has its own striped locks and calls nothing back,
                // and a claim answered at once then needs no deferred list at all.
                book.add(c, seq: seq, voucherIndex: bookIndex)
            case .rememberGranted(let c):
                book.add(c, voucher: id, voucherIndex: bookIndex)
            case .releaseUser(let c, let t?):
                if let w = waiters.removeValue(forKey: t) { out.append(.releaseThenOK(c, w)) } else { out.append(.effect(e)) }
            case .lease, .renew, .giveBack, .load:
                ioInFlight += 1
                out.append(.effect(e))
            default:
                out.append(.effect(e))
            }
        }
        return out
    }

    /// `pipeline.append` with a completion, from under the lock. The pipeline may run the completion before
    /// `append` returns (no journal, or a journal that is stopping); the completion feeds this runtime, so
    /// it must not run under the lock: one that comes that early is deferred until the lock is released.
    private func append(_ r: JournalRecord, _ out: inout [Deferred],
                        then: @escaping @Sendable (Bool, JournalPosition?) -> Void) {
        let gate = SynchronousCompletionGate()
        engine.pipeline.append(r) { ok, pos in
            if !gate.catchEarly({ then(ok, pos) }) { then(ok, pos) }
        }
        if let early = gate.close() { out.append(.run(early)) }
    }

    /// (`addressed` is consumed, down to ``deliver(_:)``, which sorts it in place: a borrowed array would be
    /// copied whole to sort.)
    private func perform(_ deferred: [Deferred], _ addressed: consuming [AddressedReply]) {
        var replies: [WaiterReply] = []
        for i in deferred.indices {
            switch deferred[i] {
            case .run(let body): body()
            case .reply(let p, let r): replies.append(WaiterReply(waiter: .promise(p), reply: r))
            case .effect(let e): start(e)
            case .releaseThenOK(let c, let w):
                let engine = self.engine
                Task {
                    let r = await attempt { () async throws(RedisError) in
                        try await engine.store.releaseUser(voucher: c.voucher, user: c.user, claimID: c.claimID,
                                                           groups: engine.config.perUser.groups)
                    }
                    if case .failure = r { engine.releaseUser(c) }
                    Self.complete([WaiterReply(waiter: w, reply: .value(.ok))])
                }
            }
        }
        Self.complete(replies)
        Self.deliver(addressed)
    }

    /// Hand answers to their waiters, one hop per event loop (a journal batch answers many connections'
    /// claims at once: one task per loop, not one per reply). A promise of the calling thread's own loop is
    /// completed at once; a connection's address is always reached by a hop, so that a reply never comes
    /// before the connection made its place (it does so in the same event-loop turn as the request).
    private static func complete(_ replies: [WaiterReply]) {
        guard !replies.isEmpty else { return }
        if replies.count == 1, case .promise(let p) = replies[0].waiter {
            // The usual case outside batches (one Kafka acknowledgement, one timeout): no grouping.
            p.succeed(replies[0].reply)
            return
        }
        var promised: [(EventLoopPromise<Reply>, Reply)] = []
        var addressed: [AddressedReply] = []
        addressed.reserveCapacity(replies.count)
        for i in replies.indices {
            switch replies[i].waiter {
            case .promise(let p):
                if p.futureResult.eventLoop.inEventLoop { p.succeed(replies[i].reply) } else { promised.append((p, replies[i].reply)) }
            case .address(let a): addressed.append(AddressedReply(a, replies[i].reply))
            }
        }
        for items in grouped(promised, by: { ObjectIdentifier($0.0.futureResult.eventLoop) }) {
            if items.count == 1 {
                items[0].0.succeed(items[0].1)
            } else {
                items[0].0.futureResult.eventLoop.execute { for (p, r) in items { p.succeed(r) } }
            }
        }
        deliver(addressed)
    }

    /// Hand replies to their connections' places: one hop per event loop, each connection's run delivered at once.
    private static func deliver(_ addressed: consuming [AddressedReply]) {
        guard !addressed.isEmpty else { return }
        if addressed.count == 1 {
            // The usual case outside batches (one Kafka acknowledgement, one timeout): no grouping.
            let a = addressed[0].address
            let r = addressed[0].reply
            a.box.loop.execute { a.box.deliver([(seq: a.seq, reply: r)]) }
            return
        }
        // Grouped by event loop, and within a loop by connection, by sorting one array: each loop gets a slice,
        // and each connection a run of it (issue 13: an array per loop and another per connection, grown reply by
        // reply, were ~800 instructions a claim).
        addressed.sort { $0.loop != $1.loop ? $0.loop < $1.loop : $0.box < $1.box }
        forEachRun(addressed[...], by: \.loop) { loopRun in
            loopRun[loopRun.startIndex].address.box.loop.execute {
                forEachRun(loopRun, by: \.box) { connection in
                    // (By index, each reply's number and reply read where they are: mapping the elements copied each
                    // one, a retain and a release of its connection's box; issue 13.)
                    connection[connection.startIndex].address.box.deliver(
                        connection.indices.lazy.map { (seq: connection[$0].address.seq, reply: connection[$0].reply) })
                }
            }
        }
    }

    private func start(_ e: VoucherMachine.Effect) {
        switch e {
        case .load: startLoad()
        case .lease(let l): startLease(l)
        case .renew(let id): startRenew(id)
        case .giveBack(let r): startReturn(r)
        case .checkUser(let c, let seq, let limit): startUserCheck(c, seq: seq, limit: limit)
        case .remember(let c, let seq): engine.claimBook.add(c, seq: seq, voucherIndex: bookIndex)
        case .rememberGranted(let c): engine.claimBook.add(c, voucher: id, voucherIndex: bookIndex)
        case .restock(let c): engine.restock(c)
        case .releaseUser(let c, _): engine.releaseUser(c)
        case .unclaimFailed(let claimID): engine.claimBook.restore(claimID)
        case .wake(let at):
            let delay = at - monotonicNow()
            Task { [self] in
                if delay > .zero { try? await Task.sleep(for: delay) }
                tick(now: monotonicNow())
            }
        case .answer, .journal, .recordLater, .journalIntent, .recordClaim, .recordCancel, .recordGrant: break
        }
    }

    /// An I/O task ended: count it, then feed its answer.
    private func ioDone(now: Instant, _ body: (inout VoucherMachine, Instant, inout [VoucherMachine.Effect]) -> Void) {
        event(now: now) { m, now, fx in
            self.ioInFlight -= 1
            body(&m, now, &fx)
        }
    }

    private func startUserCheck(_ c: ClaimEvent, seq: Int, limit: Int) {
        let check = QuotaStore.UserCheck(
            voucher: id, group: QuotaStore.userGroup(user: c.user, groups: engine.config.perUser.groups),
            limit: limit, user: c.user, qty: c.qty, claimID: c.claimID)
        engine.userChecks.submit(check, sink: self, token: seq)
    }

    private func isServerError(_ e: RedisError) -> Bool {
        switch e {
        case .server, .badReply: return true
        default: return false
        }
    }

    // MARK: - Load and refresh

    private func startLoad() {
        let store = engine.store
        Task {
            var unknown = false
            defer { if unknown { self.engine.voucherMissing(self) } }
            let sentAt = monotonicNow()
            let result = await attempt { () async throws(RedisError) in try await store.vouchersWithClock([self.id]) }
            let policy = self.engine.regionPolicy
            let now = monotonicNow()
            self.ioDone(now: now) { m, now, fx in
                switch result.map({ ($0.records.first ?? nil, $0.nowMs) }) {
                case .success(let (rec?, redisNow)):
                    if let reason = self.engine.generationProblem(voucher: rec) {
                        self.loseAuthority(reason, &m, now: now, &fx)
                        m.loaded(.failure(QuotaError(.unavailable, reason)), policy: m.stock.policy, now: now, effects: &fx)
                        return
                    }
                    self.generation = rec.generation
                    let p = self.effectivePolicy(rec, policy)
                    m.loaded(.success(self.info(rec, policy: p, redisNowMs: redisNow, sentAt: sentAt, receivedAt: now)),
                             policy: p, now: now, effects: &fx)
                case .success((nil, _)):
                    if let lost = self.engine.regionLost {
                        m.loaded(.failure(QuotaError(.unavailable, lost)), policy: m.stock.policy, now: now, effects: &fx)
                    } else {
                        self.engine.countRejection(.novoucher)
                        m.loaded(.success(nil), policy: m.stock.policy, now: now, effects: &fx)
                        unknown = true
                    }
                case .failure(let e):
                    self.engine.logger.warning("voucher load failed", metadata: ["quota.voucher": "\(self.id)", "error": "\(e)"])
                    m.loaded(.failure(QuotaError(.unavailable, "quota authority unreachable: \(e)")), policy: m.stock.policy,
                             now: now, effects: &fx)
                }
            }
        }
    }

    private func effectivePolicy(_ rec: VoucherRecord, _ region: LeasePolicyOverride) -> LeasePolicy {
        region.overlaid(by: rec.policy).applied(to: engine.config.lease)
    }

    /// What the machine needs of a record: the schedule placed on this host's clock (from a reply that
    /// read Redis's clock between `sentAt` and `receivedAt`) and the opening lease's size.
    private func info(_ rec: VoucherRecord, policy: LeasePolicy, redisNowMs: Int64, sentAt: Instant, receivedAt: Instant)
        -> VoucherRecordInfo
    {
        var i = rec.info
        i.schedule = SaleSchedule(startMs: rec.startMs, endMs: rec.endMs, redisNowMs: redisNowMs, sentAt: sentAt,
                                  receivedAt: receivedAt)
        i.opening = policy.openingSize(regionLimit: rec.limit, hosts: engine.regionHosts)
        return i
    }

    /// The highest lease id granted so far: read before a refresh is sent, so a refresh read before a
    /// later grant landed is not mistaken for a Redis that went back.
    var leaseHighWater: [Int: Int] { lock.withLock { maxLeaseIDs } }

    /// Fresh metadata from the periodic refresh (nil: the voucher is gone from Redis). `highWater`:
    /// ``leaseHighWater`` when the refresh was sent.
    func refreshed(_ rec: VoucherRecord?, regionPolicy: LeasePolicyOverride, highWater: [Int: Int], redisNowMs: Int64,
                   sentAt: Instant, now: Instant) {
        event(now: now) { m, now, fx in
            guard m.phase == .ready, lostReason == nil else { return }
            guard let rec else {
                loseAuthority("voucher '\(id)' is gone from Redis while this host served it: Redis lost its data "
                              + "or the voucher was deleted (see quotactl rehydrate)", &m, now: now, &fx)
                return
            }
            if let gen = generation, rec.generation != gen {
                loseAuthority("voucher '\(id)' has generation \(rec.generation) in Redis, this host knew \(gen): "
                              + "Redis lost its data or the voucher was created again", &m, now: now, &fx)
                return
            }
            // Each shard's own sequence (a sharded voucher's shards live on different masters: any one of
            // them can fail over to a replica that lost the last grants).
            for (shard, hw) in highWater.sorted(by: { $0.key < $1.key }) {
                let seq = shard == 0 ? rec.leaseSeq : shard < rec.shardRecords.count ? rec.shardRecords[shard].leaseSeq : 0
                if seq < hw {
                    loseAuthority("Redis's lease sequence of '\(id)'\(shard == 0 ? "" : " shard \(shard)") went back from "
                                  + "\(hw) to \(seq): Redis lost acknowledged writes (appendfsync? a failover?)", &m, now: now, &fx)
                    return
                }
            }
            let p = effectivePolicy(rec, regionPolicy)
            m.refreshed(info(rec, policy: p, redisNowMs: redisNowMs, sentAt: sentAt, receivedAt: now), policy: p, now: now,
                        effects: &fx)
        }
    }

    /// The authority no longer holds this voucher as this host knew it: fail closed (under the lock).
    private func loseAuthority(_ reason: String, _ m: inout VoucherMachine, now: Instant, _ fx: inout [VoucherMachine.Effect]) {
        guard lostReason == nil else { return }
        lostReason = reason
        engine.logger.error("failing closed: \(reason)", metadata: ["quota.voucher": "\(id)"])
        m.authorityLost(reason, now: now, effects: &fx)
    }

    /// The region's Redis lost its state: fail closed for this voucher.
    func regionLost(_ reason: String) {
        event(now: monotonicNow()) { m, now, fx in loseAuthority(reason, &m, now: now, &fx) }
    }

    // MARK: - Leases

    private func gen() -> String { lock.withLock { generation ?? "" } }

    private func startLease(_ l: LeaseRequest) {
        let engine = self.engine
        let (ttl, sizes) = lock.withLock { (machine.stock.policy.ttl, machine.stock.policy.min...max(machine.stock.policy.min, machine.stock.policy.max)) }
        let trusted = engine.config.durability != .none
        let send: @Sendable () -> Void = { [self] in
            Task {
                let sentAt = monotonicNow()
                let gen = self.gen()
                var result = await attempt { () async throws(RedisError) in
                    try await engine.store.lease(voucher: self.id, host: engine.config.hostID, req: l.req, want: l.want,
                                                 need: l.need, ttl: ttl, gen: gen,
                                                 durability: engine.config.durability.rawValue,
                                                 warmup: engine.config.lease.warmup, close: l.close)
                }
                // This region is sold out: borrow from another region (sized like a lease), then ask again
                // (answered as a recall with nothing held: the next request comes after the recall poll).
                // Only for claims waiting (no borrowing ahead of demand, nor before an opening). Sold out only
                // when every other region said it has nothing to lend; while that cannot be told, claims
                // wait (and fail closed at their timeout).
                if case .success(.refused(.soldOut)) = result, l.need > 0, let b = engine.borrower {
                    let amount = min(max(l.want, l.need, sizes.lowerBound), sizes.upperBound)
                    switch await b.borrow(voucher: self.id, need: l.need, amount: amount, generation: gen) {
                    case .moved, .retry: result = .success(.refused(.recalling(held: 0)))
                    case .exhausted: break
                    }
                }
                var request = l
                request.sentAt = sentAt
                self.leaseDone(result, request: request, trusted: trusted)
            }
        }
        guard trusted, engine.pipeline.journal != nil else { return send() }
        // The request id is durable before the request leaves: after a crash, recovery asks Redis what it got.
        engine.pipeline.append(.leaseRequested(voucher: id, req: l.req)) { [self] ok, _ in
            if ok {
                send()
            } else {
                ioDone(now: monotonicNow()) { m, now, fx in
                    m.leaseAnswered(.failed("journal write failed", outcomeUnknown: false), request: l, trusted: trusted,
                                    now: now, effects: &fx)
                }
            }
        }
    }

    private func leaseDone(_ result: Result<LeaseReply, RedisError>, request: LeaseRequest, trusted: Bool) {
        engine.logger.debug("lease answer", metadata: ["quota.voucher": "\(id)", "want": "\(request.want)",
                                                       "need": "\(request.need)", "result": "\(result)"])
        ioDone(now: monotonicNow()) { m, now, fx in
            switch result {
            case .success(.granted(let g)):
                if let (s, n) = QuotaStore.leaseNumber(g.id) { maxLeaseIDs[s] = max(maxLeaseIDs[s] ?? 0, n) }
                m.leaseAnswered(.granted(g), request: request, trusted: trusted, now: now, effects: &fx)
            case .success(.refused(let r)):
                m.leaseAnswered(.refused(r), request: request, trusted: trusted, now: now, effects: &fx)
            case .failure(.generation(let why)):
                m.leaseAnswered(.failed(why, outcomeUnknown: false), request: request, trusted: trusted, now: now, effects: &fx)
                loseAuthority(why, &m, now: now, &fx)
            case .failure(let e):
                engine.logger.warning("lease failed", metadata: ["quota.voucher": "\(id)", "error": "\(e)"])
                engine.redisErrors.add(1, ordering: .relaxed)
                m.leaseAnswered(.failed("\(e)", outcomeUnknown: e.outcomeUnknown || isServerError(e)), request: request,
                                trusted: trusted, now: now, effects: &fx)
            }
        }
    }

    private func startRenew(_ leaseID: String) {
        let engine = self.engine
        let ttl = lock.withLock { machine.stock.policy.ttl }
        let sentAt = monotonicNow()
        let gen = self.gen()
        Task {
            let result = await attempt { () async throws(RedisError) in
                try await engine.store.renew(voucher: self.id, lease: leaseID, host: engine.config.hostID, ttl: ttl, gen: gen)
            }
            self.ioDone(now: monotonicNow()) { m, now, fx in
                switch result {
                case .success(let o):
                    if o != .renewed(ttl: ttl) {
                        engine.logger.warning("lease not renewed", metadata: ["quota.voucher": "\(self.id)",
                                                                              "quota.lease": "\(leaseID)", "outcome": "\(o)"])
                    }
                    m.renewAnswered(leaseID, outcome: o, sentAt: sentAt, now: now, effects: &fx)
                case .failure(.generation(let why)):
                    m.renewAnswered(leaseID, outcome: nil, sentAt: sentAt, now: now, effects: &fx)
                    self.loseAuthority(why, &m, now: now, &fx)
                case .failure:
                    engine.redisErrors.add(1, ordering: .relaxed)
                    m.renewAnswered(leaseID, outcome: nil, sentAt: sentAt, now: now, effects: &fx)
                }
            }
        }
    }

    private func startReturn(_ r: ReturnRequest) {
        let engine = self.engine
        let gen = self.gen()
        Task {
            let result = await attempt { () async throws(RedisError) in
                try await engine.store.giveBack(voucher: self.id, lease: r.leaseId, host: engine.config.hostID,
                                                returnedTotal: r.returnedTotal, close: r.close, gen: gen)
            }
            self.ioDone(now: monotonicNow()) { m, now, fx in
                switch result {
                case .success(.applied(let n)):
                    m.returnAnswered(r, outcome: .applied(n), now: now, effects: &fx)
                case .success(.gone), .success(.notOurs):
                    m.returnAnswered(r, outcome: .gone, now: now, effects: &fx)
                case .failure(.generation(let why)):
                    self.loseAuthority(why, &m, now: now, &fx)
                case .failure(let e):
                    engine.redisErrors.add(1, ordering: .relaxed)
                    m.returnAnswered(r, outcome: .failed("\(e)"), now: now, effects: &fx)
                }
            }
        }
    }

    // MARK: - Periodic work

    func tick(now: Instant) {
        event(now: now) { m, now, fx in m.tick(now: now, effects: &fx) }
    }

    /// Another host recalled this voucher's stock.
    func recall(from host: String?) {
        event(now: monotonicNow()) { m, now, fx in m.recall(now: now, from: host, effects: &fx) }
    }

    /// This host's restock of a cancelled claim put `tokens` back into the region's pool.
    func restocked(tokens: Int) {
        event(now: monotonicNow()) { m, now, fx in m.restocked(tokens: tokens, now: now, effects: &fx) }
    }

    /// The voucher is on the region's warm list: take its opening lease.
    func warm() {
        event(now: monotonicNow()) { m, now, fx in m.warm(now: now, effects: &fx) }
    }

    /// This host's claim rate of the voucher (tokens/s), if it is serving it.
    var claimRate: Double? {
        lock.withLock { machine.phase == .ready && lostReason == nil ? machine.stock.rate.rate : nil }
    }

    var isReady: Bool { lock.withLock { machine.phase == .ready && lostReason == nil } }
    var knownGeneration: String? { lock.withLock { generation } }

    // MARK: - Drain

    func drain() {
        event(now: monotonicNow()) { m, now, fx in m.drain(now: now, effects: &fx) }
    }

    /// Nothing held, nothing to give back, nothing on the wire.
    var isSettled: Bool { lock.withLock { (machine.isSettled || lostReason != nil) && ioInFlight == 0 } }

    /// What keeps it from being settled (for the shutdown log).
    var unsettledDescription: String {
        lock.withLock {
            "\(id): \(machine.stock.tokensHeld) tokens held, \(machine.inFlightCount) claims in flight, \(ioInFlight) Redis calls"
        }
    }

    /// Retry returns that failed (Redis down) during drain or shutdown.
    func retryReturns() {
        event(now: monotonicNow()) { m, now, fx in m.retryReturns(now: now, effects: &fx) }
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
        var inFlight: Int
        var soldOut: Bool
        var tail: Bool
        var leaseSize: Int
        var schedule: SaleSchedule
    }

    func snapshot(now: Instant) -> Snapshot? {
        lock.withLock {
            guard machine.phase == .ready || lostReason != nil else { return nil }
            let s = machine.stock
            let status = lostReason != nil ? "lost" : s.draining ? "draining" : s.status.rawValue
            return Snapshot(
                status: status, counters: s.counters, local: s.available(now: now), pool: s.poolHint,
                leases: s.leases.count, rate: s.rate.rate, parked: machine.parkedCount, inFlight: machine.inFlightCount,
                soldOut: s.soldOut, tail: s.tail, leaseSize: s.policy.leaseSize(rate: s.rate.rate), schedule: s.schedule)
        }
    }

    // MARK: - Eviction

    /// Whether it could be evicted now (a first look, without the registry's lock).
    func looksEvictable(now: Instant) -> Bool {
        lock.withLock { !evicted && ioInFlight == 0 && lostReason == nil && waiters.isEmpty && machine.isEvictable(now: now) }
    }

    /// Mark it evicted if it still can be (under the registry's lock): from then on it takes no request.
    /// Returns its counters (to keep the process totals) when it was evicted.
    func evictIfIdle(now: Instant) -> VoucherCounters? {
        lock.withLock {
            guard !evicted, ioInFlight == 0, lostReason == nil, waiters.isEmpty, machine.isEvictable(now: now) else { return nil }
            evicted = true
            return machine.stock.counters
        }
    }

    /// `REQ` answers it keeps.
    var dedupeCount: Int { lock.withLock { machine.dedupeCount } }

    /// Answers remembered from the journal of a previous run (claim ids of requests with `REQ`).
    func restoreDedupe(_ entries: [VoucherMachine.RecoveredAnswer]) {
        lock.withLock { machine.restoreDedupe(entries) }
    }

    /// Kafka acknowledged a recovered claim: its `REQ` may be answered with it now.
    func acknowledged(req: String) {
        lock.withLock { machine.acknowledged(req: req) }
    }
}

/// Run a Redis call and keep its typed error.
func attempt<T>(_ body: () async throws(RedisError) -> T) async -> Result<T, RedisError> {
    do { return .success(try await body()) } catch { return .failure(error) }
}

@inline(__always)
func wallClockMs() -> Int64 {
    var ts = timespec()
    clock_gettime(CLOCK_REALTIME_COARSE, &ts)
    return Int64(ts.tv_sec) * 1000 + Int64(ts.tv_nsec) / 1_000_000
}

extension VoucherRuntime: JournalBatchSink {
    /// Claim records of one journal write batch are durable: one pass under the lock for all of them.
    func journaled(tokens: [Int], positions: [JournalPosition]) {
        event(now: monotonicNow()) { m, now, fx in m.claimsRecorded(seqs: tokens, ok: true, now: now, effects: &fx) }
        let pipeline = engine.pipeline
        guard pipeline.durability == .kafka else { return }
        for (seq, pos) in zip(tokens, positions) {
            pipeline.whenAcknowledged(pos) { [self] in
                event(now: monotonicNow()) { m, now, fx in m.claimAcknowledged(seq: seq, now: now, effects: &fx) }
            }
        }
    }

    func failed(_ tokens: [Int]) {
        event(now: monotonicNow()) { m, now, fx in m.claimsRecorded(seqs: tokens, ok: false, now: now, effects: &fx) }
    }
}

extension VoucherRuntime: UserCheckSink {
    /// The per-user checks of one batch: one pass under the lock for all of them.
    func usersChecked(tokens: [Int], results: [Result<QuotaStore.UserCheckOutcome, RedisError>]) {
        let checked = results.map { r -> VoucherMachine.UserCheckResult in
            switch r {
            case .success(.counted): .counted
            case .success(.overLimit): .overLimit
            case .success(.released): .released
            case .failure(.unreachable(let why)): .notSent(why)
            case .failure(let e): .unknown("\(e)")
            }
        }
        event(now: monotonicNow()) { m, now, fx in m.usersChecked(seqs: tokens, results: checked, now: now, effects: &fx) }
    }
}

/// Catches a completion that runs before the call that registered it returns (see `VoucherRuntime.append`).
private final class SynchronousCompletionGate: Sendable {
    private let state = NIOLockedValueBox<(open: Bool, early: (@Sendable () -> Void)?)>((true, nil))

    /// True: the caller has not returned yet; `body` is kept for it to run after its lock is released.
    func catchEarly(_ body: @escaping @Sendable () -> Void) -> Bool {
        state.withLockedValue { s in
            guard s.open else { return false }
            s.early = body
            return true
        }
    }

    /// The registering call returned: later completions run where they come; an early one is returned.
    func close() -> (@Sendable () -> Void)? {
        state.withLockedValue { s in
            s.open = false
            return s.early
        }
    }
}
