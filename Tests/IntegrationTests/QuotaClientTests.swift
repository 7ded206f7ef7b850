import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import QuotaClient
import QuotaHarness
import Testing

/// The public `QuotaClient` library against a real quotad (and a real redis-server behind it).
/// Each test has 5 minutes, but the example app's (a first build of it takes several).
@Suite("QuotaClient: pooled, retrying claims against a real quotad")
struct QuotaClientTests {
    /// A sidecar (durability `journal`) with vouchers `v1` (1,000,000), `few` (50), `once` (per-user limit 1)
    /// and `empty` (sold out from the start).
    func sidecar(extraYAML: String = "", args: [String] = []) async throws -> (RedisServer, Quotad) {
        let redis = try await RedisServer()
        for (id, limit, perUser) in [("v1", 1_000_000, 0), ("few", 50, 0), ("once", 100, 1), ("empty", 0, 0)] {
            _ = try await redis.store.createVoucher(id: id, limit: limit, perUser: perUser, totalLimit: limit, region: "sg")
        }
        // The sidecar's socket and journal live under the RedisServer's directory: keep `redis` alive to the end.
        let q = try await Quotad(redis: redis, dir: redis.dir, host: "host-a", extraYAML: extraYAML, args: args,
                                 durability: "journal")
        return (redis, q)
    }

    /// A retry policy for tests on a busy machine: many quick attempts within a generous deadline.
    static let patient = QuotaClient.RetryPolicy(maxAttempts: 200, initialBackoff: .milliseconds(20),
                                                 maxBackoff: .milliseconds(250), deadline: .seconds(60))

    @Test(.timeLimit(.minutes(5))) func aClaimSucceedsAndReturnsItsClaimID() async throws {
        let (redis, q) = try await sidecar()
        let client = QuotaClient(socketPath: q.socket)
        try await client.ping()
        let claim = try await client.claim(voucher: "v1", user: "user-42", quantity: 3)
        #expect(claim.id.hasPrefix("sg.host-a."), "\(claim)")
        #expect(claim.voucher == "v1" && claim.user == "user-42" && claim.quantity == 3 && claim.attempts == 1)
        #expect(UUID(uuidString: claim.requestID) != nil, "a UUID request id: \(claim.requestID)")
        #expect((1...1_000_000).contains(try await client.available(voucher: "v1")))
        #expect(try await client.available(voucher: "empty") == 0)
        #expect(try await client.info(section: "stats")["claims_ok"] == "1")

        try await client.unclaim(claim)
        try await client.unclaim(claim.id)  // idempotent
        let unknown = await #expect(throws: QuotaError.self) { try await client.unclaim("sg.nobody.0.1") }
        guard case .unknownClaim = unknown else { Issue.record("unknown claim id: \(String(describing: unknown))"); return }
        #expect(client.openConnections == 1, "sequential calls reuse one connection")

        await client.close()
        await #expect(throws: QuotaError.shutdown) { try await client.claim(voucher: "v1", user: "late") }
        #expect(try await q.stop() == 0)
        #expect(try await redis.audit("v1", journals: [(q.host, q.journalDir)], netClaimed: 0).isEmpty)
    }

    @Test(.timeLimit(.minutes(5))) func finalRefusalsAreThrownTypedAtOnceAndNeverRetried() async throws {
        let (redis, q) = try await sidecar()
        let client = QuotaClient(socketPath: q.socket, retry: Self.patient)

        let started = ContinuousClock.now
        let soldOut = await #expect(throws: QuotaError.self) { try await client.claim(voucher: "empty", user: "u1") }
        guard case .soldOut(let message)? = soldOut else { Issue.record("expected SOLDOUT: \(String(describing: soldOut))"); return }
        #expect(!message.isEmpty && soldOut?.code == "SOLDOUT" && soldOut?.isRetryable == false, "\(message)")
        #expect(soldOut?.description == "SOLDOUT \(message)", "the server's message is kept")

        _ = try await client.claim(voucher: "once", user: "u1")
        let userLimit = await #expect(throws: QuotaError.self) { try await client.claim(voucher: "once", user: "u1") }
        guard case .userLimit? = userLimit else { Issue.record("expected USERLIMIT: \(String(describing: userLimit))"); return }
        let noVoucher = await #expect(throws: QuotaError.self) { try await client.claim(voucher: "nope", user: "u1") }
        guard case .noVoucher(let m)? = noVoucher, m.contains("nope") else {
            Issue.record("expected NOVOUCHER: \(String(describing: noVoucher))"); return
        }
        let invalid = await #expect(throws: QuotaError.self) { try await client.claim(voucher: "v1", user: "u1", quantity: 0) }
        guard case .invalidRequest(let m)? = invalid, m.contains("QTY") else {
            Issue.record("expected ERR: \(String(describing: invalid))"); return
        }
        #expect(ContinuousClock.now - started < .seconds(5), "no backoff was slept")
        let stats = try await client.info(section: "stats")
        #expect(stats["claims_soldout"] == "1", "SOLDOUT was asked once: \(stats["claims_soldout"] ?? "-")")
        #expect(stats["claims_userlimit"] == "1" && stats["claims_novoucher"] == "1", "\(stats)")
        #expect(stats["claims_ok"] == "1")
        await client.close()
        #expect(try await q.stop() == 0)
        withExtendedLifetime(redis) {}
    }

    @Test(.timeLimit(.minutes(5))) func aLostReplyIsRetriedWithTheSameRequestAndGetsTheSameClaimID() async throws {
        let (redis, q) = try await sidecar()
        // The first reply quotad sends is lost: the relay drops it and closes the app's connection.
        let lost = NIOLockedValueBox<[String]>([])
        let proxy = try await ReplyRelay(upstream: q.socket) { connection, reply in
            guard connection == 1 else { return .forward }
            lost.withLockedValue { $0.append(String(buffer: reply)) }
            return .dropAndClose
        }
        let client = QuotaClient(socketPath: proxy.socket, retry: Self.patient)
        let claim = try await client.claim(voucher: "few", user: "u1")
        #expect(claim.attempts == 2, "one retry after the lost reply: \(claim)")
        let dropped = lost.withLockedValue { $0 }
        #expect(dropped.count == 1 && dropped[0].contains(claim.id), "the retry got the lost reply's claim id: \(dropped)")
        #expect(try await q.stat("claims_ok") == 1, "one claim granted, not two")
        #expect(try await q.stat("tokens_served") == 1)

        // A caller's own request id (an order id) makes its own retries idempotent the same way.
        let first = try await client.claim(voucher: "few", user: "u2", requestID: "order-7")
        let again = try await client.claim(voucher: "few", user: "u2", requestID: "order-7")
        #expect(first.id == again.id && first.id != claim.id)
        #expect(try await q.stat("tokens_served") == 2)
        #expect(proxy.connections == 2, "the broken connection was replaced once")

        await client.close()
        await proxy.close()
        #expect(try await q.stop() == 0)
        #expect(try await redis.audit("few", journals: [(q.host, q.journalDir)], netClaimed: 2).isEmpty)
    }

    @Test(.timeLimit(.minutes(5))) func aClaimWhileQuotadRestartsIsRetriedOnANewConnection() async throws {
        let (redis, q) = try await sidecar()
        let client = QuotaClient(socketPath: q.socket, poolSize: 2, retry: Self.patient)
        let first = try await client.claim(voucher: "few", user: "u1")
        #expect(client.openConnections == 1)

        try await q.kill9()  // the pooled connection breaks; the socket file is left behind, refusing
        async let restarted: Void = {
            try await Task.sleep(for: .seconds(1))
            try await q.restart()
        }()
        let second = try await client.claim(voucher: "few", user: "u2")
        try await restarted
        #expect(second.attempts > 1, "retried until quotad was back: \(second)")
        #expect(second.id != first.id && second.id.hasPrefix("sg.host-a."))
        #expect(client.openConnections == 1, "the broken connection was dropped and replaced")
        #expect(try await q.stat("claims_ok") == 1, "the restarted quotad granted this claim once")

        await client.close()
        #expect(try await q.stop() == 0)
        #expect(try await redis.audit("few", journals: [(q.host, q.journalDir)], netClaimed: 2).isEmpty)
    }

    @Test(.timeLimit(.minutes(5))) func manyConcurrentClaimsThroughASmallPoolNeverExceedTheLimit() async throws {
        let (redis, q) = try await sidecar()
        // 200 callers queue for 4 connections: on a loaded CI machine (a journal fsync per claim) the last
        // ones wait seconds, so the acquire timeout is generous here; the bound itself is tested below.
        let config = QuotaClient.Configuration(socketPath: q.socket, poolSize: 4, maxWaiters: 256, acquireTimeout: .seconds(120),
                                               retry: Self.patient)
        let client = QuotaClient(configuration: config)
        let results = await withTaskGroup(of: Result<Claim, QuotaError>.self) { group in
            for i in 0..<200 {
                group.addTask {
                    do { return .success(try await client.claim(voucher: "few", user: "user-\(i)")) } catch let e as QuotaError {
                        return .failure(e)
                    } catch {
                        return .failure(.server(code: "OTHER", message: "\(error)"))
                    }
                }
            }
            var out: [Result<Claim, QuotaError>] = []
            for await r in group { out.append(r) }
            return out
        }
        let ids = results.compactMap { try? $0.get().id }
        let refusals = results.compactMap { r -> QuotaError? in if case .failure(let e) = r { return e } else { return nil } }
        #expect(ids.count == 50, "exactly the limit is granted: \(ids.count)")
        #expect(Set(ids).count == ids.count, "no claim id twice")
        let other = refusals.filter { if case .soldOut = $0 { return false } else { return true } }
        #expect(other.isEmpty, "every other claim is SOLDOUT: \(other.prefix(5))")
        #expect(client.openConnections <= 4, "the pool stays bounded: \(client.openConnections)")
        #expect(try await q.stat("claims_ok") == 50)

        await client.close()
        #expect(try await q.stop() == 0)
        #expect(try await redis.audit("few", journals: [(q.host, q.journalDir)], netClaimed: 50).isEmpty)
    }

    @Test(.timeLimit(.minutes(5))) func unavailableIsRetriedUntilRedisIsBack() async throws {
        let (redis, q) = try await sidecar(extraYAML: "limits: { claim_timeout_ms: 300 }\n")
        let logs = CapturedLogs()
        let client = QuotaClient(socketPath: q.socket, retry: Self.patient, logger: logs.logger)
        try await client.ping()
        try await redis.kill9()  // no lease was taken yet: quotad has no stock of `few` and fails closed
        async let restarted: Void = {
            try await Task.sleep(for: .seconds(2))
            try await redis.start()
        }()
        let claim = try await client.claim(voucher: "few", user: "u1")
        try await restarted
        #expect(claim.attempts > 1, "\(claim)")
        // Every retry was logged (debug) with the reason and the one request id of this claim.
        let retries = logs.records.filter { $0.message == "retrying" }
        #expect(retries.count == claim.attempts - 1, "\(retries.map(\.metadata))")
        #expect(retries.allSatisfy { $0.metadata["quota.request_id"] == claim.requestID })
        #expect(retries.contains { $0.metadata["quota.error"]?.hasPrefix("UNAVAILABLE") == true },
                "quotad answered UNAVAILABLE before Redis was back: \(retries.map(\.metadata))")
        #expect(try await q.stat("claims_ok") == 1)

        // With retries that cannot outlast the outage, UNAVAILABLE is thrown, typed and retryable.
        try await redis.kill9()
        let brief = QuotaClient(socketPath: q.socket, retry: .init(maxAttempts: 3, initialBackoff: .milliseconds(10)))
        let unavailable = await #expect(throws: QuotaError.self) { try await brief.claim(voucher: "once", user: "u1") }
        guard case .unavailable? = unavailable else { Issue.record("expected UNAVAILABLE: \(String(describing: unavailable))"); return }
        #expect(unavailable?.isRetryable == true)
        try await redis.start()
        await brief.close()
        await client.close()
        #expect(try await q.stop() == 0)
        withExtendedLifetime(redis) {}
    }

    @Test(.timeLimit(.minutes(5))) func aFullPoolFailsFastWithPoolExhaustedAndASilentServerTimesOut() async throws {
        let (redis, q) = try await sidecar()
        let proxy = try await ReplyRelay(upstream: q.socket) { _, _ in .swallow }  // quotad's replies never arrive
        let config = QuotaClient.Configuration(socketPath: proxy.socket, poolSize: 1, maxWaiters: 0,
                                               requestTimeout: .seconds(2), retry: .never)
        let client = QuotaClient(configuration: config)
        async let stuck: Result<Claim, any Error> = {
            do { return .success(try await client.claim(voucher: "v1", user: "u1")) } catch { return .failure(error) }
        }()
        try await eventually("the one connection is in use") { client.openConnections == 1 }
        let started = ContinuousClock.now
        let exhausted = await #expect(throws: QuotaError.self) { try await client.ping() }
        guard case .poolExhausted? = exhausted else { Issue.record("expected POOL_EXHAUSTED: \(String(describing: exhausted))"); return }
        #expect(exhausted?.isRetryable == false)
        #expect(ContinuousClock.now - started < .seconds(1), "no wait when no waiter is allowed")
        switch await stuck {
        case .success(let c): Issue.record("a reply came through a relay that swallows them: \(c)")
        case .failure(let e):
            guard case QuotaError.timedOut = e else { Issue.record("expected TIMEOUT, got \(e)"); return }
        }
        #expect(client.openConnections == 0, "the timed-out connection was closed")
        await client.close()
        await proxy.close()
        #expect(try await q.stop() == 0)
        withExtendedLifetime(redis) {}
    }

    @Test(.timeLimit(.minutes(5))) func aPasswordIsSentOnEveryNewConnection() async throws {
        let (redis, q) = try await sidecar(args: ["--set", "socket.password=s3cret"])
        let client = QuotaClient(socketPath: q.socket, password: "s3cret")
        #expect(try await client.claim(voucher: "v1", user: "u1").id.hasPrefix("sg.host-a."))
        let anonymous = QuotaClient(socketPath: q.socket)
        let refused = await #expect(throws: QuotaError.self) { try await anonymous.claim(voucher: "v1", user: "u2") }
        guard case .authenticationFailed? = refused else { Issue.record("expected NOAUTH: \(String(describing: refused))"); return }
        await anonymous.close()
        await client.close()
        #expect(try await q.stop() == 0)
        withExtendedLifetime(redis) {}
    }

    /// The Hummingbird example app, end to end: `examples/hummingbird/test.sh` builds it (its own SwiftPM package;
    /// a first build takes minutes, at low priority), runs redis-server, quotad and the app, and checks its HTTP
    /// answers.
    @Test(.timeLimit(.minutes(15)))
    func theHummingbirdExampleAppServesClaimsOverHTTP() async throws {
        let (st, out) = try await Clients.run("/bin/bash", [Clients.path("examples/hummingbird/test.sh")],
                                              env: ["QUOTAD_BIN_DIR": Bin.dir], timeout: .seconds(14 * 60))
        #expect(st == 0, "\(out.suffix(4000))")
        #expect(out.contains("hummingbird example: all checks passed"), "\(out.suffix(4000))")
    }
}

/// A Unix-socket relay in front of quotad whose `filter` decides, per chunk quotad sends back, whether the app
/// gets it: the way to lose a reply after quotad acted on the request, or to make quotad look silent.
final class ReplyRelay: Sendable {
    enum Verdict: Sendable {
        case forward
        /// Drop the chunk and close the app's connection (the reply is lost).
        case dropAndClose
        /// Drop the chunk and keep the connection open (a silent server).
        case swallow
    }

    let socket: String
    private let dir = TempDir()
    private let server: any Channel
    private let accepted = NIOLockedValueBox(0)

    /// Listen on a private socket and relay each connection to `upstream`; `filter(connection, chunk)` is asked
    /// for every chunk coming back (connections count from 1).
    init(upstream: String, filter: @escaping @Sendable (Int, ByteBuffer) -> Verdict) async throws {
        socket = dir.file("relay.sock")
        let accepted = self.accepted
        server = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .childChannelInitializer { app in
                let n = accepted.withLockedValue { $0 += 1; return $0 }
                return ClientBootstrap(group: app.eventLoop)
                    .channelInitializer { up in
                        up.eventLoop.makeCompletedFuture {
                            try up.pipeline.syncOperations.addHandler(Relay(peer: app) { filter(n, $0) })
                        }
                    }
                    .connect(unixDomainSocketPath: upstream)
                    .flatMapThrowing { up in try app.pipeline.syncOperations.addHandler(Relay(peer: up) { _ in .forward }) }
            }
            .bind(unixDomainSocketPath: socket).get()
    }

    /// Connections accepted so far.
    var connections: Int { accepted.withLockedValue { $0 } }

    func close() async { try? await server.close() }

    private final class Relay: ChannelInboundHandler, Sendable {
        typealias InboundIn = ByteBuffer
        let peer: any Channel
        let verdict: @Sendable (ByteBuffer) -> Verdict

        init(peer: any Channel, verdict: @escaping @Sendable (ByteBuffer) -> Verdict) {
            self.peer = peer
            self.verdict = verdict
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let bytes = unwrapInboundIn(data)
            switch verdict(bytes) {
            case .forward: peer.writeAndFlush(bytes, promise: nil)
            case .swallow: break
            case .dropAndClose:
                peer.close(promise: nil)
                context.close(promise: nil)
            }
        }

        func channelInactive(context: ChannelHandlerContext) {
            peer.close(promise: nil)
            context.fireChannelInactive()
        }
    }
}

/// A logger whose records are kept, to check what a client logged.
final class CapturedLogs: Sendable {
    struct Record: Sendable {
        var level: Logger.Level
        var message: String
        var metadata: [String: String]
    }

    private let box = NIOLockedValueBox<[Record]>([])
    var records: [Record] { box.withLockedValue { $0 } }

    /// A debug-level logger writing here.
    var logger: Logger {
        let box = self.box
        var logger = Logger(label: "test.quota-client") { _ in Handler(box: box) }
        logger.logLevel = .debug
        return logger
    }

    private struct Handler: LogHandler {
        let box: NIOLockedValueBox<[Record]>
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .debug

        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }

        func log(event: LogEvent) {
            let all = metadata.merging(event.metadata ?? [:]) { _, new in new }
            box.withLockedValue {
                $0.append(Record(level: event.level, message: event.message.description, metadata: all.mapValues { "\($0)" }))
            }
        }
    }
}
