#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Logging
import NIOCore
import NIOPosix
import QuotaRESP
import Synchronization

// MARK: - Public types

/// A granted claim: quotad's answer to one logical `CLAIM`.
public struct Claim: Sendable, Hashable, CustomStringConvertible {
    /// The claim id quotad answered (`region.host.boot.sequence`), unique across hosts, restarts and regions.
    /// Pass it to ``QuotaClient/unclaim(_:)`` to cancel the claim.
    public var id: String
    /// The voucher claimed.
    public var voucher: String
    /// The user the claim was made for.
    public var user: String
    /// The number of tokens claimed (`QTY`).
    public var quantity: Int
    /// The request id (`REQ`) sent with every attempt of this claim. quotad answers a repeated request id with the
    /// same claim id within its dedupe window, so a claim whose reply was lost can be retried safely with it.
    public var requestID: String
    /// How many attempts it took (1 when the first one was answered).
    public var attempts: Int

    public init(id: String, voucher: String, user: String, quantity: Int, requestID: String, attempts: Int) {
        self.id = id
        self.voucher = voucher
        self.user = user
        self.quantity = quantity
        self.requestID = requestID
        self.attempts = attempts
    }

    public var description: String { id }
}

/// Everything a ``QuotaClient`` call can throw (besides `CancellationError` when the calling task is cancelled).
///
/// quotad's refusals keep the server's message (the text after the error code). Final answers are thrown at
/// once; transient ones (``isRetryable``) are thrown only after the client's ``QuotaClient/RetryPolicy`` ran out.
public enum QuotaError: Error, Sendable, Hashable, CustomStringConvertible {
    /// `SOLDOUT`: the voucher's quota available to this region is exhausted. Final.
    case soldOut(String)
    /// `USERLIMIT`: the user already holds the voucher's per-user limit. Final.
    case userLimit(String)
    /// `INACTIVE`: the voucher is paused, closed, not started or ended (the message says which). Final.
    case inactive(String)
    /// `NOVOUCHER`: no such voucher. Final.
    case noVoucher(String)
    /// `NOPERM`: this process is not allowed the command (socket credentials). Final.
    case noPermission(String)
    /// `NOAUTH` / `WRONGPASS`: the socket needs a password (``QuotaClient/Configuration/password``) or it was wrong.
    case authenticationFailed(String)
    /// `ERR`: quotad refused the command's arguments (bad voucher id, bad quantity, ...). Final.
    case invalidRequest(String)
    /// `UNCLAIM` of a claim id this host does not know (`ERR unknown claim id`). Final.
    case unknownClaim(String)
    /// Any other error reply: its code and message. Final.
    case server(code: String, message: String)
    /// `UNAVAILABLE`: quotad fails closed (Redis unreachable and no local stock, draining, backlog full).
    /// Retried; thrown when the retry policy ran out.
    case unavailable(String)
    /// `BUSY`: quotad is overloaded or refused the connection (`max_connections`). Retried on a new connection;
    /// thrown when the retry policy ran out.
    case busy(String)
    /// The socket could not be reached or the connection broke before the reply (the text says how).
    /// Retried with the same request id; thrown when the retry policy ran out.
    case connectionFailed(String)
    /// No reply within ``QuotaClient/Configuration/requestTimeout`` (the connection is then closed) or the call's
    /// deadline passed. Retried with the same request id; thrown when the retry policy ran out.
    case timedOut(String)
    /// Every pooled connection is busy and too many calls are already waiting for one, or the wait for one took
    /// longer than ``QuotaClient/Configuration/acquireTimeout``. Not retried: the process is over its budget.
    case poolExhausted(String)
    /// quotad answered something that is not a reply to the command (a client/server mismatch). Final.
    case unexpectedReply(String)
    /// The client was closed (``QuotaClient/close()``).
    case shutdown

    /// The error code: quotad's word (`SOLDOUT`, `UNAVAILABLE`, ...) or the client's own
    /// (`CONNECTION`, `TIMEOUT`, `POOL_EXHAUSTED`, `UNEXPECTED_REPLY`, `SHUTDOWN`).
    public var code: String {
        switch self {
        case .soldOut: return "SOLDOUT"
        case .userLimit: return "USERLIMIT"
        case .inactive: return "INACTIVE"
        case .noVoucher: return "NOVOUCHER"
        case .noPermission: return "NOPERM"
        case .authenticationFailed: return "NOAUTH"
        case .invalidRequest, .unknownClaim: return "ERR"
        case .server(let code, _): return code
        case .unavailable: return "UNAVAILABLE"
        case .busy: return "BUSY"
        case .connectionFailed: return "CONNECTION"
        case .timedOut: return "TIMEOUT"
        case .poolExhausted: return "POOL_EXHAUSTED"
        case .unexpectedReply: return "UNEXPECTED_REPLY"
        case .shutdown: return "SHUTDOWN"
        }
    }

    /// The human-readable message: quotad's own text for a refusal.
    public var message: String {
        switch self {
        case .soldOut(let m), .userLimit(let m), .inactive(let m), .noVoucher(let m), .noPermission(let m),
            .authenticationFailed(let m), .invalidRequest(let m), .unknownClaim(let m), .unavailable(let m),
            .busy(let m), .connectionFailed(let m), .timedOut(let m), .poolExhausted(let m), .unexpectedReply(let m):
            return m
        case .server(_, let m): return m
        case .shutdown: return "the client is closed"
        }
    }

    /// True for the transient failures worth another attempt with the same request id: `UNAVAILABLE`, `BUSY`,
    /// a broken or unreachable connection, a timeout. The client retries these itself; when one is thrown, the
    /// retry policy ran out and the caller may try again later (HTTP 503 with `Retry-After`).
    public var isRetryable: Bool {
        switch self {
        case .unavailable, .busy, .connectionFailed, .timedOut: return true
        default: return false
        }
    }

    /// `CODE message`, like quotad's error reply.
    public var description: String { message.isEmpty ? code : "\(code) \(message)" }

    /// The typed error for a RESP error reply `CODE message`.
    init(reply text: String) {
        let code = String(text.prefix { $0 != " " })
        let message = String(text.dropFirst(code.count).drop { $0 == " " })
        switch code {
        case "SOLDOUT": self = .soldOut(message)
        case "USERLIMIT": self = .userLimit(message)
        case "INACTIVE": self = .inactive(message)
        case "NOVOUCHER": self = .noVoucher(message)
        case "NOPERM": self = .noPermission(message)
        case "NOAUTH", "WRONGPASS": self = .authenticationFailed(message)
        case "UNAVAILABLE": self = .unavailable(message)
        case "BUSY": self = .busy(message)
        case "ERR": self = .invalidRequest(message)
        default: self = .server(code: code, message: message)
        }
    }
}

// MARK: - The client

/// An async client of the local quotad sidecar: claims, cancellations and availability over its Unix socket.
///
/// ```swift
/// let quota = QuotaClient(socketPath: "/run/quotad/quotad.sock", logger: logger)
/// do {
///     let claim = try await quota.claim(voucher: "flash-sale", user: "user-42")
///     print("claimed", claim.id)
/// } catch let error as QuotaError {
///     // .soldOut, .userLimit, ... at once; .unavailable / .busy / .connectionFailed when retries ran out
/// }
/// await quota.close()
/// ```
///
/// The client owns a bounded pool of connections, opened lazily on first use. Each call takes one connection
/// for itself (so a claim that waits for a lease never holds up another call's reply), and a connection that
/// broke, timed out or was answered `BUSY` is closed and replaced by a new one on a later call. When all
/// ``Configuration/poolSize`` connections are in use, calls wait in line; at most ``Configuration/maxWaiters``
/// wait, each for at most ``Configuration/acquireTimeout``, and a call beyond that fails at once with
/// ``QuotaError/poolExhausted(_:)``.
///
/// Every logical claim gets one request id (`REQ`, a UUID unless the caller gives one) that every retry of it
/// sends again, so quotad answers a retried claim with the first attempt's claim id instead of granting a second
/// claim. Only transient failures are retried (`UNAVAILABLE`, `BUSY`, a lost connection, a timeout), with
/// bounded exponential backoff and jitter, within ``RetryPolicy/maxAttempts`` and ``RetryPolicy/deadline``;
/// quotad's final answers (`SOLDOUT`, `USERLIMIT`, `INACTIVE`, `NOVOUCHER`, `NOPERM`, `ERR`) are thrown at once.
/// Retries are logged at debug level, replaced connections at info level.
public final class QuotaClient: Sendable {
    /// How a call retries transient failures.
    public struct RetryPolicy: Sendable, Hashable {
        /// Attempts per call, the first included (1 means no retry). Default 8.
        public var maxAttempts: Int
        /// The pause after the first failed attempt. Default 20 ms.
        public var initialBackoff: Duration
        /// The longest pause between two attempts. Default 1 s.
        public var maxBackoff: Duration
        /// Each pause is this many times the previous one, up to ``maxBackoff``. Default 2.
        public var multiplier: Double
        /// The fraction of each pause that is random (0: none, 1: anywhere from zero to the full pause), so that
        /// many clients do not retry in step. Default 0.5.
        public var jitter: Double
        /// The most time one call may take, every attempt and pause included: no attempt starts after it and
        /// each attempt's timeout is cut to it. Default 10 s.
        public var deadline: Duration

        public init(maxAttempts: Int = 8, initialBackoff: Duration = .milliseconds(20), maxBackoff: Duration = .seconds(1),
                    multiplier: Double = 2, jitter: Double = 0.5, deadline: Duration = .seconds(10)) {
            self.maxAttempts = max(1, maxAttempts)
            self.initialBackoff = max(.zero, initialBackoff)
            self.maxBackoff = max(self.initialBackoff, maxBackoff)
            self.multiplier = max(1, multiplier)
            self.jitter = min(1, max(0, jitter))
            self.deadline = deadline
        }

        /// 8 attempts within 10 s, pauses from 20 ms doubling up to 1 s.
        public static let `default` = RetryPolicy()
        /// One attempt: every failure is thrown as it is.
        public static let never = RetryPolicy(maxAttempts: 1)

        /// The pause after failed attempt `attempt` (1-based), jitter applied.
        func backoff(after attempt: Int) -> Duration {
            var pause = initialBackoff.seconds
            for _ in 1..<max(1, attempt) where pause < maxBackoff.seconds { pause *= multiplier }
            pause = min(pause, maxBackoff.seconds) * (1 - jitter * Double.random(in: 0..<1))
            return .nanoseconds(Int64(pause * 1e9))
        }
    }

    /// What a client connects to and how it bounds its work.
    public struct Configuration: Sendable, Hashable {
        /// quotad's Unix socket (`socket.path`). Default `/run/quotad/quotad.sock`.
        public var socketPath: String
        /// The most connections open at once. Default 4.
        public var poolSize: Int
        /// The most calls waiting for a connection when all are in use; one more fails at once with
        /// ``QuotaError/poolExhausted(_:)``. Default 256.
        public var maxWaiters: Int
        /// The longest a call waits for a pooled connection before ``QuotaError/poolExhausted(_:)``. Default 5 s.
        public var acquireTimeout: Duration
        /// The longest opening a connection may take. Default 1 s.
        public var connectTimeout: Duration
        /// The longest one attempt waits for its reply; then the connection is closed and the attempt counts as a
        /// lost connection (retried with the same request id). Default 5 s.
        public var requestTimeout: Duration
        /// The retry policy of every call. Default ``RetryPolicy/default``.
        public var retry: RetryPolicy
        /// `socket.password`, sent with `AUTH` on every new connection when set. Default none.
        public var password: String?

        public init(socketPath: String = "/run/quotad/quotad.sock", poolSize: Int = 4, maxWaiters: Int = 256,
                    acquireTimeout: Duration = .seconds(5), connectTimeout: Duration = .seconds(1),
                    requestTimeout: Duration = .seconds(5), retry: RetryPolicy = .default, password: String? = nil) {
            self.socketPath = socketPath
            self.poolSize = max(1, poolSize)
            self.maxWaiters = max(0, maxWaiters)
            self.acquireTimeout = acquireTimeout
            self.connectTimeout = connectTimeout
            self.requestTimeout = requestTimeout
            self.retry = retry
            self.password = password
        }
    }

    /// The configuration this client was made with.
    public let configuration: Configuration
    private let pool: ConnectionPool
    private let logger: Logger

    /// A client of the quotad at `configuration.socketPath`. Nothing is connected until the first call.
    /// - Parameters:
    ///   - configuration: socket, pool bounds, timeouts, retry policy.
    ///   - eventLoopGroup: where the connections live. Default: NIO's shared singleton group.
    ///   - logger: retries (debug) and replaced connections (info) are logged here.
    public init(configuration: Configuration, eventLoopGroup: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
                logger: Logger = Logger(label: "quotad.client")) {
        var logger = logger
        logger[metadataKey: "quota.socket"] = .string(configuration.socketPath)
        self.configuration = configuration
        self.logger = logger
        pool = ConnectionPool(configuration: configuration, group: eventLoopGroup, logger: logger)
    }

    /// A client of the quotad at `socketPath`.
    /// - Parameters:
    ///   - socketPath: quotad's Unix socket (`socket.path`).
    ///   - poolSize: the most connections open at once.
    ///   - maxWaiters: the most calls waiting for a connection; one more fails with ``QuotaError/poolExhausted(_:)``.
    ///   - retry: how transient failures are retried.
    ///   - password: `socket.password`, when quotad has one.
    ///   - logger: retries (debug) and replaced connections (info) are logged here.
    public convenience init(socketPath: String, poolSize: Int = 4, maxWaiters: Int = 256, retry: RetryPolicy = .default,
                            password: String? = nil, logger: Logger = Logger(label: "quotad.client")) {
        self.init(configuration: Configuration(socketPath: socketPath, poolSize: poolSize, maxWaiters: maxWaiters,
                                               retry: retry, password: password),
                  logger: logger)
    }

    /// Claim `quantity` tokens of `voucher` for `user` (`CLAIM voucher user QTY n REQ id`).
    ///
    /// Transient failures are retried with the same request id, so however many attempts it takes, at most one
    /// claim is granted for this call.
    /// - Parameters:
    ///   - voucher: the voucher id.
    ///   - user: the user id (counts against the voucher's per-user limit).
    ///   - quantity: tokens to claim, 1 or more (quotad bounds it with `limits.max_qty`).
    ///   - requestID: the request id of this logical claim; by default a new UUID. Pass your own (an order id)
    ///     to make a claim idempotent across your own retries and restarts, within quotad's dedupe window.
    /// - Returns: the granted ``Claim``.
    /// - Throws: ``QuotaError``: `.soldOut`, `.userLimit`, `.inactive`, `.noVoucher`, `.noPermission`,
    ///   `.invalidRequest` at once; `.unavailable`, `.busy`, `.connectionFailed`, `.timedOut` when retries ran out;
    ///   `.poolExhausted`, `.shutdown`. `CancellationError` when the task is cancelled.
    public func claim(voucher: String, user: String, quantity: Int = 1, requestID: String? = nil) async throws -> Claim {
        let req = requestID ?? UUID().uuidString.lowercased()
        var logger = self.logger
        logger[metadataKey: "quota.voucher"] = .string(voucher)
        logger[metadataKey: "quota.request_id"] = .string(req)
        let (id, attempts) = try await call(["CLAIM", voucher, user, "QTY", String(quantity), "REQ", req], logger: logger) {
            reply in
            guard let id = reply.bulkText, !id.isEmpty else { throw QuotaError.unexpectedReply("CLAIM answered \(reply)") }
            return id
        }
        return Claim(id: id, voucher: voucher, user: user, quantity: quantity, requestID: req, attempts: attempts)
    }

    /// Cancel a claim made through this host (`UNCLAIM claim-id`, an order cancelled): its tokens go back to stock
    /// and the user's count goes down. Idempotent, so it is retried like a claim; cancelling twice is no error.
    /// - Throws: ``QuotaError``: `.unknownClaim` when this host does not know the id, `.noPermission`,
    ///   `.invalidRequest`; `.unavailable`, `.busy`, `.connectionFailed`, `.timedOut` when retries ran out.
    public func unclaim(_ claimID: String) async throws {
        var logger = self.logger
        logger[metadataKey: "quota.claim_id"] = .string(claimID)
        do {
            _ = try await call(["UNCLAIM", claimID], logger: logger) { reply in
                guard reply == .simpleString("OK") else { throw QuotaError.unexpectedReply("UNCLAIM answered \(reply)") }
            }
        } catch QuotaError.invalidRequest(let m) where m.hasPrefix("unknown claim id") {
            throw QuotaError.unknownClaim(m)
        }
    }

    /// Cancel `claim` by its ``Claim/id``, like `unclaim(claim.id)`.
    public func unclaim(_ claim: Claim) async throws {
        try await unclaim(claim.id)
    }

    /// The approximate remaining quota of `voucher` (`AVAIL`): the region's pool plus this host's stock, for
    /// product pages. Served from quotad's memory, never a Redis call.
    /// - Throws: ``QuotaError``: `.noVoucher`, `.invalidRequest`, or a transient error when retries ran out.
    public func available(voucher: String) async throws -> Int {
        try await call(["AVAIL", voucher], logger: logger) { reply in
            guard case .integer(let n) = reply else { throw QuotaError.unexpectedReply("AVAIL answered \(reply)") }
            return n
        }.value
    }

    /// quotad's counters (`INFO [section]`) as `key: value`; `section` is `server`, `clients`, `stats`,
    /// `vouchers` or `all` (default: all of them).
    public func info(section: String? = nil) async throws -> [String: String] {
        try await call(["INFO"] + (section.map { [$0] } ?? []), logger: logger) { reply in
            guard let text = reply.bulkText else { throw QuotaError.unexpectedReply("INFO answered \(reply)") }
            var out: [String: String] = [:]
            for line in text.split(whereSeparator: \.isNewline) where !line.hasPrefix("#") {
                guard let colon = line.firstIndex(of: ":") else { continue }
                out[String(line[..<colon])] = String(line[line.index(after: colon)...])
            }
            return out
        }.value
    }

    /// One `PING` on a pooled connection, not retried: a health check.
    /// - Returns: the round trip, connecting included when no connection was open.
    /// - Throws: ``QuotaError`` as the single attempt failed.
    @discardableResult
    public func ping() async throws -> Duration {
        let start = ContinuousClock.now
        _ = try await call(["PING"], policy: .never, logger: logger) { reply in
            guard reply == .simpleString("PONG") else { throw QuotaError.unexpectedReply("PING answered \(reply)") }
        }
        return ContinuousClock.now - start
    }

    /// Close every connection and refuse further calls with ``QuotaError/shutdown``. Calls waiting for a connection
    /// fail with it; calls in flight finish their current attempt, and their connection is closed afterwards.
    public func close() async {
        await pool.close()
    }

    /// Connections open right now (idle and in use), for tests and metrics.
    public var openConnections: Int { pool.openCount }

    // MARK: Calls and retries

    /// Send `args` until a final answer, retrying transient failures per `policy`. An error reply is thrown as its
    /// ``QuotaError``; `decode` turns any other reply into the result.
    private func call<T: Sendable>(_ args: [String], policy: RetryPolicy? = nil, logger: Logger,
                                   decode: (RESPValue) throws -> T) async throws -> (value: T, attempts: Int) {
        let policy = policy ?? configuration.retry
        let deadline = ContinuousClock.now + policy.deadline
        var attempt = 0
        while true {
            attempt += 1
            let failure: QuotaError
            do {
                let reply = try await attemptOnce(args, deadline: deadline)
                if case .error(let text) = reply { throw QuotaError(reply: text) }
                return (try decode(reply), attempt)
            } catch let error as QuotaError where error.isRetryable {
                failure = error
            }
            guard attempt < policy.maxAttempts else {
                logger.debug("giving up", metadata: ["quota.attempt": "\(attempt)", "quota.error": "\(failure)"])
                throw failure
            }
            let pause = policy.backoff(after: attempt)
            guard ContinuousClock.now + pause < deadline else {
                logger.debug("giving up: deadline", metadata: ["quota.attempt": "\(attempt)", "quota.error": "\(failure)"])
                throw failure
            }
            logger.debug("retrying", metadata: [
                "quota.command": "\(args[0])", "quota.attempt": "\(attempt)", "quota.error": "\(failure)",
                "quota.backoff_ms": "\(pause.milliseconds)",
            ])
            try await Task.sleep(for: pause)
        }
    }

    /// One attempt: a pooled connection, the command, its reply (an error reply is a reply, not a throw).
    private func attemptOnce(_ args: [String], deadline: ContinuousClock.Instant) async throws -> RESPValue {
        let remaining = deadline - ContinuousClock.now
        guard remaining > .zero else { throw QuotaError.timedOut("the call's deadline passed") }
        let connection = try await pool.acquire(timeout: min(configuration.acquireTimeout, remaining))
        do {
            let reply = try await ConnectionPool.send(args, on: connection, timeout: min(configuration.requestTimeout, remaining))
            // A refused peer gets BUSY for every command until it reconnects: never reuse a connection answered BUSY.
            pool.release(connection, dropBecause: reply.errorCode == "BUSY" ? "it was answered BUSY" : nil)
            return reply
        } catch {
            pool.release(connection, dropBecause: "\(error)")
            throw error
        }
    }
}

// MARK: - The pool

/// A bounded pool of RESP connections, each lent to one call at a time. Opening a connection happens outside the
/// lock, by the call that got the free slot.
final class ConnectionPool: Sendable {
    /// What a call gets from the pool: an open connection, or the right to open one.
    private enum Lease: Sendable {
        case connection(RESPClient)
        case slot
    }

    private struct Waiter {
        var id: Int
        var continuation: CheckedContinuation<Lease, any Error>
    }

    private struct State {
        var idle: [RESPClient] = []
        /// Connections open or being opened: idle, lent out, and slots handed out.
        var open = 0
        var waiters = CircularBuffer<Waiter>()
        var nextWaiterID = 0
        var closed = false
    }

    private let state = Mutex(State())
    private let configuration: QuotaClient.Configuration
    private let group: any EventLoopGroup
    private let logger: Logger

    init(configuration: QuotaClient.Configuration, group: any EventLoopGroup, logger: Logger) {
        self.configuration = configuration
        self.group = group
        self.logger = logger
    }

    var openCount: Int { state.withLock { $0.open } }

    /// A connection for one call; give it back with ``release(_:reusable:)``.
    func acquire(timeout: Duration) async throws -> RESPClient {
        switch try await reserve(timeout: timeout) {
        case .connection(let c):
            return c
        case .slot:
            do {
                return try await connect()
            } catch {
                releaseSlot()
                throw error
            }
        }
    }

    /// Give a connection back after a call: kept for the next call while it is open, unless `dropBecause` says
    /// why it must go. A dropped connection is closed and its slot goes to the next waiter, who opens a new one.
    func release(_ connection: RESPClient, dropBecause reason: String?) {
        let reason = reason ?? (connection.isActive ? nil : "it was closed")
        enum Outcome { case kept, closedPool, dropped }
        let (outcome, handOff): (Outcome, (CheckedContinuation<Lease, any Error>, Lease)?) = state.withLock { s in
            if s.closed {
                s.open -= 1
                return (.closedPool, nil)
            }
            if reason == nil {
                if let w = s.waiters.popFirst() { return (.kept, (w.continuation, .connection(connection))) }
                s.idle.append(connection)
                return (.kept, nil)
            }
            if let w = s.waiters.popFirst() { return (.dropped, (w.continuation, .slot)) }
            s.open -= 1
            return (.dropped, nil)
        }
        if outcome != .kept { connection.close() }
        if outcome == .dropped, let reason {
            logger.info("dropping a connection; a new one replaces it on demand", metadata: ["quota.reason": "\(reason)"])
        }
        if let (continuation, lease) = handOff { continuation.resume(returning: lease) }
    }

    /// A slot whose connection could not be opened: to the next waiter, or free.
    private func releaseSlot() {
        let next: CheckedContinuation<Lease, any Error>? = state.withLock { s in
            if !s.closed, let w = s.waiters.popFirst() { return w.continuation }
            s.open -= 1
            return nil
        }
        next?.resume(returning: .slot)
    }

    private func reserve(timeout: Duration) async throws -> Lease {
        let id = state.withLock { s in
            s.nextWaiterID += 1
            return s.nextWaiterID
        }
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Lease, any Error>) in
                var dead: [RESPClient] = []
                let immediate: Result<Lease, any Error>? = state.withLock { s in
                    if s.closed { return .failure(QuotaError.shutdown) }
                    if Task.isCancelled { return .failure(CancellationError()) }
                    while let c = s.idle.popLast() {
                        if c.isActive { return .success(.connection(c)) }
                        s.open -= 1
                        dead.append(c)
                    }
                    if s.open < configuration.poolSize {
                        s.open += 1
                        return .success(.slot)
                    }
                    if s.waiters.count >= configuration.maxWaiters {
                        return .failure(QuotaError.poolExhausted(
                            "all \(configuration.poolSize) connections busy and \(s.waiters.count) calls waiting"))
                    }
                    s.waiters.append(Waiter(id: id, continuation: continuation))
                    return nil
                }
                for c in dead {
                    logger.info("dropping a connection; a new one replaces it on demand", metadata: ["quota.reason": "closed while idle"])
                    c.close()
                }
                if let immediate {
                    continuation.resume(with: immediate)
                } else {
                    // Waiting: give up after `timeout` (a no-op when a connection came first).
                    group.any().scheduleTask(in: TimeAmount(timeout)) { [self] in
                        fail(waiter: id, with: QuotaError.poolExhausted("no connection free within \(timeout)"))
                    }
                }
            }
        } onCancel: {
            fail(waiter: id, with: CancellationError())
        }
    }

    /// Take waiter `id` out of line (when it is still waiting) and fail it.
    private func fail(waiter id: Int, with error: any Error) {
        let continuation: CheckedContinuation<Lease, any Error>? = state.withLock { s in
            guard let i = s.waiters.firstIndex(where: { $0.id == id }) else { return nil }
            return s.waiters.remove(at: i).continuation
        }
        continuation?.resume(throwing: error)
    }

    func close() async {
        let (idle, waiters) = state.withLock { s in
            s.closed = true
            let idle = s.idle
            s.open -= idle.count
            s.idle = []
            let waiters = Array(s.waiters)
            s.waiters.removeAll()
            return (idle, waiters)
        }
        for w in waiters { w.continuation.resume(throwing: QuotaError.shutdown) }
        for c in idle { try? await c.channel.close() }
    }

    /// A new connection, authenticated when a password is configured.
    private func connect() async throws -> RESPClient {
        let channel: any Channel
        do {
            channel = try await ClientBootstrap(group: group)
                .connectTimeout(TimeAmount(configuration.connectTimeout))
                .channelInitializer { ch in
                    ch.eventLoop.makeCompletedFuture {
                        try ch.pipeline.syncOperations.addHandler(ByteToMessageHandler(RESPValueDecoder()))
                        try ch.pipeline.syncOperations.addHandler(ClientHandler())
                    }
                }
                .connect(unixDomainSocketPath: configuration.socketPath).get()
        } catch {
            throw QuotaError.connectionFailed("cannot connect to \(configuration.socketPath): \(error)")
        }
        let client = RESPClient(channel: channel)
        if let password = configuration.password {
            do {
                let reply = try await Self.send(["AUTH", password], on: client, timeout: configuration.requestTimeout)
                if case .error(let text) = reply { throw QuotaError(reply: text) }
            } catch {
                client.close()
                throw error
            }
        }
        logger.debug("connected")
        return client
    }

    /// `args` on `connection`, waiting at most `timeout` for the reply: then the connection is closed. A broken
    /// connection or a timeout is thrown as a retryable ``QuotaError``; cancellation closes the connection too.
    static func send(_ args: [String], on connection: RESPClient, timeout: Duration) async throws -> RESPValue {
        let channel = connection.channel
        let started = ContinuousClock.now
        let timer = channel.eventLoop.scheduleTask(in: TimeAmount(timeout)) { channel.close(promise: nil) }
        defer { timer.cancel() }
        do {
            return try await withTaskCancellationHandler {
                try await connection.send(args)
            } onCancel: {
                channel.close(promise: nil)
            }
        } catch {
            if Task.isCancelled { throw CancellationError() }
            if ContinuousClock.now - started >= timeout {
                throw QuotaError.timedOut("no reply to \(args[0]) within \(timeout)")
            }
            throw QuotaError.connectionFailed("connection lost before the reply to \(args[0]): \(error)")
        }
    }
}

extension RESPValue {
    /// The text of a bulk or simple string reply.
    fileprivate var bulkText: String? {
        switch self {
        case .bulkString(let b?): return String(buffer: b)
        case .simpleString(let s): return s
        default: return nil
        }
    }
}

extension Duration {
    fileprivate var seconds: Double {
        let (s, atto) = components
        return Double(s) + Double(atto) / 1e18
    }

    fileprivate var milliseconds: Int64 {
        let (s, atto) = components
        return s * 1000 + atto / 1_000_000_000_000_000
    }
}
