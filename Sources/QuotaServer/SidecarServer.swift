import Foundation
import Glibc
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import QuotaConfig
import QuotaCore
import QuotaJournal
import QuotaRESP
import QuotaRedis
import ServiceLifecycle

/// The `quotad` service: binds the Unix socket, runs the periodic work, and on
/// graceful shutdown stops accepting, answers what is in flight, and returns every
/// unused token before it ends.
public final class SidecarService: Service, Sendable {
    public let engine: SidecarEngine
    private let group: MultiThreadedEventLoopGroup
    private let logger: Logger
    /// What the journal held at start; after ``run()`` restored from it, only its books (the events of a large
    /// journal, every claim of the retention window, are not kept for the process's life).
    private let recovered: NIOLockedValueBox<JournalRecovery?>
    private let socketLock: Int32
    /// The previous run's recovery (``recoverPreviousRun()``) finished: a graceful stop waits for it.
    private let recoveryDone = NIOLockedValueBox(false)

    public init(config: SidecarConfig, logger: Logger) throws {
        // One process per socket: a lock next to it for our whole life, and never unlink a live socket.
        socketLock = try Self.lockSocket(config.socket.path)
        let store: QuotaStore
        do {
            store = try QuotaStore(url: config.redisURL, timeout: config.redisTimeout, logger: logger)
        } catch {
            close(socketLock)
            throw error
        }
        // Read what the journal says before anything new is written to it.
        let rec = config.journal.dir.map { JournalRecovery.read(dir: $0) }
        if let rec {
            for t in rec.tornTails { logger.notice("journal: \(t)") }
            for i in rec.issues { logger.error("journal corruption: \(i)") }
            if !rec.leaseStateTrusted {
                logger.error("journal: lease state not trusted (corrupt newest segment); leases of the previous run stay leased until reconciled")
            }
        }
        self.recovered = NIOLockedValueBox(rec)
        let boot = SidecarEngine.newBoot()
        let pipeline: ClaimPipeline
        do {
            pipeline = try ClaimPipeline(
                config: config, recovered: rec,
                boot: JournalBoot(boot: boot, host: config.hostID, durability: config.durability.rawValue, tsMs: wallClockMs()),
                logger: logger)
        } catch {
            store.connection.close()
            close(socketLock)
            throw error
        }
        self.engine = SidecarEngine(config: config, store: store, pipeline: pipeline, boot: boot,
                                    generation: rec?.ledger.generation, logger: logger)
        let threads = config.eventLoops > 0 ? config.eventLoops : System.coreCount
        self.group = MultiThreadedEventLoopGroup(numberOfThreads: threads)
        self.logger = logger
    }

    /// `flock` `<socket>.lock`, and refuse a socket path another live process answers on.
    private static func lockSocket(_ path: String) throws -> Int32 {
        let dir = (path as NSString).deletingLastPathComponent
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let f = open(path + ".lock", O_RDWR | O_CREAT | O_CLOEXEC, 0o640)
        guard f >= 0 else { throw QuotaError(.err, "cannot open \(path).lock: \(String(cString: strerror(errno)))") }
        if flock(f, LOCK_EX | LOCK_NB) != 0 {
            close(f)
            throw QuotaError(.err, "socket.path \(path) is in use by another quotad (its lock \(path).lock is held)")
        }
        if FileManager.default.fileExists(atPath: path), PeerCredentials.somethingListens(at: path) {
            close(f)
            throw QuotaError(.err, "socket.path \(path) is in use: another process answers on it; not removing it")
        }
        return f
    }

    public func run() async throws {
        let config = engine.config
        if let bug = engine.injectedBug {
            logger.critical("QUOTAD_INJECT_BUG=\(bug): a deliberate bug for the chaos checker's self-test. This process can oversell.")
        }
        try await checkRedisDurability()
        // Learn (or check) the region's generation before the first claim can ask for a lease.
        await engine.checkRegion()
        var metricsChannel: (any Channel)?
        if let (host, port) = config.metricsListen {
            let exporter = MetricsExporter(engine: engine)
            engine.claimTimer.withLockedValue { $0 = exporter.claimTimer }
            metricsChannel = try await exporter.serve(host: host, port: port, group: group)
            logger.info("metrics on http://\(host):\(port)/metrics")
        }
        // The previous run's REQ answers and UNCLAIM book before the socket opens: a request retried the
        // moment it opens must get its first answer, not a second claim.
        if let rec = recovered.withLockedValue({ $0 }) {
            engine.restore(rec)
            engine.pipeline.reship(rec)
            let n = rec.segments.reduce(0) { $0 + $1.toShip.count }
            if n > 0 { logger.info("journal: shipping events of the previous run again", metadata: ["events": "\(n)"]) }
            var books = JournalRecovery()
            books.ledger = rec.ledger
            books.leaseStateTrusted = rec.leaseStateTrusted
            books.issues = rec.issues
            recovered.withLockedValue { $0 = books }
        }
        let channel = try await bind()
        logger.info("quotad listening", metadata: [
            "socket": "\(config.socket.path)", "region": "\(config.region)", "host": "\(config.hostID)",
            "redis": "\(engine.store.connection.endpoint)", "boot": "\(engine.boot)",
        ])
        let chores = Task { await engine.chores.run() }
        let recovery = Task { await recoverPreviousRun() }
        let ticker = Task { await engine.runTicker() }
        let refresher = Task { await engine.runRefresher() }
        let recalls = RecallSubscriber(endpoint: engine.store.connection.endpoint, host: engine.config.hostID, logger: logger) { [engine] voucher, from in
            engine.recall(voucher: voucher, from: from)
        }

        // Runs until SIGTERM/SIGINT (or the service group is cancelled).
        try? await gracefulShutdown()

        logger.info("shutting down: closing the socket, returning tokens")
        try? await channel.close()
        try? await metricsChannel?.close()
        recalls.stop()
        let bound = Duration.seconds(10)
        let deadline = ContinuousClock.now + bound
        var left = await engine.drain(timeout: bound)
        // The previous run's recovery is owed work too: a lease request whose answer was never seen may
        // have been granted, and only this journal can name it. It gets the rest of the same bound (it
        // retries until Redis answers); cancelled only when that runs out, and then named as work not done.
        while !recoveryDone.withLockedValue({ $0 }) && ContinuousClock.now < deadline {
            try? await Task.sleep(for: .milliseconds(20))
        }
        if !recoveryDone.withLockedValue({ $0 }) {
            recovery.cancel()
            left.append("recovery of the previous run (lease requests to resolve, leases to return on the journal's word)")
        }
        _ = await recovery.value
        // What the recovery owed besides (restocks, per-user releases) may have been queued after the drain.
        if recoveryDone.withLockedValue({ $0 }) {
            left += await engine.chores.drain(timeout: max(.milliseconds(100), deadline - ContinuousClock.now))
        }
        ticker.cancel()
        refresher.cancel()
        chores.cancel()
        _ = await chores.value
        // The ticker's last round may recreate the Kafka producer: it ends before the pipeline closes (helper-44).
        _ = await ticker.value
        engine.pipeline.close(flushTimeout: config.kafka.flushTimeout)
        try? await Task.sleep(for: .milliseconds(50))
        try? FileManager.default.removeItem(atPath: config.socket.path)
        engine.store.connection.close()
        try? await group.shutdownGracefully()
        close(socketLock)
        if left.isEmpty {
            logger.info("all unused tokens returned; bye")
        } else {
            logger.error("exiting with work not done: it stays leased (or owed) until this host restarts or reconciliation repairs it",
                         metadata: ["left": "\(left.joined(separator: "; "))"])
        }
    }

    /// `redis.require_durable`: refuse a Redis that can forget acknowledged leases. When Redis cannot be
    /// reached now, the sidecar starts (and fails closed) and the check is not repeated.
    private func checkRedisDurability() async throws {
        guard engine.config.requireDurableRedis else { return }
        let r = await attempt { () async throws(RedisError) in try await engine.store.durabilityProblems() }
        switch r {
        case .success(let problems) where !problems.isEmpty:
            let what = problems.map { "\($0.0) is '\($0.1)'" }.joined(separator: ", ")
            throw QuotaError(.err, "config key 'redis.require_durable': Redis at \(engine.store.connection.endpoint) "
                + "can lose acknowledged leases (\(what)); quotad needs appendonly yes and appendfsync always. "
                + "Fix Redis, or set redis.require_durable: false to accept the risk of overselling after a Redis crash")
        case .success:
            return
        case .failure(.server(let e)):
            throw QuotaError(.err, "config key 'redis.require_durable': cannot read Redis's persistence settings "
                + "(CONFIG GET: \(e)); set redis.require_durable: false if CONFIG is disabled and Redis is durable")
        case .failure(let e):
            logger.warning("cannot check Redis persistence now (\(e)); continuing, claims fail closed until Redis answers")
        }
    }

    /// Settle what the previous run left, on the journal's word (docs/accounting.md, "After a crash"):
    /// lease requests whose answer was never seen are resolved (a lease granted unseen is returned in
    /// full: nothing can have been served from it); open leases written under a durable mode are
    /// returned as `granted - served`; restocks of cancellations are sent again; per-user counts of
    /// claims that never completed are released. Every step is idempotent, so a repeat after another
    /// crash changes nothing.
    private func recoverPreviousRun() async {
        await recoverPreviousRunSteps()
        if !Task.isCancelled { recoveryDone.withLockedValue { $0 = true } }
    }

    private func recoverPreviousRunSteps() async {
        guard let rec = recovered.withLockedValue({ $0 }) else { return }
        let host = engine.config.hostID
        let gen = rec.ledger.generation ?? engine.adoptedGeneration ?? ""
        let store = engine.store
        let pipeline = engine.pipeline
        // Owed work is in the books (and in the new journal's snapshots) until Redis has it.
        let releases = rec.ledger.owedReleases.values.sorted { $0.claimID < $1.claimID }
        if rec.issues.isEmpty {
            for r in releases { engine.releaseUser(voucher: r.voucher, user: r.user, claimID: r.claimID) }
        } else if !releases.isEmpty {
            logger.error("journal: not releasing per-user counts of \(releases.count) unfinished claims: the journal is corrupt")
        }
        for e in rec.ledger.owedRestocks.values.sorted(by: { $0.claimID < $1.claimID }) { engine.restock(e) }
        guard rec.leaseStateTrusted else { return }
        // Lease requests never answered in the journal: learn what they got (or make sure they get nothing).
        var requests = rec.ledger.requests.map { (req: $0.key, voucher: $0.value) }
        var found: [LeaseLedger.Account] = []
        let untrusted = rec.openLeases.filter { !$0.trusted }
        if !untrusted.isEmpty {
            logger.warning("leases written under durability: none are not returned on the journal's word; reconciliation reclaims them",
                           metadata: ["leases": "\(untrusted.map { "\($0.voucher)/\($0.lease)" })"])
        }
        var delay: Duration = .milliseconds(100)
        while !requests.isEmpty && !Task.isCancelled {
            var pending: [(req: String, voucher: String)] = []
            for r in requests {
                let result = await attempt { () async throws(RedisError) in
                    try await store.lease(voucher: r.voucher, host: host, req: r.req, want: 0, need: 0, ttl: .seconds(1), gen: gen)
                }
                switch result {
                case .success(.granted(let g)) where g.granted > 0:
                    pipeline.append(.leaseGranted(LeaseGrantRecord(
                        voucher: r.voucher, lease: g.id, granted: g.granted, req: r.req, region: engine.config.region,
                        host: host, durability: engine.config.durability.rawValue, tsMs: wallClockMs())))
                    found.append(LeaseLedger.Account(voucher: r.voucher, lease: g.id, granted: g.granted, served: 0))
                    logger.info("found a lease granted to a request of the previous run whose answer was lost",
                                metadata: ["quota.voucher": "\(r.voucher)", "quota.lease": "\(g.id)", "tokens": "\(g.granted)"])
                case .success:
                    pipeline.append(.leaseAnswered(voucher: r.voucher, req: r.req))
                case .failure(.generation(let why)):
                    logger.error("not resolving a lease request of the previous run: \(why)")
                case .failure:
                    pending.append(r)
                }
            }
            requests = pending
            if !requests.isEmpty {
                try? await Task.sleep(for: delay)
                delay = min(delay * 2, .seconds(5))
            }
        }
        await engine.returnOnJournalWord(rec.openLeases.filter(\.trusted) + found, generation: gen)
    }

    private func bind() async throws -> any Channel {
        let config = engine.config
        let dir = (config.socket.path as NSString).deletingLastPathComponent
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let engine = self.engine
        let limits = RESPLimits(
            maxArguments: config.limits.maxArguments, maxArgumentBytes: config.limits.maxArgumentBytes,
            maxInlineBytes: config.limits.maxArgumentBytes, maxFrameBytes: config.limits.maxFrameBytes)
        let ownUID = getuid()
        let channel = try await ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.backlog, value: 1024)
            .childChannelOption(ChannelOptions.maxMessagesPerRead, value: 16)
            // Back-pressure: a connection whose peer has not read this much output stops being read.
            .childChannelOption(ChannelOptions.writeBufferWaterMark, value: ChannelOptions.Types.WriteBufferWaterMark(
                low: config.limits.maxOutputBytes / 2, high: config.limits.maxOutputBytes))
            .childChannelInitializer { channel in
                PeerCredentials.of(channel).flatMapThrowing { cred in
                    engine.connectionsTotal.add(1, ordering: .relaxed)
                    let n = engine.connectionsCurrent.add(1, ordering: .relaxed).newValue
                    let refusal: String?
                    if n > config.limits.maxConnections {
                        refusal = "BUSY too many connections (limits.max_connections = \(config.limits.maxConnections))"
                    } else if let why = cred.refusal(allowedUIDs: config.socket.allowedUIDs,
                                                     allowedGIDs: config.socket.allowedGIDs) {
                        refusal = "NOPERM \(why)"
                    } else {
                        refusal = nil
                    }
                    let isAdmin = cred.uid == 0 || cred.uid == ownUID || config.socket.adminUIDs.contains(cred.uid ?? .max)
                    // The handler decodes commands itself, one at a time, so that it can stop under back-pressure.
                    try channel.pipeline.syncOperations.addHandler(
                        ConnectionHandler(engine: engine, isAdmin: isAdmin, limits: limits, refusal: refusal))
                    if refusal != nil {
                        // A refused peer is told why at every command, and closed after 10 s at most.
                        engine.connectionsRefused.add(1, ordering: .relaxed)
                        channel.eventLoop.scheduleTask(in: .seconds(10)) { channel.close(promise: nil) }
                    }
                }
            }
            .bind(unixDomainSocketPath: config.socket.path, cleanupExistingSocketFile: true)  // checked at start: not live
            .get()
        guard chmod(config.socket.path, mode_t(config.socket.mode)) == 0 else {
            throw QuotaError(.err, "cannot chmod \(config.socket.path) to \(String(config.socket.mode, radix: 8))")
        }
        return channel
    }
}
