import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import QuotaConfig
import QuotaCore
import QuotaRedis
import Metrics
import Synchronization

/// The sidecar's state shared by all connections: the voucher registry, the Redis
/// store, claim ids, counters, and the periodic work (ticks and refreshes).
public final class SidecarEngine: Sendable {
    public let config: SidecarConfig
    public let store: QuotaStore
    let pipeline: ClaimPipeline
    let userChecks: UserCheckBatcher
    /// Claim durations (swift-metrics Timer, Prometheus histogram) when `metrics.listen` is set.
    let claimTimer = NIOLockedValueBox<Metrics.Timer?>(nil)
    let claimBook: ClaimBook
    /// `REQ` answers from the previous run's journal, by voucher, handed to runtimes as they are created.
    private let recoveredReqs = NIOLockedValueBox<[String: [(req: String, claimID: String, expires: Instant)]]>([:])
    let logger: Logger
    let startedAt = Date()
    private let vouchers = NIOLockedValueBox<[String: VoucherRuntime]>([:])
    private let _regionPolicy = NIOLockedValueBox(LeasePolicyOverride())
    private let claimSeq = Atomic<Int>(0)
    private let claimPrefix: String
    private let _draining = Atomic<Bool>(false)

    // Counters outside any voucher.
    let connectionsCurrent = Atomic<Int>(0)
    let connectionsTotal = Atomic<Int>(0)
    let connectionsRefused = Atomic<Int>(0)
    let protocolErrors = Atomic<Int>(0)
    let commandErrors = Atomic<Int>(0)
    let globalRejections = NIOLockedValueBox<[QuotaErrorCode: Int]>([:])
    let redisErrors = Atomic<Int>(0)

    init(config: SidecarConfig, store: QuotaStore, pipeline: ClaimPipeline, logger: Logger) {
        self.config = config
        self.store = store
        self.pipeline = pipeline
        self.userChecks = UserCheckBatcher(store: store)

        self.logger = logger
        // Claim ids: region.host.boot.seq — unique across regions, hosts and restarts
        // (boot = start time in ms, base 36, plus 16 random bits).
        let ms = UInt64(Date().timeIntervalSince1970 * 1000)
        let boot = String(ms, radix: 36) + String(UInt16.random(in: 0...UInt16.max), radix: 36)
        self.claimPrefix = "\(config.region).\(config.hostID).\(boot)."
        self.claimBook = ClaimBook(prefix: claimPrefix, region: config.region, host: config.hostID,
                                   capacity: config.claims.maxTracked)
    }

    var regionPolicy: LeasePolicyOverride { _regionPolicy.withLockedValue { $0 } }
    public var isDraining: Bool { _draining.load(ordering: .relaxed) }

    /// A new claim id and its sequence number (the `UNCLAIM` book is indexed by it).
    func nextClaimID() -> (id: String, seq: Int) {
        let n = claimSeq.wrappingAdd(1, ordering: .relaxed).newValue
        return (claimPrefix + String(n, radix: 36), n)
    }

    func countRejection(_ code: QuotaErrorCode) {
        globalRejections.withLockedValue { $0[code, default: 0] += 1 }
    }

    // MARK: - Requests

    /// Handle `CLAIM` / `AVAIL` for `voucher` (already validated).
    func request(_ req: VoucherRuntime.Request, voucher: String, loop: any EventLoop) -> Outcome {
        if isDraining, case .claim = req {
            countRejection(.unavailable)
            return .now(.error(QuotaError(.unavailable, "draining: this host no longer serves claims")))
        }
        if let rt = vouchers.withLockedValue({ $0[voucher] }) {
            return rt.handle(req, now: monotonicNow(), loop: loop)
        }
        // First request for this voucher (on any event loop): one runtime is created, in `.loading`.
        let created: VoucherRuntime? = vouchers.withLockedValue { map in
            if let r = map[voucher] { return r }
            guard map.count < config.limits.maxVouchers else { return nil }
            let r = VoucherRuntime(id: voucher, engine: self, policy: config.lease)
            map[voucher] = r
            return r
        }
        guard let rt = created else {
            countRejection(.busy)
            return .now(.error(QuotaError(.busy, "too many vouchers tracked by this host")))
        }
        if let reqs = recoveredReqs.withLockedValue({ $0.removeValue(forKey: voucher) }) { rt.restoreDedupe(reqs) }
        let outcome = rt.handle(req, now: monotonicNow(), loop: loop)
        // The request parked for the load: start it (once, however many loops race here).
        if case .later = outcome { rt.startLoadOnce() }
        return outcome
    }

    // MARK: - Recovery

    /// Rebuild the `UNCLAIM` book and `REQ` answers from the journal of the previous run.
    func restore(history: [ClaimEvent]) {
        let nowWall = wallClockMs()
        let now = monotonicNow()
        let window = config.claims.dedupeWindow
        var reqs: [String: [(req: String, claimID: String, expires: Instant)]] = [:]
        for e in history {
            switch e.kind {
            case .claimed:
                claimBook.addRecovered(e)
                if let req = e.req {
                    let age = Duration.milliseconds(max(0, nowWall - e.tsMs))
                    if age < window { reqs[e.voucher, default: []].append((req, e.claimID, now + (window - age))) }
                }
            case .unclaimed: claimBook.markUnclaimed(e.claimID)
            case .intent: break
            }
        }
        recoveredReqs.withLockedValue { $0 = reqs }
    }

    // MARK: - Per-user counts and UNCLAIM

    /// Run an idempotent Redis call in the background until it succeeds (about a minute at most).
    private func retrying(_ what: String, claimID: String, _ op: @escaping @Sendable () async throws(RedisError) -> Void) {
        let logger = self.logger
        Task {
            var delay: Duration = .milliseconds(50)
            for _ in 0..<30 {
                if case .success = await attempt(op) { return }
                try? await Task.sleep(for: delay)
                delay = min(delay * 2, .seconds(2))
            }
            logger.error("\(what) failed; reconciliation must repair it", metadata: ["quota.claim": "\(claimID)"])
        }
    }

    /// Undo a claim's per-user count in Redis (idempotent by claim id); retried in the background.
    func releaseUser(_ e: ClaimEvent) {
        let key = QuotaStore.userGroupKey(voucher: e.voucher, user: e.user, groups: config.perUser.groups)
        let store = self.store
        retrying("per-user count release", claimID: e.claimID) { () async throws(RedisError) in
            _ = try await store.releaseUser(groupKey: key, user: e.user, claimID: e.claimID)
        }
    }

    /// Tokens of a claim that did not complete, whose lease is already closed: back into the pool
    /// (once per claim id); retried in the background.
    func restock(voucher: String, claimID: String, qty: Int) {
        let store = self.store
        retrying("restock", claimID: claimID) { () async throws(RedisError) in
            _ = try await store.restock(voucher: voucher, claimID: claimID, qty: qty)
        }
    }

    /// `UNCLAIM claim-id`.
    func unclaim(_ claimID: String, loop: any EventLoop) -> Outcome {
        let e: ClaimEvent
        switch claimBook.takeForUnclaim(claimID) {
        case .unknown:
            countRejection(.err)
            return .now(.error(QuotaError(.err, "unknown claim id '\(claimID.prefix(80))' (UNCLAIM takes claims made through this host)")))
        case .already:
            return .now(.value(.ok))
        case .take(let ev):
            e = ev
        }
        let cancel = e.cancellation(tsMs: wallClockMs())
        let p = loop.makePromise(of: Reply.self)
        let finish: @Sendable () -> Void = { [self] in
            Task {
                let rt = vouchers.withLockedValue { $0[e.voucher] }
                let local = rt?.unclaimed(e) ?? 0
                if local < e.qty { restock(voucher: e.voucher, claimID: e.claimID, qty: e.qty - local) }
                if config.perUser.mode == .central && (rt?.perUserLimit ?? 1) > 0 {
                    let key = QuotaStore.userGroupKey(voucher: e.voucher, user: e.user, groups: config.perUser.groups)
                    let r = await attempt { () async throws(RedisError) in
                        try await store.releaseUser(groupKey: key, user: e.user, claimID: e.claimID)
                    }
                    if case .failure = r { releaseUser(e) }
                }
                p.succeed(.value(.ok))
            }
        }
        if let journal = pipeline.journal {
            journal.append(.claim(cancel)) { [self] r in
                if case .failure(let err) = r {
                    claimBook.restore(claimID)
                    p.succeed(.error(QuotaError(.unavailable, "cancellation could not be journaled: \(err)")))
                } else {
                    finish()
                }
            }
        } else {
            _ = pipeline.recordClaim(cancel) { _ in }
            finish()
        }
        return .later(p.futureResult)
    }

    // MARK: - Periodic work

    private var runtimes: [VoucherRuntime] { vouchers.withLockedValue { Array($0.values) } }

    /// Fencing, renewals, refills, idle returns, parked-claim timeouts: every `interval`.
    func runTicker(interval: Duration = .milliseconds(50)) async {
        while !Task.isCancelled {
            try? await Task.sleep(for: interval)
            let now = monotonicNow()
            for rt in runtimes { rt.tick(now: now) }
            pipeline.tick()
        }
    }

    /// Pool size, voucher state and lease policy from Redis: every `avail_refresh`.
    func runRefresher() async {
        var lastPolicy = ContinuousClock.now - .seconds(3600)
        while !Task.isCancelled {
            if ContinuousClock.now - lastPolicy >= config.policyRefresh {
                if let p = try? await store.regionPolicy() {
                    _regionPolicy.withLockedValue { $0 = p }
                    lastPolicy = .now
                }
            }
            let ready = runtimes.filter(\.isReady)
            if !ready.isEmpty {
                do {
                    let recs = try await store.vouchers(ready.map(\.id))
                    let now = monotonicNow()
                    let policy = regionPolicy
                    for (rt, rec) in zip(ready, recs) { rt.refreshed(rec, regionPolicy: policy, now: now) }
                } catch {
                    redisErrors.add(1, ordering: .relaxed)
                    logger.debug("refresh failed", metadata: ["error": "\(error)"])
                }
            }
            try? await Task.sleep(for: config.availRefresh)
        }
    }

    // MARK: - Drain

    /// Stop claiming, give back every unused token; waits up to `timeout` for Redis to take them.
    /// Returns the number of vouchers that still hold tokens (0 on success).
    @discardableResult
    public func drain(timeout: Duration = .seconds(10)) async -> Int {
        _draining.store(true, ordering: .relaxed)
        for rt in runtimes { rt.drain() }
        let deadline = ContinuousClock.now + timeout
        while true {
            let unsettled = runtimes.filter { !$0.isSettled }
            if unsettled.isEmpty { return 0 }
            if ContinuousClock.now >= deadline {
                logger.error("tokens could not be returned before the deadline; they stay leased until reclaimed",
                             metadata: ["vouchers": "\(unsettled.map(\.id))"])
                return unsettled.count
            }
            try? await Task.sleep(for: .milliseconds(50))
            for rt in unsettled { rt.retryReturns() }
        }
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
        var total = VoucherCounters()
        var local = 0
        for (_, s) in snaps {
            total.claimsOK += s.counters.claimsOK
            total.tokensServed += s.counters.tokensServed
            total.leasesTaken += s.counters.leasesTaken
            total.tokensLeased += s.counters.tokensLeased
            total.leasesRenewed += s.counters.leasesRenewed
            total.leasesReturned += s.counters.leasesReturned
            total.tokensReturned += s.counters.tokensReturned
            total.leasesFenced += s.counters.leasesFenced
            total.tokensLost += s.counters.tokensLost
            for (k, v) in s.counters.rejected { total.rejected[k, default: 0] += v }
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
            out += "connected_clients:\(connectionsCurrent.load(ordering: .relaxed))\r\n"
            out += "total_connections_received:\(connectionsTotal.load(ordering: .relaxed))\r\n"
            out += "rejected_connections:\(connectionsRefused.load(ordering: .relaxed))\r\n\r\n"
        }
        if on("stats") {
            out += "# Stats\r\n"
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
            out += "redis_commands:\(store.connection.commandsSent)\r\n"
            out += "redis_errors:\(redisErrors.load(ordering: .relaxed))\r\n"
            out += "protocol_errors:\(protocolErrors.load(ordering: .relaxed))\r\n"
            out += "command_errors:\(commandErrors.load(ordering: .relaxed))\r\n"
            let p = pipeline.stats
            out += "journal_backlog_bytes:\(p.journalBacklogBytes)\r\njournal_unshipped_claims:\(p.journalUnshipped)\r\n"
            out += "journal_segments:\(p.journalSegments)\r\njournal_syncs:\(p.syncs)\r\njournal_records_synced:\(p.recordsSynced)\r\n"
            out += "journal_healthy:\(pipeline.journal.map { $0.isHealthy ? 1 : 0 } ?? 1)\r\n"
            out += "kafka_backlog:\(p.inFlight)\r\nkafka_shipped:\(p.shipped)\r\nkafka_delivery_errors:\(p.deliveryErrors)\r\n"
            out += "kafka_down:\(pipeline.kafkaDown ? 1 : 0)\r\n"
            let u = userChecks.stats
            out += "user_check_batches:\(u.batches)\r\nuser_checks:\(u.checks)\r\nclaims_tracked:\(claimBook.count)\r\n\r\n"
        }
        if on("vouchers") {
            out += "# Vouchers\r\n"
            for (id, s) in snaps {
                let rejected = QuotaErrorCode.allCases.filter { s.counters.rejected[$0, default: 0] > 0 }
                    .map { ",rejected_\($0.rawValue)=\(s.counters.rejected[$0]!)" }.joined()
                out += "voucher:\(id):status=\(s.status),ok=\(s.counters.claimsOK),served=\(s.counters.tokensServed),"
                out += "local=\(s.local),pool=\(s.pool),leases=\(s.leases),lease_size=\(s.leaseSize),"
                out += "rate=\(Int(s.rate)),parked=\(s.parked),soldout=\(s.soldOut ? 1 : 0)\(rejected)\r\n"
            }
        }
        return out
    }
}

public enum QuotadVersion {
    public static let string = "0.1.0"
}
