import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import QuotaConfig
import QuotaCore
import QuotaRedis
import Metrics
import QuotaJournal
import Synchronization

/// The sidecar's state shared by all connections: the voucher registry, the Redis
/// store, claim ids, the region's generation, counters, and the periodic work.
public final class SidecarEngine: Sendable {
    public let config: SidecarConfig
    public let store: QuotaStore
    let pipeline: ClaimPipeline
    let userChecks: UserCheckBatcher
    let chores: Chores
    /// Claim durations (swift-metrics Timer, Prometheus histogram) when `metrics.listen` is set.
    let claimTimer = NIOLockedValueBox<Metrics.Timer?>(nil)
    let claimBook: ClaimBook
    /// Borrowing from other regions when this one is sold out (`borrow: true`), else nil.
    let borrower: Borrower?
    /// `REQ` answers from the previous run's journal, by voucher, handed to runtimes as they are created.
    private let recoveredReqs = NIOLockedValueBox<[String: [VoucherMachine.RecoveredAnswer]]>([:])
    let logger: Logger
    let startedAt = Date()
    /// This process's id in claim ids and lease request ids: start time in ms and random bits, base 36.
    let boot: String
    /// Voucher runtimes made so far (each gets its own lease request id prefix).
    private let runtimesMade = Atomic<Int>(0)
    /// `QUOTAD_INJECT_BUG`: a deliberate bug for the chaos checker's self-test, never in production.
    let injectedBug = ProcessInfo.processInfo.environment["QUOTAD_INJECT_BUG"]
    private let vouchers = NIOLockedValueBox<[String: VoucherRuntime]>([:])
    /// Unknown voucher ids answered NOVOUCHER from memory for a while, taking no voucher slot.
    private let unknownVouchers: NIOLockedValueBox<ExpiringSet>
    /// Counters of evicted voucher runtimes, so the process totals never go down.
    private let retired = NIOLockedValueBox(VoucherCounters())
    let vouchersEvicted = Atomic<Int>(0)
    /// The process-wide bound of `REQ` answers (`claims.max_dedupe_entries` / `max_dedupe_bytes`).
    let dedupeBudget: DedupeBudget
    private let _regionPolicy = NIOLockedValueBox(LeasePolicyOverride())
    /// New claim sequence numbers (the `UNCLAIM` book is indexed by them).
    let claimSequence = ClaimSequence()
    /// Every claim id this process makes starts with it (`region.host.boot.`).
    let claimPrefix: String
    private let _draining = Atomic<Bool>(false)
    /// Live sidecars of the region, from the last heartbeat (sizes the default opening lease).
    private let _regionHosts = Atomic<Int>(1)
    /// Recalls received from other hosts (pub/sub) and from refreshes.
    let recallsReceived = Atomic<Int>(0)
    private let clientIDs = Atomic<Int>(0)
    /// The region generation this host adopted (journaled), and why the region is lost, if it is.
    private let region = NIOLockedValueBox<(adopted: String?, lost: String?)>((nil, nil))
    /// `region.lost != nil`, for the claim path (an atomic load instead of a shared lock per claim).
    private let _regionLostFlag = Atomic<Bool>(false)
    /// Bumped after any runtime leaves `vouchers`: a connection's cached runtime is used only while it is
    /// unchanged (``RuntimeCache``), so no claim is served by a runtime that is no longer registered.
    private let registryEpoch = Atomic<Int>(0)

    /// A connection's last voucher runtime, valid while the registry lost no runtime since.
    struct RuntimeCache {
        fileprivate var runtime: VoucherRuntime?
        fileprivate var epoch = 0
        init() {}
    }

    // Counters outside any voucher.
    let connectionsCurrent = Atomic<Int>(0)
    let connectionsTotal = Atomic<Int>(0)
    let connectionsRefused = Atomic<Int>(0)
    let protocolErrors = Atomic<Int>(0)
    /// Places in connections' reply orders waiting for a reply decided later (opened when a claim waits,
    /// closed when its reply comes), and answers the machine gave for a ticket nobody waited for. Both say
    /// where a reply that never reached its client was lost (a claim decided under load whose reply never came:
    /// README, ninth pass).
    let replyPlacesOpen = Atomic<Int>(0)
    let answersWithoutWaiter = Atomic<Int>(0)
    let commandErrors = Atomic<Int>(0)
    let globalRejections = NIOLockedValueBox<[QuotaErrorCode: Int]>([:])
    let redisErrors = Atomic<Int>(0)
    /// Connections whose reading is paused for back-pressure (output over `limits.max_output_bytes`, or
    /// `limits.max_pending_per_connection` commands unanswered), and reply bytes queued to peers that
    /// have not read them (as of each connection's last flush).
    let connectionsPaused = Atomic<Int>(0)
    let backpressurePauses = Atomic<Int>(0)
    let outputBytesPending = Atomic<Int>(0)

    init(config: SidecarConfig, store: QuotaStore, pipeline: ClaimPipeline, boot: String, generation: String?,
         logger: Logger) {
        self.config = config
        self.store = store
        self.pipeline = pipeline
        self.userChecks = UserCheckBatcher(store: store)
        self.chores = Chores(logger: logger)
        self.logger = logger
        self.boot = boot
        // Claim ids: region.host.boot.seq — unique across regions, hosts and restarts.
        self.claimPrefix = "\(config.region).\(config.hostID).\(boot)."
        self.claimBook = ClaimBook(prefix: claimPrefix, region: config.region, host: config.hostID,
                                   capacity: config.claims.maxTracked)
        self.borrower = config.borrow ? Borrower(config: config, home: store, logger: logger) : nil
        region.withLockedValue { $0.adopted = generation }
        dedupeBudget = DedupeBudget(maxEntries: config.claims.maxDedupeEntries, maxBytes: config.claims.maxDedupeBytes)
        unknownVouchers = NIOLockedValueBox(ExpiringSet(capacity: config.limits.maxUnknownVouchers, ttl: .seconds(1)))
    }

    /// A new boot id: start time in ms and 16 random bits, base 36.
    static func newBoot() -> String {
        let ms = UInt64(Date().timeIntervalSince1970 * 1000)
        return String(ms, radix: 36) + String(UInt16.random(in: 0...UInt16.max), radix: 36)
    }

    var regionPolicy: LeasePolicyOverride { _regionPolicy.withLockedValue { $0 } }
    var regionHosts: Int { max(1, _regionHosts.load(ordering: .relaxed)) }
    public var isDraining: Bool { _draining.load(ordering: .relaxed) }

    /// A new connection's id (`CLIENT ID`, `HELLO`).
    func nextClientID() -> Int { clientIDs.wrappingAdd(1, ordering: .relaxed).newValue }

    /// The open connections, for `CLIENT LIST`: each describes itself on its own event loop.
    struct ClientEntry: Sendable {
        let loop: any EventLoop
        let describe: NIOLoopBound<() -> String>
    }
    let clients = NIOLockedValueBox<[Int: ClientEntry]>([:])

    /// `CLIENT LIST`: one line per open connection, in id order, each read on its own event loop.
    func clientList(on loop: any EventLoop) -> EventLoopFuture<String> {
        let entries = clients.withLockedValue { $0 }.sorted { $0.key < $1.key }.map(\.value)
        // Each line's promise is the asking loop's, completed by the connection's loop or, after a second, with
        // nothing (helper-46: a task sent to a loop that has shut down is dropped, and its promise then never
        // completed, holding this reply's place for ever). A second completion is ignored.
        let lines = entries.map { e -> EventLoopFuture<String?> in
            let p = loop.makePromise(of: String?.self)
            e.loop.execute { p.succeed(e.describe.value()) }
            loop.scheduleTask(in: .seconds(1)) { p.succeed(nil) }
            return p.futureResult
        }
        return EventLoopFuture.whenAllComplete(lines, on: loop).map { results in
            results.compactMap { try? $0.get() }.compactMap { $0 }.map { $0 + "\n" }.joined()
        }
    }

    /// Vouchers this host tracks (`DBSIZE`).
    var vouchersTracked: Int { vouchers.withLockedValue { $0.count } }

    func countRejection(_ code: QuotaErrorCode) {
        globalRejections.withLockedValue { $0[code, default: 0] += 1 }
    }

    /// The rules every voucher's claims follow here.
    private var rules: ClaimRules {
        var r = ClaimRules(region: config.region, host: config.hostID, idPrefix: claimPrefix, durability: config.durability)
        r.perUserMode = config.perUser.mode
        r.onUnavailable = config.perUser.onUnavailable
        r.claimTimeout = config.limits.claimTimeout
        r.dedupeWindow = config.claims.dedupeWindow
        r.maxWaiting = config.limits.maxWaitingClaims
        r.maxTrackedUsers = config.claims.maxTracked
        r.tailWait = config.limits.tailWait
        r.dedupeBudget = dedupeBudget
        r.injectedBug = injectedBug
        r.recordsClaims = config.journal.dir != nil || config.kafka.brokers != nil
        r.recordsIntents = config.journal.dir != nil
        return r
    }

    // MARK: - Region generation

    /// Why the region's Redis cannot be trusted (it lost its data), or nil.
    var regionLost: String? { region.withLockedValue { $0.lost } }
    var adoptedGeneration: String? { region.withLockedValue { $0.adopted } }

    /// Why this voucher's record must not be used, or nil.
    func generationProblem(voucher rec: VoucherRecord) -> String? {
        let (adopted, lost) = region.withLockedValue { ($0.adopted, $0.lost) }
        if let lost { return lost }
        if let adopted, rec.generation != adopted {
            return "voucher '\(rec.id)' has generation \(rec.generation), but this host's region generation is \(adopted): "
                + "it was created again after Redis lost its data (see quotactl rehydrate)"
        }
        return nil
    }

    /// Compare the region's generation in Redis with the one this host adopted: adopt it the first
    /// time (journaled before any lease can be requested), fail closed when it changed or vanished, and
    /// adopt a new generation that declares itself the successor of ours (after `quotactl rehydrate`).
    func checkRegion() async {
        guard case .success(let marker) = await attempt({ () async throws(RedisError) in try await store.regionMarker() })
        else { return }
        let adopted = adoptedGeneration
        switch (adopted, marker.generation) {
        case (nil, nil):
            return
        case (nil, let g?):
            if await journalGeneration(g) { region.withLockedValue { $0.adopted = g } }
        case (let a?, let g?) where g == a:
            return
        case (let a?, let g?) where marker.previous == a:
            await adoptSuccessor(g, of: a)
        case (let a?, let g):
            guard regionLost == nil else { return }
            let why = g == nil
                ? "the region's Redis has no region marker, but this host ran on generation \(a): Redis lost its data"
                : "the region's Redis has generation \(g!), but this host ran on generation \(a): Redis lost its data or was replaced"
            region.withLockedValue { $0.lost = why + " (restore it with quotactl rehydrate)" }
            _regionLostFlag.store(true, ordering: .relaxed)
            logger.critical("failing closed for every voucher: \(why)")
            for rt in runtimes { rt.regionLost(why) }
        }
    }

    /// Journal a generation durably (before the next lease request, which is journaled after it).
    private func journalGeneration(_ g: String) async -> Bool {
        await withCheckedContinuation { c in pipeline.append(.generation(g)) { ok, _ in c.resume(returning: ok) } }
    }

    /// The region was rebuilt (`quotactl rehydrate`) as generation `g`, succeeding `old`: adopt it, forget the
    /// voucher runtimes of the old one (they reload), and give back the leases this host held when Redis
    /// lost them, on the journal's word (rehydration recreated them, open and expired, for exactly this).
    private func adoptSuccessor(_ g: String, of old: String) async {
        guard await journalGeneration(g) else { return }
        region.withLockedValue { $0 = (g, nil) }
        _regionLostFlag.store(false, ordering: .relaxed)
        vouchers.withLockedValue { $0.removeAll() }
        registryEpoch.add(1, ordering: .sequentiallyConsistent)
        logger.notice("the region was rehydrated: adopting generation \(g) (succeeds \(old)); serving again")
        guard let dir = config.journal.dir, config.durability != .none else { return }
        let open = JournalRecovery.read(dir: dir).ledger.openAccounts.filter(\.trusted)
        await returnOnJournalWord(open, generation: g)
    }

    /// Return leases as `granted − served` from the journal and journal their close; retried until Redis
    /// answers (cumulative: repeating it changes nothing). Used by recovery and by generation adoption.
    func returnOnJournalWord(_ accounts: [LeaseLedger.Account], generation gen: String) async {
        var open = accounts
        var delay: Duration = .milliseconds(100)
        while !open.isEmpty && !Task.isCancelled {
            var failed: [LeaseLedger.Account] = []
            for l in open {
                let r = await attempt { () async throws(RedisError) in
                    try await store.giveBack(voucher: l.voucher, lease: l.lease, host: config.hostID,
                                             returnedTotal: injectedBug == "double-return" ? l.granted : l.unserved,
                                             close: true, gen: gen)
                }
                switch r {
                case .success(let reply):
                    pipeline.append(.leaseClosed(LeaseClose(
                        voucher: l.voucher, lease: l.lease, region: config.region, host: config.hostID, granted: l.granted,
                        served: l.served, returned: l.unserved, tsMs: wallClockMs())))
                    logger.info("returned a lease on the journal's word", metadata: [
                        "quota.voucher": "\(l.voucher)", "quota.lease": "\(l.lease)", "outcome": "\(reply)"])
                case .failure(.generation(let why)):
                    logger.error("not returning a lease on the journal's word: \(why)",
                                 metadata: ["quota.voucher": "\(l.voucher)", "quota.lease": "\(l.lease)"])
                case .failure: failed.append(l)
                }
            }
            open = failed
            if !open.isEmpty {
                try? await Task.sleep(for: delay)
                delay = min(delay * 2, .seconds(5))
            }
        }
    }

    // MARK: - Requests

    /// Handle `CLAIM` / `AVAIL` for `voucher` (already validated).
    /// `cache`: the caller's last runtime (a connection's), used while it is this voucher's and no runtime
    /// left the registry since, so the hot path takes no engine-wide lock; updated to the one that answered.
    /// With an `address`, a reply not known now goes there (``Outcome/pending``) instead of a promise.
    func request(_ req: VoucherMachine.Request, voucher: String, loop: any EventLoop,
                 cache: inout RuntimeCache, address: ReplyAddress? = nil) -> Outcome {
        if isDraining, case .claim = req {
            countRejection(.unavailable)
            return .now(.error(QuotaError(.unavailable, "draining: this host no longer serves claims")))
        }
        if _regionLostFlag.load(ordering: .relaxed), let lost = regionLost {
            countRejection(.unavailable)
            return .now(.error(QuotaError(.unavailable, lost)))
        }
        let now = monotonicNow()
        // Read before the lookup: a removal after it makes the next claim look up again.
        let epoch = registryEpoch.load(ordering: .sequentiallyConsistent)
        if let rt = cache.runtime, rt.id == voucher, cache.epoch == epoch {
            if let o = rt.handle(req, now: now, loop: loop, address: address) { return o }
        }
        cache.runtime = nil
        while true {
            let now = monotonicNow()
            switch lookup(voucher, now: now) {
            case .full:
                countRejection(.busy)
                return .now(.error(QuotaError(.busy, "too many vouchers tracked by this host (limits.max_vouchers = \(config.limits.maxVouchers))")))
            case .unknown:
                if case .claim = req { countRejection(.novoucher) }
                return .now(.error(QuotaError(.novoucher, "no such voucher '\(voucher)'")))
            case .runtime(let rt):
                if let o = rt.handle(req, now: now, loop: loop, address: address) {
                    cache.runtime = rt
                    cache.epoch = epoch
                    return o
                }
                // Evicted since it was looked up: look again (a new runtime is made).
            }
        }
    }

    /// Claims of one voucher read together on one connection: handled under one taking of the voucher's
    /// lock (the two event loops of a hot voucher otherwise meet on its lock once per claim; issue 13).
    /// The outcomes are in the order of `claims`; with a `box`, claim `i`'s reply, if not known now, goes to
    /// its place `firstSeq + i` there.
    func requestMany(_ claims: [VoucherMachine.Request], voucher: String, loop: any EventLoop,
                     cache: inout RuntimeCache, box: ReplyBox? = nil, firstSeq: Int = 0) -> [Outcome] {
        if claims.count > 1, !isDraining, !_regionLostFlag.load(ordering: .relaxed) {
            let epoch = registryEpoch.load(ordering: .sequentiallyConsistent)
            if let rt = cache.runtime, rt.id == voucher, cache.epoch == epoch,
               let outcomes = rt.handleMany(claims, now: monotonicNow(), loop: loop, box: box, firstSeq: firstSeq) {
                return outcomes
            }
        }
        // One at a time: the first looks the runtime up (and fills the cache), or answers a refusal.
        return claims.enumerated().map { i, c in
            request(c, voucher: voucher, loop: loop, cache: &cache,
                    address: box.map { ReplyAddress(box: $0, seq: firstSeq + i) })
        }
    }

    func request(_ req: VoucherMachine.Request, voucher: String, loop: any EventLoop) -> Outcome {
        var none = RuntimeCache()
        return request(req, voucher: voucher, loop: loop, cache: &none)
    }

    private enum Lookup {
        case runtime(VoucherRuntime)
        /// Redis said it does not know this voucher less than a second ago.
        case unknown
        /// `limits.max_vouchers` runtimes exist.
        case full
    }

    /// A request's runtime: the voucher's own, or a new one unless the id is known to be unknown.
    private func lookup(_ voucher: String, now: Instant) -> Lookup {
        if let rt = vouchers.withLockedValue({ $0[voucher] }) { return .runtime(rt) }
        if unknownVouchers.withLockedValue({ $0.contains(voucher, now: now) }) { return .unknown }
        return runtime(voucher).map { .runtime($0) } ?? .full
    }

    /// Redis does not know `rt`'s voucher: drop the runtime (it holds nothing once its waiters were
    /// answered) and remember the id as unknown for a second, so a flood of unknown ids takes no slot.
    func voucherMissing(_ rt: VoucherRuntime) {
        let now = monotonicNow()
        let dropped = vouchers.withLockedValue { map -> VoucherCounters? in
            guard map[rt.id] === rt, let c = rt.evictIfIdle(now: now) else { return nil }
            map.removeValue(forKey: rt.id)
            return c
        }
        guard let c = dropped else { return }
        registryEpoch.add(1, ordering: .sequentiallyConsistent)
        unknownVouchers.withLockedValue { $0.insert(rt.id, now: now) }
        retire(c)
    }

    /// Drop runtimes that hold nothing and were not used for a while (``VoucherMachine/isEvictable(now:)``).
    func evictIdle(now: Instant) {
        let candidates = runtimes.filter { $0.looksEvictable(now: now) }
        guard !candidates.isEmpty else { return }
        let dropped = vouchers.withLockedValue { map -> [VoucherCounters] in
            var out: [VoucherCounters] = []
            for rt in candidates where map[rt.id] === rt {
                if let c = rt.evictIfIdle(now: now) {
                    map.removeValue(forKey: rt.id)
                    out.append(c)
                }
            }
            return out
        }
        if !dropped.isEmpty { registryEpoch.add(1, ordering: .sequentiallyConsistent) }
        for c in dropped { retire(c) }
    }

    private func retire(_ c: VoucherCounters) {
        vouchersEvicted.add(1, ordering: .relaxed)
        retired.withLockedValue { $0.add(c) }
    }

    var unknownVoucherCount: Int { unknownVouchers.withLockedValue { $0.count } }

    /// Another host found `voucher`'s pool empty while leases were out: give back what is not needed here.
    func recall(voucher: String, from host: String?) {
        guard let rt = vouchers.withLockedValue({ $0[voucher] }) else { return }
        recallsReceived.add(1, ordering: .relaxed)
        rt.recall(from: host)
    }

    /// The voucher's runtime, created on first use (nil: too many vouchers tracked).
    private func runtime(_ voucher: String) -> VoucherRuntime? {
        if let rt = vouchers.withLockedValue({ $0[voucher] }) { return rt }
        let rules = self.rules
        let (rt, new): (VoucherRuntime?, Bool) = vouchers.withLockedValue { map in
            if let r = map[voucher] { return (r, false) }
            guard map.count < config.limits.maxVouchers else { return (nil, false) }
            // Lease request ids must never repeat within a boot: Redis answers a known id with what it got
            // before. A runtime dropped as idle and made again starts its count afresh, so each runtime of
            // a voucher gets its own prefix (the first one keeps the plain `host.boot.`).
            let incarnation = runtimesMade.wrappingAdd(1, ordering: .relaxed).oldValue
            let prefix = incarnation == 0 ? "\(config.hostID).\(boot)." : "\(config.hostID).\(boot).\(String(incarnation, radix: 36))."
            let r = VoucherRuntime(id: voucher, engine: self, policy: config.lease, rules: rules, requestPrefix: prefix)
            map[voucher] = r
            return (r, true)
        }
        if new, let rt {
            // Hand over under the lock that acknowledgements take, so none falls between the two.
            recoveredReqs.withLockedValue { m in
                if let reqs = m.removeValue(forKey: voucher) { rt.restoreDedupe(reqs) }
            }
        }
        return rt
    }

    // MARK: - Recovery

    /// Rebuild the `UNCLAIM` book and `REQ` answers from the journal of the previous run. A `REQ` answers
    /// again only with a claim that stands (not cancelled since), and with `durability: kafka` only once
    /// Kafka has acknowledged it (until then a retry is told `UNAVAILABLE`, never given a second claim).
    func restore(_ rec: JournalRecovery) {
        let nowWall = wallClockMs()
        let now = monotonicNow()
        let window = config.claims.dedupeWindow
        let cancelled = Set(rec.history.filter { $0.kind == .unclaimed }.map(\.claimID))
        var reqs: [String: [VoucherMachine.RecoveredAnswer]] = [:]
        // Journal positions only of the claims a REQ retry must wait for (kafka mode, not acknowledged): a
        // map of every claim cost seconds on a large journal.
        var waiting = Set<String>()
        if config.durability == .kafka {
            for (e, acked) in zip(rec.history, rec.acknowledged) where e.kind == .claimed && e.req != nil && !acked {
                waiting.insert(e.claimID)
            }
        }
        var position: [String: JournalPosition] = [:]
        if !waiting.isEmpty {
            for seg in rec.segments {
                for (i, ev) in seg.events.enumerated() {
                    if case .claim(let e) = ev, e.kind == .claimed, waiting.contains(e.claimID) {
                        position[e.claimID] = JournalPosition(segment: seg.id, index: i)
                    }
                }
            }
        }
        // The book takes the claims in runs; a cancellation is marked after the claims before it.
        var run: [ClaimEvent] = []
        for (e, acked) in zip(rec.history, rec.acknowledged) {
            switch e.kind {
            case .claimed:
                run.append(e)
                guard let req = e.req, !cancelled.contains(e.claimID) else { continue }
                let age = Duration.milliseconds(max(0, nowWall - e.tsMs))
                guard age < window else { continue }
                let waits = config.durability == .kafka && !acked
                reqs[e.voucher, default: []].append(.init(req: req, claimID: e.claimID, expires: now + (window - age),
                                                         awaitingAck: waits))
                if waits, let pos = position[e.claimID] {
                    let voucher = e.voucher
                    pipeline.whenAcknowledged(pos) { [weak self] in self?.acknowledged(voucher: voucher, req: req) }
                }
            case .unclaimed:
                claimBook.addRecovered(run)
                run.removeAll(keepingCapacity: true)
                claimBook.markUnclaimed(e.claimID)
            case .intent: break
            }
        }
        claimBook.addRecovered(run)
        recoveredReqs.withLockedValue { $0 = reqs }
    }

    /// Kafka acknowledged a recovered claim that a `REQ` retry may now be answered with.
    private func acknowledged(voucher: String, req: String) {
        let handed = recoveredReqs.withLockedValue { m -> Bool in
            guard let i = m[voucher]?.firstIndex(where: { $0.req.utf8.elementsEqual(req.utf8) }) else { return true }
            m[voucher]![i].awaitingAck = false
            return false
        }
        if handed { vouchers.withLockedValue { $0[voucher] }?.acknowledged(req: req) }
    }

    // MARK: - Background Redis work (owned, retried, drained at shutdown)

    /// The generation to say for `voucher`: its runtime's, else the region's.
    private func generation(for voucher: String) -> String? {
        vouchers.withLockedValue { $0[voucher] }?.knownGeneration ?? adoptedGeneration
    }

    /// Undo a claim's per-user count in Redis (idempotent by claim id); then journal that it is owed no more.
    func releaseUser(_ e: ClaimEvent) { releaseUser(voucher: e.voucher, user: e.user, claimID: e.claimID) }

    func releaseUser(voucher: String, user: String, claimID: String) {
        let store = self.store
        let groups = config.perUser.groups
        let pipeline = self.pipeline
        chores.submit(Chores.Job(what: "per-user release of claim \(claimID)") {
            let r = await attempt { () async throws(RedisError) in
                try await store.releaseUser(voucher: voucher, user: user, claimID: claimID, groups: groups)
            }
            guard case .success = r else { return .retry("\(r)") }
            pipeline.append(.intentResolved(voucher: voucher, claimID: claimID))
            return .done
        })
    }

    /// A cancellation's pool shares back to the pool, through their leases' records, once per claim id.
    func restock(_ cancel: ClaimEvent) {
        let store = self.store
        let host = config.hostID
        let shares = cancel.shares.enumerated().filter { cancel.sharesToPool($0.offset) }.map(\.element)
        guard !shares.isEmpty else { return }
        let logger = self.logger
        let pipeline = self.pipeline
        let done = JournalRecord.restocked(voucher: cancel.voucher, claimID: cancel.claimID)
        chores.submit(Chores.Job(what: "restock of claim \(cancel.claimID)") { [self] in
            guard let gen = generation(for: cancel.voucher) else { return .retry("region generation not known yet") }
            let r = await attempt { () async throws(RedisError) in
                try await store.restock(voucher: cancel.voucher, claimID: cancel.claimID, tsMs: cancel.tsMs, host: host,
                                        gen: gen, shares: shares)
            }
            switch r {
            case .success(.tooOld):
                logger.error("restock refused: the cancellation is older than the restock horizon; reconciliation must repair it",
                             metadata: ["quota.claim": "\(cancel.claimID)"])
                pipeline.append(done)
                return .done
            case .success(let reply):
                pipeline.append(done)
                // The pool is not empty now: a claim here need not wait for the next refresh to lease again.
                if case .applied(let n) = reply, n > 0 { vouchers.withLockedValue { $0[cancel.voucher] }?.restocked(tokens: n) }
                return .done
            case .failure(.generation(let why)):
                logger.error("restock refused: \(why)", metadata: ["quota.claim": "\(cancel.claimID)"])
                return .done
            case .failure(let e): return .retry("\(e)")
            }
        })
    }

    /// `UNCLAIM claim-id`.
    func unclaim(_ claimID: String, loop: any EventLoop) -> Outcome {
        if let lost = regionLost {
            countRejection(.unavailable)
            return .now(.error(QuotaError(.unavailable, lost)))
        }
        if let busy = chores.refusal(limit: config.limits.maxBackgroundJobs) {
            countRejection(.busy)
            return .now(.error(busy))
        }
        switch claimBook.takeForUnclaim(claimID) {
        case .unknown:
            countRejection(.err)
            return .now(.error(QuotaError(.err, "unknown claim id '\(claimID.prefix(80))' (UNCLAIM takes claims made through this host)")))
        case .already:
            return .now(.value(.ok))
        case .inProgress:
            // The first may still fail and put the claim back: not +OK yet (helper-43).
            countRejection(.unavailable)
            return .now(.error(QuotaError(.unavailable, "an UNCLAIM of this claim is not yet durable; retry")))
        case .take(let e):
            let o = unclaimTaken(e, loop: loop)
            switch o {
            case .later(let f): f.whenComplete { [claimBook] _ in claimBook.unclaimEnded(claimID) }
            default: claimBook.unclaimEnded(claimID)
            }
            return o
        }
    }

    private func unclaimTaken(_ e: ClaimEvent, loop: any EventLoop) -> Outcome {
        while true {
            guard let rt = runtime(e.voucher) else {
                claimBook.restore(e.claimID)
                countRejection(.busy)
                return .now(.error(QuotaError(.busy, "too many vouchers tracked by this host")))
            }
            if let o = rt.unclaim(e, loop: loop) { return o }
        }
    }

    // MARK: - Periodic work

    private var runtimes: [VoucherRuntime] { vouchers.withLockedValue { Array($0.values) } }

    /// Fencing, renewals, refills, idle returns, claim timeouts: every `interval`.
    func runTicker(interval: Duration = .milliseconds(50)) async {
        var lastEviction = monotonicNow()
        while !Task.isCancelled {
            try? await Task.sleep(for: interval)
            let now = monotonicNow()
            for rt in runtimes { rt.tick(now: now) }
            pipeline.tick()
            if now - lastEviction >= .seconds(1) {
                lastEviction = now
                evictIdle(now: now)
            }
        }
    }

    /// Region generation, pool size, voucher state and lease policy from Redis: every `avail_refresh`.
    func runRefresher() async {
        var lastPolicy = ContinuousClock.now - .seconds(3600)
        while !Task.isCancelled {
            await checkRegion()
            if ContinuousClock.now - lastPolicy >= config.policyRefresh {
                if let p = try? await store.regionPolicy() {
                    _regionPolicy.withLockedValue { $0 = p }
                    lastPolicy = .now
                }
            }
            if regionLost == nil, !isDraining {
                // Alive in the region; vouchers the operator listed to warm take their opening lease.
                switch await attempt({ () async throws(RedisError) in
                    try await store.heartbeat(host: config.hostID, warmup: config.lease.warmup)
                }) {
                case .success(let hb):
                    _regionHosts.store(max(1, hb.hosts), ordering: .relaxed)
                    for v in hb.warm where QuotaStore.isValidVoucherID(v) { runtime(v)?.warm() }
                case .failure(let e):
                    logger.debug("heartbeat failed", metadata: ["error": "\(e)"])
                }
            }
            let ready = runtimes.filter(\.isReady)
            if !ready.isEmpty && regionLost == nil {
                do {
                    let highWater = ready.map(\.leaseHighWater)
                    var rates: [String: Double] = [:]
                    for rt in ready { if let r = rt.claimRate, r > 0 { rates[rt.id] = r } }
                    let sentAt = monotonicNow()
                    let (recs, redisNow) = try await store.vouchersWithClock(ready.map(\.id), host: config.hostID, rates: rates)
                    let now = monotonicNow()
                    let policy = regionPolicy
                    for ((rt, rec), hw) in zip(zip(ready, recs), highWater) {
                        rt.refreshed(rec, regionPolicy: policy, highWater: hw, redisNowMs: redisNow, sentAt: sentAt, now: now)
                    }
                } catch {
                    redisErrors.add(1, ordering: .relaxed)
                    logger.debug("refresh failed", metadata: ["error": "\(error)"])
                }
            }
            try? await Task.sleep(for: config.availRefresh)
        }
    }

    // MARK: - Drain

    /// Stop claiming, let claims in flight settle, give back every unused token, finish owed Redis work;
    /// waits up to `timeout` for Redis to take it all. Returns what is left, described (empty on success).
    @discardableResult
    public func drain(timeout: Duration = .seconds(10)) async -> [String] {
        _draining.store(true, ordering: .relaxed)
        for rt in runtimes { rt.drain() }
        let deadline = ContinuousClock.now + timeout
        while true {
            let unsettled = runtimes.filter { !$0.isSettled }
            if unsettled.isEmpty { break }
            if ContinuousClock.now >= deadline {
                return unsettled.map(\.unsettledDescription)
            }
            try? await Task.sleep(for: .milliseconds(50))
            for rt in unsettled { rt.retryReturns() }
        }
        return await chores.drain(timeout: max(.milliseconds(100), deadline - ContinuousClock.now))
    }

    // MARK: - INFO and metrics

    struct Statistics {
        struct Voucher {
            var id: String
            var local: Int
            var leaseSize: Int
        }
        var totals: VoucherCounters
        var local: Int
        var vouchers: [Voucher]
        var redisCommands: Int
        var redisErrors: Int
        var pipeline: ClaimPipeline.Stats
        var journalHealthy: Bool
        var kafkaDown: Bool
        var connections: Int
    }

    /// The counters INFO and the metrics endpoint show, summed over vouchers.
    func statistics() -> Statistics {
        let (total, local, snaps) = totals()
        return Statistics(
            totals: total, local: local,
            vouchers: snaps.map { Statistics.Voucher(id: $0.0, local: $0.1.local, leaseSize: $0.1.leaseSize) },
            redisCommands: store.connection.commandsSent, redisErrors: redisErrors.load(ordering: .relaxed),
            pipeline: pipeline.stats, journalHealthy: pipeline.journal?.isHealthy ?? true, kafkaDown: pipeline.kafkaDown,
            connections: connectionsCurrent.load(ordering: .relaxed))
    }

    private func totals() -> (VoucherCounters, Int, [(String, VoucherRuntime.Snapshot)]) {
        let now = monotonicNow()
        let snaps = runtimes.compactMap { rt in rt.snapshot(now: now).map { (rt.id, $0) } }.sorted { $0.0 < $1.0 }
        var total = retired.withLockedValue { $0 }
        var local = 0
        for (_, s) in snaps {
            total.add(s.counters)
            local += s.local
        }
        for (k, v) in globalRejections.withLockedValue({ $0 }) { total.rejected[k, default: 0] += v }
        return (total, local, snaps)
    }

    public func info(section: String?) -> String {
        let (total, local, snaps) = totals()
        let want = section?.lowercased()
        func on(_ s: String) -> Bool { want == nil || want == "all" || want == "everything" || want == s }
        var out = ""
        if on("server") {
            out += "# Server\r\n"
            out += "quotad_version:\(QuotadVersion.string)\r\n"
            out += "host_id:\(config.hostID)\r\nregion:\(config.region)\r\n"
            out += "process_id:\(getpid())\r\n"
            out += "uptime_seconds:\(Int(Date().timeIntervalSince(startedAt)))\r\n"
            out += "durability:\(config.durability.rawValue)\r\n"
            out += "draining:\(isDraining ? 1 : 0)\r\n"
            out += "redis:\(store.connection.endpoint)\r\n\r\n"
        }
        if on("clients") {
            out += "# Clients\r\n"
            out += "connected_clients:\(connectionsCurrent.load(ordering: .relaxed))\r\nblocked_clients:0\r\n"
            out += "total_connections_received:\(connectionsTotal.load(ordering: .relaxed))\r\n"
            out += "rejected_connections:\(connectionsRefused.load(ordering: .relaxed))\r\n\r\n"
        }
        if on("stats") {
            out += "# Stats\r\n"
            // What redis-cli --stat reads, in Redis's names.
            let requests = total.claimsOK + total.rejected.values.reduce(0, +) + commandErrors.load(ordering: .relaxed)
            out += "total_commands_processed:\(requests)\r\n"
            out += "used_memory:\(Self.residentBytes())\r\n"
            out += "claims_ok:\(total.claimsOK)\r\n"
            for code in QuotaErrorCode.allCases where code != .err {
                out += "claims_\(code.rawValue):\(total.rejected[code, default: 0])\r\n"
            }
            out += "tokens_served:\(total.tokensServed)\r\n"
            out += "tokens_local:\(local)\r\n"
            out += "leases_taken:\(total.leasesTaken)\r\ntokens_leased:\(total.tokensLeased)\r\n"
            out += "leases_renewed:\(total.leasesRenewed)\r\n"
            out += "leases_returned:\(total.leasesReturned)\r\ntokens_returned:\(total.tokensReturned)\r\n"
            out += "leases_fenced:\(total.leasesFenced)\r\ntokens_lost_to_expiry:\(total.tokensLost)\r\n"
            out += "stock_consolidations:\(total.consolidations)\r\n"
            out += "claims_waited_for_lease:\(total.claimsWaited)\r\n"
            out += "redis_commands:\(store.connection.commandsSent)\r\n"
            out += "redis_errors:\(redisErrors.load(ordering: .relaxed))\r\n"
            out += "protocol_errors:\(protocolErrors.load(ordering: .relaxed))\r\n"
            out += "command_errors:\(commandErrors.load(ordering: .relaxed))\r\n"
            let p = pipeline.stats
            out += "journal_backlog_bytes:\(p.journalBacklogBytes)\r\njournal_unshipped_claims:\(p.journalUnshipped)\r\n"
            out += "journal_segments:\(p.journalSegments)\r\njournal_syncs:\(p.syncs)\r\njournal_records_synced:\(p.recordsSynced)\r\n"
            out += "journal_healthy:\(pipeline.journal.map { $0.isHealthy ? 1 : 0 } ?? 1)\r\n"
            out += "kafka_backlog:\(p.inFlight)\r\nkafka_shipped:\(p.shipped)\r\nkafka_delivery_errors:\(p.deliveryErrors)\r\n"
            out += "kafka_early_acks:\(p.earlyAcks)\r\n"
            // 0: no kafka section: this host's claims never reach Kafka or the ledger (see quotactl rehydrate).
            out += "kafka_enabled:\(config.kafka.brokers == nil ? 0 : 1)\r\n"
            out += "kafka_down:\(pipeline.kafkaDown ? 1 : 0)\r\nkafka_producer_recreations:\(p.recreations)\r\n"
            let c = chores.stats
            out += "background_jobs:\(c.outstanding)\r\nbackground_jobs_done:\(c.completed)\r\nbackground_retries:\(c.retries)\r\n"
            out += "redis_late_replies:\(store.connection.lateReplies)\r\n"
            out += "reply_places_open:\(replyPlacesOpen.load(ordering: .relaxed))\r\n"
            out += "answers_without_waiter:\(answersWithoutWaiter.load(ordering: .relaxed))\r\n"
            out += "region_generation:\(adoptedGeneration ?? "")\r\nregion_lost:\(regionLost == nil ? 0 : 1)\r\n"
            out += "region_hosts:\(regionHosts)\r\nrecalls_received:\(recallsReceived.load(ordering: .relaxed))\r\n"
            if let b = borrower {
                out += "borrowed_tokens:\(b.tokensBorrowed.load(ordering: .relaxed))\r\n"
                    + "borrow_transfers:\(b.transfers.load(ordering: .relaxed))\r\n"
                    + "borrow_failures:\(b.failures.load(ordering: .relaxed))\r\n"
            }
            let u = userChecks.stats
            out += "user_check_batches:\(u.batches)\r\nuser_checks:\(u.checks)\r\nclaims_tracked:\(claimBook.count)\r\n\r\n"
        }
        if on("limits") {
            // Every bound a peer could push against: current totals next to their bounds.
            let l = config.limits
            out += "# Limits\r\n"
            out += "connections:\(connectionsCurrent.load(ordering: .relaxed))\r\nmax_connections:\(l.maxConnections)\r\n"
            out += "connections_paused:\(connectionsPaused.load(ordering: .relaxed))\r\n"
            out += "backpressure_pauses:\(backpressurePauses.load(ordering: .relaxed))\r\n"
            out += "output_bytes_pending:\(max(0, outputBytesPending.load(ordering: .relaxed)))\r\n"
            out += "max_output_bytes:\(l.maxOutputBytes)\r\nmax_pending_per_connection:\(l.maxPendingPerConnection)\r\n"
            out += "vouchers_tracked:\(vouchersTracked)\r\nmax_vouchers:\(l.maxVouchers)\r\n"
            out += "vouchers_evicted:\(vouchersEvicted.load(ordering: .relaxed))\r\n"
            out += "unknown_vouchers_cached:\(unknownVoucherCount)\r\nmax_unknown_vouchers:\(l.maxUnknownVouchers)\r\n"
            out += "dedupe_entries:\(dedupeBudget.entries)\r\nmax_dedupe_entries:\(dedupeBudget.maxEntries)\r\n"
            out += "dedupe_bytes:\(dedupeBudget.bytes)\r\nmax_dedupe_bytes:\(dedupeBudget.maxBytes)\r\n"
            out += "dedupe_refused:\(dedupeBudget.refused)\r\n"
            out += "claims_tracked:\(claimBook.count)\r\nmax_tracked_claims:\(config.claims.maxTracked)\r\n"
            out += "claims_tracked_spread:\(claimBook.spreadCount)\r\nclaim_book_vouchers:\(claimBook.voucherCount)\r\n"
            out += "max_waiting_claims_per_voucher:\(l.maxWaitingClaims)\r\n"
            out += "background_jobs:\(chores.outstanding)\r\nmax_background_jobs:\(l.maxBackgroundJobs)\r\n\r\n"
        }
        if on("keyspace") {
            out += "# Keyspace\r\ndb0:keys=\(snaps.count),expires=0,avg_ttl=0\r\n\r\n"
        }
        if on("vouchers") {
            // One line per voucher, `voucherN:id=ID,k=v,...` like Redis's `db0:keys=…`, so that Redis clients'
            // INFO parsers keep each line (a voucher id may contain ':', a key must not).
            out += "# Vouchers\r\n"
            for (n, (id, s)) in snaps.enumerated() {
                let rejected = QuotaErrorCode.allCases.filter { s.counters.rejected[$0, default: 0] > 0 }
                    .map { ",rejected_\($0.rawValue)=\(s.counters.rejected[$0]!)" }.joined()
                out += "voucher\(n):id=\(id),status=\(s.status),ok=\(s.counters.claimsOK),served=\(s.counters.tokensServed),"
                out += "local=\(s.local),pool=\(s.pool),leases=\(s.leases),lease_size=\(s.leaseSize),"
                out += "rate=\(Int(s.rate)),parked=\(s.parked),inflight=\(s.inFlight),soldout=\(s.soldOut ? 1 : 0),"
                out += "tail=\(s.tail ? 1 : 0),start_ms=\(s.schedule.startMs),end_ms=\(s.schedule.endMs)\(rejected)\r\n"
            }
        }
        return out
    }
}

extension SidecarEngine {
    /// This process's resident memory, bytes (from /proc/self/statm).
    static func residentBytes() -> Int {
        guard let text = try? String(contentsOfFile: "/proc/self/statm", encoding: .utf8) else { return 0 }
        let fields = text.split(separator: " ")
        guard fields.count > 1, let pages = Int(fields[1]) else { return 0 }
        return pages * Int(sysconf(Int32(_SC_PAGESIZE)))
    }
}

public enum QuotadVersion {
    public static let string = "0.1.0"
}

/// The process's claim sequence numbers, in an object of their own: each voucher's machine holds it strongly and
/// takes a number for every claim without going through the engine (an `unowned` engine reference there was an
/// atomic strong retain and a release a claim; issue 13).
final class ClaimSequence: Sendable {
    private let n = Atomic<Int>(0)
    func next() -> Int { n.wrappingAdd(1, ordering: .relaxed).newValue }
}
