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

    private let recovered: JournalRecovery?

    public init(config: SidecarConfig, logger: Logger) throws {
        let store = try QuotaStore(url: config.redisURL, timeout: config.redisTimeout, logger: logger)
        // Read what the journal says before anything new is written to it.
        let rec = config.journal.dir.map { JournalRecovery.read(dir: $0) }
        if let rec {
            for t in rec.tornTails { logger.notice("journal: \(t)") }
            for i in rec.issues { logger.error("journal corruption: \(i)") }
            if !rec.leaseStateTrusted {
                logger.error("journal: lease state not trusted (corrupt newest segment); leases of the previous run stay leased until reconciled")
            }
        }
        self.recovered = rec
        let pipeline = try ClaimPipeline(config: config, recovered: rec, logger: logger)
        self.engine = SidecarEngine(config: config, store: store, pipeline: pipeline, logger: logger)
        let threads = config.eventLoops > 0 ? config.eventLoops : System.coreCount
        self.group = MultiThreadedEventLoopGroup(numberOfThreads: threads)
        self.logger = logger
    }

    public func run() async throws {
        let config = engine.config
        var metricsChannel: (any Channel)?
        if let (host, port) = config.metricsListen {
            let exporter = MetricsExporter(engine: engine)
            engine.claimTimer.withLockedValue { $0 = exporter.claimTimer }
            metricsChannel = try await exporter.serve(host: host, port: port, group: group)
            logger.info("metrics on http://\(host):\(port)/metrics")
        }
        let channel = try await bind()
        logger.info("quotad listening", metadata: [
            "socket": "\(config.socket.path)", "region": "\(config.region)", "host": "\(config.hostID)",
            "redis": "\(engine.store.connection.endpoint)",
        ])
        if let rec = recovered {
            engine.restore(history: rec.history)
            // Claims that were waiting for their per-user check: undo the count if it was taken.
            // Journal them again first, so another crash before the release cannot forget them.
            for e in rec.orphanIntents {
                engine.pipeline.journal?.append(.claim(e))
                engine.releaseUser(e)
            }
            engine.pipeline.reship(rec)
            let n = rec.segments.reduce(0) { $0 + $1.claims.count }
            if n > 0 { logger.info("journal: shipping claims of the previous run again", metadata: ["claims": "\(n)"]) }
        }
        let recovery = Task { await returnRecoveredLeases() }
        let ticker = Task { await engine.runTicker() }
        let refresher = Task { await engine.runRefresher() }

        // Runs until SIGTERM/SIGINT (or the service group is cancelled).
        try? await gracefulShutdown()

        logger.info("shutting down: closing the socket, returning tokens")
        try? await channel.close()
        try? await metricsChannel?.close()
        let left = await engine.drain()
        recovery.cancel()
        _ = await recovery.value
        ticker.cancel()
        refresher.cancel()
        engine.pipeline.close(flushTimeout: config.kafka.flushTimeout)
        try? await Task.sleep(for: .milliseconds(50))
        try? FileManager.default.removeItem(atPath: config.socket.path)
        engine.store.connection.close()
        try? await group.shutdownGracefully()
        if left == 0 {
            logger.info("all unused tokens returned; bye")
        } else {
            logger.error("exiting with tokens still leased", metadata: ["vouchers": "\(left)"])
        }
    }

    /// Give back what the previous run's leases did not serve, on the journal's word
    /// (`granted - served`; cumulative, so a repeat after another crash changes nothing).
    /// Not with `durability: none`: replies there do not wait for the journal, so its counts may be low.
    private func returnRecoveredLeases() async {
        guard let rec = recovered, engine.config.durability != .none, rec.leaseStateTrusted else { return }
        var open = rec.openLeases
        var delay: Duration = .milliseconds(100)
        while !open.isEmpty && !Task.isCancelled {
            var failed: [JournalRecord.OpenLease] = []
            for l in open {
                let r = await attempt { () async throws(RedisError) in
                    try await engine.store.giveBack(voucher: l.voucher, lease: l.lease, host: engine.config.hostID,
                                                    returnedTotal: l.granted - l.served, close: true)
                }
                switch r {
                case .success(let n):
                    engine.pipeline.recordLease(.leaseClosed(voucher: l.voucher, lease: l.lease))
                    logger.info("returned a lease of the previous run", metadata: [
                        "quota.voucher": "\(l.voucher)", "quota.lease": "\(l.lease)", "tokens": "\(n)"])
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
                    try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(RESPCommandDecoder(limits: limits)))
                    try channel.pipeline.syncOperations.addHandler(
                        ConnectionHandler(engine: engine, isAdmin: isAdmin, refusal: refusal))
                    if refusal != nil {
                        // A refused peer is told why at its first command, then closed; at most 1 s.
                        engine.connectionsRefused.add(1, ordering: .relaxed)
                        channel.eventLoop.scheduleTask(in: .seconds(1)) { channel.close(promise: nil) }
                    }
                }
            }
            .bind(unixDomainSocketPath: config.socket.path, cleanupExistingSocketFile: true)
            .get()
        guard chmod(config.socket.path, mode_t(config.socket.mode)) == 0 else {
            throw QuotaError(.err, "cannot chmod \(config.socket.path) to \(String(config.socket.mode, radix: 8))")
        }
        return channel
    }
}
