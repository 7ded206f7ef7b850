import Foundation
import Glibc
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import QuotaConfig
import QuotaCore
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

    public init(config: SidecarConfig, logger: Logger) throws {
        let store = try QuotaStore(url: config.redisURL, timeout: config.redisTimeout, logger: logger)
        self.engine = SidecarEngine(config: config, store: store, logger: logger)
        let threads = config.eventLoops > 0 ? config.eventLoops : System.coreCount
        self.group = MultiThreadedEventLoopGroup(numberOfThreads: threads)
        self.logger = logger
    }

    public func run() async throws {
        let config = engine.config
        let channel = try await bind()
        logger.info("quotad listening", metadata: [
            "socket": "\(config.socket.path)", "region": "\(config.region)", "host": "\(config.hostID)",
            "redis": "\(engine.store.connection.endpoint)",
        ])
        let ticker = Task { await engine.runTicker() }
        let refresher = Task { await engine.runRefresher() }

        // Runs until SIGTERM/SIGINT (or the service group is cancelled).
        try? await gracefulShutdown()

        logger.info("shutting down: closing the socket, returning tokens")
        try? await channel.close()
        let left = await engine.drain()
        ticker.cancel()
        refresher.cancel()
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
                    try channel.pipeline.syncOperations.addHandler(ConnectionHandler(engine: engine, isAdmin: isAdmin))
                    if let refusal {
                        engine.connectionsRefused.add(1, ordering: .relaxed)
                        var b = channel.allocator.buffer(capacity: refusal.utf8.count + 3)
                        b.writeString("-\(refusal)\r\n")
                        channel.writeAndFlush(b).whenComplete { _ in channel.close(promise: nil) }
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
