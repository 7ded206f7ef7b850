import CHiredis
import Foundation
import Logging
import NIOConcurrencyHelpers
import Synchronization

/// One hiredis context, owned by one dedicated thread.
///
/// hiredis contexts block and are not thread-safe, so nothing else touches the
/// context: callers enqueue requests and await them. The owner thread takes
/// everything queued, writes it as one pipeline, then reads the replies in
/// order.
///
/// Every call has its own deadline (`timeout`), kept by a watchdog thread: a call not answered in
/// time fails with ``RedisError/timedOut(_:)`` (sent: it may have been executed) or
/// ``RedisError/unreachable(_:)`` (still queued: it was not sent, and now never will be). A slow
/// reply therefore fails only the calls that really waited too long; the connection keeps reading
/// the replies behind it, which still answer their calls if those are within their own deadlines.
/// The connection is dropped only when the socket is silent for `socketTimeout` (or breaks).
public final class HiredisConnection: @unchecked Sendable {
    public let endpoint: RedisEndpoint
    public let timeout: Duration
    /// A socket silent this long while replies are owed is dead: it is dropped and reconnected.
    public let socketTimeout: Duration
    private let maxQueued: Int
    private let logger: Logger

    /// One call: completed exactly once, by its reply, its failure, or the watchdog.
    private final class Call: Sendable {
        let args: [String]
        let deadline: ContinuousClock.Instant
        private let done: @Sendable (Result<RedisValue, RedisError>) -> Void
        /// 0 queued, 1 sent, 2 completed.
        private let state = Atomic<UInt8>(0)

        init(args: [String], deadline: ContinuousClock.Instant, done: @escaping @Sendable (Result<RedisValue, RedisError>) -> Void) {
            self.args = args
            self.deadline = deadline
            self.done = done
        }

        /// Mark as sent; false if the watchdog completed it already (then it must not be sent).
        func markSent() -> Bool { state.compareExchange(expected: 0, desired: 1, ordering: .acquiringAndReleasing).exchanged }

        var isCompleted: Bool { state.load(ordering: .acquiring) == 2 }

        func complete(_ r: Result<RedisValue, RedisError>) {
            if state.exchange(2, ordering: .acquiringAndReleasing) != 2 { done(r) }
        }

        /// The deadline passed: fail it, saying whether it was sent.
        func expire() {
            let was = state.exchange(2, ordering: .acquiringAndReleasing)
            switch was {
            case 0: done(.failure(.queuedTooLong("queued behind slower calls past the call timeout")))
            case 1: done(.failure(.timedOut("no reply within the call timeout")))
            default: break
            }
        }
    }

    private struct State {
        var queue: [Call] = []
        var closed = false
    }

    private let lock = ConditionLock(value: 0)  // 0: idle, 1: work queued
    private var state = State()  // guarded by `lock`
    private var thread: Thread?
    private var watchdog: Thread?
    /// Calls not yet completed, in deadline order (every call has the same timeout), for the watchdog.
    private let watched = NIOLockedValueBox<[Call]>([])
    private let stopped = Atomic<Bool>(false)

    // Owner-thread only.
    private var context: UnsafeMutablePointer<redisContext>?
    private var lastConnectFailure: ContinuousClock.Instant?
    private var lastConnectError = ""

    /// Count of replies read (round trips are batches; this counts commands).
    private let _commands = Atomic<Int>(0)
    public var commandsSent: Int { _commands.load(ordering: .relaxed) }
    /// Replies that came after their call had timed out.
    private let _late = Atomic<Int>(0)
    public var lateReplies: Int { _late.load(ordering: .relaxed) }

    public init(endpoint: RedisEndpoint, timeout: Duration = .seconds(1), socketTimeout: Duration? = nil,
                maxQueued: Int = 100_000, name: String = "redis", logger: Logger = Logger(label: "quotad.redis")) {
        self.endpoint = endpoint
        self.timeout = timeout
        self.socketTimeout = socketTimeout ?? max(timeout * 5, .seconds(5))
        self.maxQueued = maxQueued
        self.logger = logger
        let t = Thread { [self] in self.run() }
        t.name = name
        self.thread = t
        t.start()
        let w = Thread { [self] in self.watch() }
        w.name = name + "-watchdog"
        self.watchdog = w
        w.start()
    }

    deinit {
        if let context { redisFree(context) }
    }

    /// Stop the owner thread; queued requests fail with ``RedisError/closed``.
    public func close() {
        lock.lock()
        state.closed = true
        lock.unlock(withValue: 1)
        stopped.store(true, ordering: .relaxed)
    }

    /// Send one command and wait for its reply. Error replies come back as `.error`, not thrown.
    public func send(_ args: [String]) async throws(RedisError) -> RedisValue {
        let r: Result<RedisValue, RedisError> = await withCheckedContinuation { c in
            enqueue([args], { _, r in c.resume(returning: r) })
        }
        return try r.get()
    }

    /// Send several commands as one pipeline; replies in order.
    public func send(batch: [[String]]) async throws(RedisError) -> [RedisValue] {
        if batch.isEmpty { return [] }
        let box = BatchCollector(count: batch.count)
        let r: Result<[RedisValue], RedisError> = await withCheckedContinuation { c in
            box.onDone = { c.resume(returning: $0) }
            enqueue(batch) { i, r in box.set(i, r) }
        }
        return try r.get()
    }

    private func enqueue(_ batch: [[String]], _ done: @escaping @Sendable (Int, Result<RedisValue, RedisError>) -> Void) {
        let deadline = ContinuousClock.now + timeout
        let calls = batch.enumerated().map { (i, args) in Call(args: args, deadline: deadline, done: { done(i, $0) }) }
        lock.lock()
        if state.closed {
            lock.unlock()
            for c in calls { c.complete(.failure(.closed)) }
            return
        }
        if state.queue.count + calls.count > maxQueued {
            lock.unlock()
            for c in calls { c.complete(.failure(.overloaded)) }
            return
        }
        state.queue.append(contentsOf: calls)
        watched.withLockedValue { $0.append(contentsOf: calls) }
        lock.unlock(withValue: 1)
    }

    // MARK: - Watchdog

    private func watch() {
        while !stopped.load(ordering: .relaxed) {
            usleep(10_000)
            let now = ContinuousClock.now
            let expired = watched.withLockedValue { w -> [Call] in
                var n = 0
                while n < w.count, w[n].isCompleted || w[n].deadline <= now { n += 1 }
                guard n > 0 else { return [] }
                let out = Array(w[..<n])
                w.removeFirst(n)
                return out
            }
            for c in expired where !c.isCompleted { c.expire() }
        }
        let rest = watched.withLockedValue { w -> [Call] in
            defer { w.removeAll() }
            return w
        }
        for c in rest { c.complete(.failure(.closed)) }
    }

    // MARK: - Owner thread

    private func run() {
        while true {
            lock.lock(whenValue: 1)
            let batch = state.queue
            let closed = state.closed
            state.queue.removeAll(keepingCapacity: true)
            lock.unlock(withValue: 0)
            if !batch.isEmpty { execute(batch) }
            if closed {
                if let c = context { redisFree(c) }
                context = nil
                return
            }
        }
    }

    private func execute(_ batch: [Call]) {
        // Calls the watchdog already failed are not sent.
        let live = batch.filter { !$0.isCompleted }
        guard !live.isEmpty else { return }
        guard let ctx = connect() else {
            for c in live { c.complete(.failure(.unreachable(lastConnectError))) }
            return
        }
        var sent: [Call] = []
        sent.reserveCapacity(live.count)
        for c in live where c.markSent() {
            append(ctx, c.args)
            sent.append(c)
        }
        var failedAt: Int?
        var failure = ""
        for (i, c) in sent.enumerated() {
            var raw: UnsafeMutableRawPointer?
            if redisGetReply(ctx, &raw) != REDIS_OK || raw == nil {
                failedAt = i
                failure = Self.errorString(ctx)
                break
            }
            let reply = raw!.assumingMemoryBound(to: redisReply.self)
            let value = Self.convert(reply)
            freeReplyObject(raw)
            _commands.add(1, ordering: .relaxed)
            if c.isCompleted { _late.add(1, ordering: .relaxed) }
            c.complete(.success(value))
        }
        if let failedAt {
            logger.warning("redis connection failed", metadata: ["redis": "\(endpoint)", "error": "\(failure)"])
            redisFree(ctx)
            context = nil
            // Sent, and no reply: each of these may have been executed.
            for c in sent[failedAt...] { c.complete(.failure(.timedOut(failure))) }
        }
    }

    /// Append one command: all arguments packed into one buffer (one allocation, not one per argument).
    private func append(_ ctx: UnsafeMutablePointer<redisContext>, _ args: [String]) {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(args.reduce(0) { $0 + $1.utf8.count })
        var lens: [Int] = []
        lens.reserveCapacity(args.count)
        for a in args {
            bytes.append(contentsOf: a.utf8)
            lens.append(a.utf8.count)
        }
        bytes.withUnsafeBufferPointer { buf in
            let base = UnsafeRawPointer(buf.baseAddress ?? UnsafePointer(bitPattern: 1)!).assumingMemoryBound(to: CChar.self)
            var ptrs: [UnsafePointer<CChar>?] = []
            ptrs.reserveCapacity(args.count)
            var off = 0
            for l in lens {
                ptrs.append(base + off)
                off += l
            }
            ptrs.withUnsafeMutableBufferPointer { p in
                lens.withUnsafeMutableBufferPointer { l in
                    _ = redisAppendCommandArgv(ctx, Int32(args.count), p.baseAddress, l.baseAddress)
                }
            }
        }
    }

    static func timeval(_ d: Duration) -> timeval {
        let (s, a) = d.components
        return Glibc.timeval(tv_sec: Int(s), tv_usec: Int(a / 1_000_000_000_000))
    }

    struct OpenError: Error { var message: String }

    /// A new connected context (the caller owns it), or why not.
    static func open(_ endpoint: RedisEndpoint, timeout: Duration) -> Result<UnsafeMutablePointer<redisContext>, OpenError> {
        let ctx: UnsafeMutablePointer<redisContext>?
        switch endpoint {
        case .unix(let path): ctx = redisConnectUnixWithTimeout(path, timeval(timeout))
        case .tcp(let host, let port): ctx = redisConnectWithTimeout(host, Int32(port), timeval(timeout))
        case .cluster: return .failure(OpenError(message: "\(endpoint) is a Redis Cluster: connect to one of its nodes"))
        }
        guard let ctx else { return .failure(OpenError(message: "cannot allocate hiredis context")) }
        if ctx.pointee.err != 0 {
            let e = OpenError(message: "connect to \(endpoint): \(errorString(ctx))")
            redisFree(ctx)
            return .failure(e)
        }
        return .success(ctx)
    }

    private func connect() -> UnsafeMutablePointer<redisContext>? {
        if let context { return context }
        // Do not hammer a server that is down: one attempt per 100 ms, fail fast in between.
        if let last = lastConnectFailure, ContinuousClock.now - last < .milliseconds(100) { return nil }
        let ctx: UnsafeMutablePointer<redisContext>
        switch Self.open(endpoint, timeout: timeout) {
        case .failure(let e):
            lastConnectError = e.message
            lastConnectFailure = .now
            return nil
        case .success(let c): ctx = c
        }
        _ = redisSetTimeout(ctx, Self.timeval(socketTimeout))
        if lastConnectFailure != nil {
            logger.info("redis connection restored", metadata: ["redis": "\(endpoint)"])
        }
        lastConnectFailure = nil
        context = ctx
        return ctx
    }

    static func errorString(_ ctx: UnsafeMutablePointer<redisContext>) -> String {
        withUnsafeBytes(of: ctx.pointee.errstr) { raw in
            let bytes = raw.prefix { $0 != 0 }
            let s = String(decoding: bytes, as: UTF8.self)
            return s.isEmpty ? "error \(ctx.pointee.err)" : s
        }
    }

    static func convert(_ r: UnsafeMutablePointer<redisReply>) -> RedisValue {
        let p = r.pointee
        func text() -> String {
            guard let s = p.str else { return "" }
            return String(decoding: UnsafeRawBufferPointer(start: s, count: Int(p.len)), as: UTF8.self)
        }
        switch p.type {
        case REDIS_REPLY_STRING: return .string(text())
        case REDIS_REPLY_STATUS: return .status(text())
        case REDIS_REPLY_ERROR: return .error(text())
        case REDIS_REPLY_INTEGER: return .integer(p.integer)
        case REDIS_REPLY_NIL: return .null
        case REDIS_REPLY_ARRAY:
            var items: [RedisValue] = []
            items.reserveCapacity(Int(p.elements))
            for i in 0..<Int(p.elements) {
                if let e = p.element[i] { items.append(convert(e)) }
            }
            return .array(items)
        default: return .error("unsupported reply type \(p.type)")
        }
    }
}

/// Gathers the replies of one pipelined batch; completes once, on the first failure or the last reply.
private final class BatchCollector: @unchecked Sendable {
    private let lock = NIOLock()
    private var values: [RedisValue?]
    private var remaining: Int
    private var finished = false
    var onDone: (@Sendable (Result<[RedisValue], RedisError>) -> Void)?

    init(count: Int) {
        values = Array(repeating: nil, count: count)
        remaining = count
    }

    func set(_ i: Int, _ r: Result<RedisValue, RedisError>) {
        let done: (@Sendable (Result<[RedisValue], RedisError>) -> Void)?
        let result: Result<[RedisValue], RedisError>
        lock.lock()
        if finished {
            lock.unlock()
            return
        }
        switch r {
        case .failure(let e):
            finished = true
            result = .failure(e)
        case .success(let v):
            values[i] = v
            remaining -= 1
            guard remaining == 0 else {
                lock.unlock()
                return
            }
            finished = true
            result = .success(values.map { $0! })
        }
        done = onDone
        lock.unlock()
        done?(result)
    }
}
