import CHiredis
import Foundation
import Logging
import Synchronization

/// Listens for recalls on the region's Redis (`SUBSCRIBE quota:recall`, see the LEASE script) on its own
/// thread and connection, and hands each voucher id recalled by another host to `onRecall` (this host's
/// own recalls, `quota:{ID}|host`, are skipped: it knows what it asked for).
///
/// On a Redis Cluster it subscribes on one seed node (a `PUBLISH` reaches every node of the cluster) and
/// moves to the next seed after a failure.
///
/// It reconnects after any failure. A recall published while it is disconnected is missed; the
/// periodic refresh reads the voucher's `recall_ms` and covers it, one refresh later.
public final class RecallSubscriber: @unchecked Sendable {
    private let endpoint: RedisEndpoint
    private let host: String
    private let logger: Logger
    private let onRecall: @Sendable (_ voucher: String, _ from: String?) -> Void
    private let stopped = Atomic<Bool>(false)
    /// The socket being read, so that ``stop()`` can wake the blocked read.
    private let socket = Atomic<Int32>(-1)
    private let _received = Atomic<Int>(0)
    private let _connected = Atomic<Bool>(false)

    /// Recalls received since start.
    public var received: Int { _received.load(ordering: .relaxed) }
    /// Whether it is subscribed now.
    public var isConnected: Bool { _connected.load(ordering: .relaxed) }

    public init(endpoint: RedisEndpoint, host: String, logger: Logger, onRecall: @escaping @Sendable (_ voucher: String, _ from: String?) -> Void) {
        self.endpoint = endpoint
        self.host = host
        self.logger = logger
        self.onRecall = onRecall
        let t = Thread { [self] in run() }
        t.name = "redis-recall"
        t.start()
    }

    public func stop() {
        stopped.store(true, ordering: .relaxed)
        let fd = socket.load(ordering: .relaxed)
        if fd >= 0 { _ = Glibc.shutdown(fd, Int32(SHUT_RDWR)) }
    }

    private func run() {
        var lastError: String?
        let targets: [RedisEndpoint]
        if case .cluster(let seeds) = endpoint { targets = seeds } else { targets = [endpoint] }
        var next = 0
        while !stopped.load(ordering: .relaxed) {
            let endpoint = targets[next % targets.count]
            switch HiredisConnection.open(endpoint, timeout: .seconds(1)) {
            case .failure(let e):
                if lastError != e.message {
                    logger.warning("recall subscription down", metadata: ["redis": "\(endpoint)", "error": "\(e.message)"])
                    lastError = e.message
                }
                next += 1
                usleep(next % targets.count == 0 ? 200_000 : 10_000)
            case .success(let ctx):
                // Reads block until a message comes (no read timeout); TCP keep-alive finds a dead peer.
                _ = redisSetTimeout(ctx, Glibc.timeval(tv_sec: 0, tv_usec: 0))
                if case .tcp = endpoint { _ = redisEnableKeepAlive(ctx) }
                socket.store(ctx.pointee.fd, ordering: .relaxed)
                let why = listen(ctx, endpoint)
                _connected.store(false, ordering: .relaxed)
                socket.store(-1, ordering: .relaxed)
                redisFree(ctx)
                if !stopped.load(ordering: .relaxed) {
                    next += 1
                    if lastError != why {
                        logger.warning("recall subscription lost", metadata: ["redis": "\(endpoint)", "error": "\(why)"])
                        lastError = why
                    }
                    usleep(100_000)
                }
            }
        }
    }

    /// Subscribe and deliver messages until the connection fails; returns why.
    private func listen(_ ctx: UnsafeMutablePointer<redisContext>, _ endpoint: RedisEndpoint) -> String {
        let args = ["SUBSCRIBE", QuotaStore.recallChannel]
        var cargs = args.map { strdup($0) }
        defer { for p in cargs { free(p) } }
        var lens = args.map { $0.utf8.count }
        let ok = cargs.withUnsafeMutableBufferPointer { a in
            lens.withUnsafeMutableBufferPointer { l in
                a.baseAddress!.withMemoryRebound(to: UnsafePointer<CChar>?.self, capacity: args.count) { p in
                    redisAppendCommandArgv(ctx, Int32(args.count), p, l.baseAddress)
                }
            }
        }
        guard ok == REDIS_OK else { return HiredisConnection.errorString(ctx) }
        while !stopped.load(ordering: .relaxed) {
            var raw: UnsafeMutableRawPointer?
            guard redisGetReply(ctx, &raw) == REDIS_OK, let raw else { return HiredisConnection.errorString(ctx) }
            let value = HiredisConnection.convert(raw.assumingMemoryBound(to: redisReply.self))
            freeReplyObject(raw)
            guard let a = value.array, a.count == 3, let kind = a[0].string else { continue }
            if kind == "subscribe" {
                _connected.store(true, ordering: .relaxed)
                logger.debug("recall subscription up", metadata: ["redis": "\(endpoint)"])
            } else if kind == "message", let msg = a[2].string, let r = QuotaStore.recall(ofMessage: msg), r.from != host {
                _received.add(1, ordering: .relaxed)
                onRecall(r.voucher, r.from)
            }
        }
        return "stopped"
    }
}
