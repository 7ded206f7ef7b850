import CHiredis
import Foundation
import Logging
import NIOConcurrencyHelpers

/// One hiredis context, owned by one dedicated thread.
///
/// hiredis contexts block and are not thread-safe, so nothing else touches the
/// context: callers enqueue requests and await them. The owner thread takes
/// everything queued, writes it as one pipeline, then reads the replies in
/// order. Every socket read and write has a timeout; after an I/O error or
/// timeout the context is dropped and the next batch reconnects.
public final class HiredisConnection: @unchecked Sendable {
    public let endpoint: RedisEndpoint
    public let timeout: Duration
    private let maxQueued: Int
    private let logger: Logger

    private struct Request {
        var args: [String]
        var done: @Sendable (Result<RedisValue, RedisError>) -> Void
    }

    private struct State {
        var queue: [Request] = []
        var closed = false
    }

    private let lock = ConditionLock(value: 0)  // 0: idle, 1: work queued
    private var state = State()  // guarded by `lock`
    private var thread: Thread?

    // Owner-thread only.
    private var context: UnsafeMutablePointer<redisContext>?
    private var lastConnectFailure: ContinuousClock.Instant?
    private var lastConnectError = ""

    /// Count of replies read (round trips are batches; this counts commands).
    private let _commands = NIOLockedValueBox<Int>(0)
    public var commandsSent: Int { _commands.withLockedValue { $0 } }

    public init(endpoint: RedisEndpoint, timeout: Duration = .seconds(1), maxQueued: Int = 100_000,
                name: String = "redis", logger: Logger = Logger(label: "quotad.redis")) {
        self.endpoint = endpoint
        self.timeout = timeout
        self.maxQueued = maxQueued
        self.logger = logger
        let t = Thread { [unowned self] in self.run() }
        t.name = name
        self.thread = t
        t.start()
    }

    deinit {
        if let context { redisFree(context) }
    }

    /// Stop the owner thread; queued requests fail with ``RedisError/closed``.
    public func close() {
        lock.lock()
        state.closed = true
        lock.unlock(withValue: 1)
    }

    /// Send one command and wait for its reply. Error replies come back as `.error`, not thrown.
    public func send(_ args: [String]) async throws(RedisError) -> RedisValue {
        let r: Result<RedisValue, RedisError> = await withCheckedContinuation { c in
            enqueue([Request(args: args, done: { c.resume(returning: $0) })])
        }
        return try r.get()
    }

    /// Send several commands as one pipeline; replies in order.
    public func send(batch: [[String]]) async throws(RedisError) -> [RedisValue] {
        if batch.isEmpty { return [] }
        let box = BatchCollector(count: batch.count)
        let r: Result<[RedisValue], RedisError> = await withCheckedContinuation { c in
            box.onDone = { c.resume(returning: $0) }
            enqueue(batch.enumerated().map { (i, args) in Request(args: args, done: { box.set(i, $0) }) })
        }
        return try r.get()
    }

    private func enqueue(_ reqs: [Request]) {
        lock.lock()
        if state.closed {
            lock.unlock()
            for r in reqs { r.done(.failure(.closed)) }
            return
        }
        if state.queue.count + reqs.count > maxQueued {
            lock.unlock()
            for r in reqs { r.done(.failure(.overloaded)) }
            return
        }
        state.queue.append(contentsOf: reqs)
        lock.unlock(withValue: 1)
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

    private func execute(_ batch: [Request]) {
        guard let ctx = connect() else {
            for r in batch { r.done(.failure(.unreachable(lastConnectError))) }
            return
        }
        for r in batch { append(ctx, r.args) }
        var failedAt: Int?
        var failure = ""
        for (i, r) in batch.enumerated() {
            var raw: UnsafeMutableRawPointer?
            if redisGetReply(ctx, &raw) != REDIS_OK || raw == nil {
                failedAt = i
                failure = Self.errorString(ctx)
                break
            }
            let reply = raw!.assumingMemoryBound(to: redisReply.self)
            let value = Self.convert(reply)
            freeReplyObject(raw)
            _commands.withLockedValue { $0 += 1 }
            r.done(.success(value))
        }
        if let failedAt {
            logger.warning("redis connection failed", metadata: ["redis": "\(endpoint)", "error": "\(failure)"])
            redisFree(ctx)
            context = nil
            for r in batch[failedAt...] { r.done(.failure(.unreachable(failure))) }
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

    private var timeval: timeval {
        let (s, a) = timeout.components
        return Glibc.timeval(tv_sec: Int(s), tv_usec: Int(a / 1_000_000_000_000))
    }

    private func connect() -> UnsafeMutablePointer<redisContext>? {
        if let context { return context }
        // Do not hammer a server that is down: one attempt per 100 ms, fail fast in between.
        if let last = lastConnectFailure, ContinuousClock.now - last < .milliseconds(100) { return nil }
        let ctx: UnsafeMutablePointer<redisContext>?
        switch endpoint {
        case .unix(let path): ctx = redisConnectUnixWithTimeout(path, timeval)
        case .tcp(let host, let port): ctx = redisConnectWithTimeout(host, Int32(port), timeval)
        }
        guard let ctx else {
            lastConnectError = "cannot allocate hiredis context"
            lastConnectFailure = .now
            return nil
        }
        if ctx.pointee.err != 0 {
            lastConnectError = "connect to \(endpoint): \(Self.errorString(ctx))"
            lastConnectFailure = .now
            redisFree(ctx)
            return nil
        }
        _ = redisSetTimeout(ctx, timeval)
        if lastConnectFailure != nil {
            logger.info("redis connection restored", metadata: ["redis": "\(endpoint)"])
        }
        lastConnectFailure = nil
        context = ctx
        return ctx
    }

    private static func errorString(_ ctx: UnsafeMutablePointer<redisContext>) -> String {
        withUnsafeBytes(of: ctx.pointee.errstr) { raw in
            let bytes = raw.prefix { $0 != 0 }
            let s = String(decoding: bytes, as: UTF8.self)
            return s.isEmpty ? "error \(ctx.pointee.err)" : s
        }
    }

    private static func convert(_ r: UnsafeMutablePointer<redisReply>) -> RedisValue {
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
