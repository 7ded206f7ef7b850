import Foundation
import Logging
import NIOConcurrencyHelpers
import Synchronization

/// A Redis Cluster, reached through one ``HiredisConnection`` per node (each with its own owner thread,
/// as a standalone Redis is). hiredis 0.14 knows nothing of clusters: the routing is here.
///
/// - A command goes to the master of its key's slot (``ClusterSlot``); commands without a key go to the
///   master the rest of their batch goes to, or any master.
/// - The slot map comes from `CLUSTER SLOTS`, asked of known nodes (healthy first) and then the seeds:
///   lazily before the first call, after every `MOVED`, and after connection failures (with back-off,
///   100 ms doubling to 800 ms while the map does not change), so that the slots of a failed master
///   move to its promoted replica as soon as the cluster has promoted it.
/// - `MOVED slot node`: the slot is given to that node at once, the map is read again, and the command
///   is sent there (it was not executed). `ASK slot node`: `ASKING` and the command, pipelined on that
///   node's connection, once per redirect. `TRYAGAIN` (a multi-key call while its slot migrates): sent
///   again every 20 ms within the call's timeout. At most 5 redirects per call.
/// - A call that could not be sent to its node (unreachable) is sent again once if the map, read again,
///   names another master; a call that may have run (no reply) is never sent again: it fails, as it
///   does on a standalone Redis, and the caller (who knows whether it is idempotent) decides.
public final class RedisClusterRouter: Sendable {
    public let seeds: [RedisEndpoint]
    public let timeout: Duration
    private let logger: Logger

    static let maxRedirects = 5

    private struct Topology {
        /// Slot → name (`host:port`) of the master serving it; "" while unknown.
        var owner = [String](repeating: "", count: ClusterSlot.count)
        var masters: [String] = []
        var replicas: [String] = []
        var loaded = false
        var connections: [String: HiredisConnection] = [:]
        /// When a call to a node last failed to connect or get a reply (those nodes are asked last).
        var failedAt: [String: ContinuousClock.Instant] = [:]
        var refreshing = false
        var lastRefresh: ContinuousClock.Instant?
        var backoff: Duration = RedisClusterRouter.minBackoff
        var closed = false
    }

    static let minBackoff: Duration = .milliseconds(100)
    static let maxBackoff: Duration = .milliseconds(800)

    private let state = Mutex(Topology())
    private let _refreshes = Atomic<Int>(0)
    private let _redirects = Atomic<Int>(0)

    /// Topology reads done (`CLUSTER SLOTS`), and `MOVED`/`ASK` redirects followed, since start.
    public var refreshes: Int { _refreshes.load(ordering: .relaxed) }
    public var redirects: Int { _redirects.load(ordering: .relaxed) }

    public init(seeds: [RedisEndpoint], timeout: Duration = .seconds(1), logger: Logger) {
        self.seeds = seeds
        self.timeout = timeout
        self.logger = logger
    }

    /// Close every node's connection; queued calls fail with ``RedisError/closed``.
    public func close() {
        let conns = state.withLock { s in
            s.closed = true
            return Array(s.connections.values)
        }
        for c in conns { c.close() }
    }

    /// Replies read, over every node.
    public var commandsSent: Int { state.withLock { Array($0.connections.values) }.reduce(0) { $0 + $1.commandsSent } }
    /// Replies that came after their call had timed out, over every node.
    public var lateReplies: Int { state.withLock { Array($0.connections.values) }.reduce(0) { $0 + $1.lateReplies } }

    /// The masters as last read (`host:port`).
    public var masters: [String] { state.withLock { $0.masters } }

    /// The master serving `slot` as last read, or nil.
    public func master(ofSlot slot: Int) -> String? {
        state.withLock { s in s.owner[slot].isEmpty ? nil : s.owner[slot] }
    }

    // MARK: Calls

    /// Send one command to the master of its key's slot, following redirects. Error replies other than
    /// redirects come back as `.error`.
    public func send(_ args: [String]) async throws(RedisError) -> RedisValue {
        try await send(args, slot: ClusterSlot.of(command: args))
    }

    func send(_ args: [String], slot: Int?) async throws(RedisError) -> RedisValue {
        let deadline = ContinuousClock.now + timeout
        var ask: String?
        var redirects = 0
        var resent = false
        while true {
            let node: String
            if let a = ask { node = a } else { node = try await self.node(for: slot) }
            let conn = try connection(node)
            let reply: RedisValue
            do {
                if ask != nil {
                    let r = try await conn.send(batch: [["ASKING"], args])
                    reply = r[1]
                } else {
                    reply = try await conn.send(args)
                }
            } catch {
                noteFailure(node)
                _ = await refresh(.connectionFailure)
                // Not sent: safe to send to the master the map names now, if that is another node.
                if case .unreachable = error, !resent, ask == nil, let now = self.owner(slot), now != node {
                    resent = true
                    continue
                }
                throw error
            }
            ask = nil
            guard case .error(let e) = reply else { return reply }
            if e.hasPrefix("MOVED ") || e.hasPrefix("ASK "), let (s, target) = Self.redirect(e), redirects < Self.maxRedirects {
                redirects += 1
                _redirects.add(1, ordering: .relaxed)
                if e.hasPrefix("MOVED ") {
                    logger.debug("redis cluster: slot moved", metadata: ["slot": "\(s)", "node": "\(target)"])
                    state.withLock { $0.owner[s] = target }
                    _ = await refresh(.moved)
                } else {
                    ask = target
                }
                continue
            }
            if e.hasPrefix("TRYAGAIN"), ContinuousClock.now + .milliseconds(20) < deadline {
                try? await Task.sleep(for: .milliseconds(20))
                continue
            }
            if e.hasPrefix("CLUSTERDOWN") || e.hasPrefix("MASTERDOWN") {
                _ = await refresh(.connectionFailure)
            }
            return reply
        }
    }

    /// Send several commands: one pipeline per node, the nodes in parallel; replies in order. A command
    /// redirected (`MOVED`, `ASK`, `TRYAGAIN`) is sent again on its own. Throws when any part failed (see
    /// ``sendEach(batch:)`` for per-command results): `.unreachable` only when nothing of the batch was
    /// sent, else the first failure that may have run or, if the failed parts were not sent while others
    /// ran, `.timedOut` (the batch as a whole is neither done nor undone).
    public func send(batch: [[String]]) async throws(RedisError) -> [RedisValue] {
        let results = await sendEach(batch: batch)
        return try Self.wholeBatch(results)
    }

    /// The replies of a batch whose parts were answered separately, or the one error that describes it
    /// (`.unreachable` and `.queuedTooLong` only when nothing of it was sent).
    public static func wholeBatch(_ results: [Result<RedisValue, RedisError>]) throws(RedisError) -> [RedisValue] {
        var replies: [RedisValue] = []
        var notSent: RedisError?
        var mayHaveRun: RedisError?
        var ran = false
        for r in results {
            switch r {
            case .success(let v):
                replies.append(v)
                ran = true
            case .failure(let e):
                if e.wasNotSent {
                    if notSent == nil { notSent = e }
                } else if mayHaveRun == nil {
                    mayHaveRun = e
                }
            }
        }
        if let mayHaveRun { throw mayHaveRun }
        if let notSent {
            if !ran { throw notSent }
            throw RedisError.timedOut("part of the batch ran, the rest was not sent: \(notSent)")
        }
        return replies
    }

    /// Send several commands: one pipeline per node, the nodes in parallel. Per command in order: its
    /// reply, or its own failure: `.unreachable` (or `.queuedTooLong`) for one that was not sent (its
    /// node refused the connection), the node's error (a timeout, a broken connection: it may have run)
    /// for one that was. The parts that ran keep their replies when another node fails.
    public func sendEach(batch: [[String]]) async -> [Result<RedisValue, RedisError>] {
        if batch.isEmpty { return [] }
        let slots = batch.map { ClusterSlot.of(command: $0) }
        let batchSlot = slots.first { $0 != nil } ?? nil
        var results = [Result<RedisValue, RedisError>](repeating: .success(.null), count: batch.count)
        var groups: [String: [Int]] = [:]
        var order: [String] = []
        for (i, s) in slots.enumerated() {
            do throws(RedisError) {
                let node = try await node(for: s ?? batchSlot)
                if groups[node] == nil { order.append(node) }
                groups[node, default: []].append(i)
            } catch {
                results[i] = .failure(error)
            }
        }
        var conns: [(String, HiredisConnection)] = []
        for n in order {
            do throws(RedisError) { conns.append((n, try connection(n))) } catch {
                for i in groups[n]! { results[i] = .failure(error) }
            }
        }
        // Child tasks return nothing and leave their answers in a box: a task group whose child tasks
        // return these values crashed release builds (Swift 6.3: a bad retain copying the child's result
        // into the group; debug builds were fine).
        let box = NIOLockedValueBox<[NodeReply<[RedisValue]>]>([])
        await withTaskGroup(of: Void.self) { g in
            for (node, conn) in conns {
                let cmds = groups[node]!.map { batch[$0] }
                g.addTask {
                    let r = await NodeReply.of(node) { () async throws(RedisError) in try await conn.send(batch: cmds) }
                    box.withLockedValue { $0.append(r) }
                }
            }
        }
        let parts = box.withLockedValue { $0 }
        var failed: [String] = []
        for part in parts {
            switch part {
            case .replied(let node, let values):
                for (j, i) in groups[node]!.enumerated() { results[i] = .success(values[j]) }
            case .failed(let node, let e):
                failed.append(node)
                for i in groups[node]! { results[i] = .failure(e) }
            }
        }
        if !failed.isEmpty {
            for n in failed { noteFailure(n) }
            _ = await refresh(.connectionFailure)
        }
        for i in results.indices {
            switch results[i] {
            case .success(.error(let e)) where e.hasPrefix("MOVED ") || e.hasPrefix("ASK ") || e.hasPrefix("TRYAGAIN"):
                results[i] = await Self.result { () async throws(RedisError) in try await self.send(batch[i], slot: slots[i] ?? batchSlot) }
            case .failure(.unreachable):
                // Not sent: safe to send to the master the map names now, if that is another node.
                let slot = slots[i] ?? batchSlot
                if let now = owner(slot), groups[now]?.contains(i) != true {
                    results[i] = await Self.result { () async throws(RedisError) in try await self.send(batch[i], slot: slot) }
                }
            default: break
            }
        }
        return results
    }

    private static func result(_ body: () async throws(RedisError) -> RedisValue) async -> Result<RedisValue, RedisError> {
        do { return .success(try await body()) } catch { return .failure(error) }
    }

    /// Send `args` to every master (`SCRIPT LOAD`, `CONFIG GET`): each master's reply or failure.
    public func sendToMasters(_ args: [String]) async throws(RedisError) -> [(node: String, reply: Result<RedisValue, RedisError>)] {
        try await ensureLoaded()
        var conns: [(String, HiredisConnection)] = []
        for n in masters { conns.append((n, try connection(n))) }
        let box = NIOLockedValueBox<[NodeReply<RedisValue>]>([])
        await withTaskGroup(of: Void.self) { g in
            for (node, conn) in conns {
                g.addTask {
                    let r = await NodeReply.of(node) { () async throws(RedisError) in try await conn.send(args) }
                    box.withLockedValue { $0.append(r) }
                }
            }
        }
        var out: [(node: String, reply: Result<RedisValue, RedisError>)] = []
        for r in box.withLockedValue({ $0 }) {
            switch r {
            case .replied(let n, let v): out.append((n, .success(v)))
            case .failed(let n, let e): out.append((n, .failure(e)))
            }
        }
        return out.sorted { $0.node < $1.node }
    }

    /// Send `args` to every replica the cluster knows (`CLUSTER NODES` asked of a master: it lists replicas
    /// that `CLUSTER SLOTS` leaves out until they have replicated something), except failed ones.
    public func sendToReplicas(_ args: [String]) async throws(RedisError) -> [(node: String, reply: Result<RedisValue, RedisError>)] {
        try await ensureLoaded()
        guard let first = masters.first else { return [] }
        let conn = try connection(first)
        guard let text = try await conn.send(["CLUSTER", "NODES"]).string else {
            throw RedisError.badReply("CLUSTER NODES: not a text reply")
        }
        var out: [(node: String, reply: Result<RedisValue, RedisError>)] = []
        for node in Self.parseReplicas(text, askedHost: Self.host(of: conn.endpoint)) {
            do throws(RedisError) {
                out.append((node, .success(try await connection(node).send(args))))
            } catch {
                out.append((node, .failure(error)))
            }
        }
        return out
    }

    /// The replicas named in a `CLUSTER NODES` reply (`host:port`, sorted), without failed or handshaking ones.
    public static func parseReplicas(_ text: String, askedHost: String) -> [String] {
        var out: [String] = []
        for line in text.split(whereSeparator: \.isNewline) {
            let f = line.split(separator: " ")
            guard f.count >= 3 else { continue }
            let flags = f[2].split(separator: ",")
            guard flags.contains("slave") || flags.contains("replica"),
                !flags.contains("fail"), !flags.contains("handshake"), !flags.contains("noaddr")
            else { continue }
            var addr = String(f[1].prefix { $0 != "@" && $0 != "," })
            if addr.hasPrefix(":") { addr = askedHost + addr }
            guard let colon = addr.lastIndex(of: ":"), Int(addr[addr.index(after: colon)...]) != nil else { continue }
            if !out.contains(addr) { out.append(addr) }
        }
        return out.sorted()
    }

    // MARK: Routing

    private func owner(_ slot: Int?) -> String? {
        state.withLock { s in
            guard let slot else { return s.masters.first }
            return s.owner[slot].isEmpty ? nil : s.owner[slot]
        }
    }

    /// The master to send a command of `slot` to (any master for nil).
    private func node(for slot: Int?) async throws(RedisError) -> String {
        try await ensureLoaded()
        if let n = owner(slot) { return n }
        _ = await refresh(.connectionFailure)
        if let n = owner(slot) { return n }
        throw RedisError.unreachable("Redis Cluster: no master serves slot \(slot.map(String.init) ?? "?") (seeds \(seedList))")
    }

    private var seedList: String { seeds.map(\.description).joined(separator: ",") }

    private func ensureLoaded() async throws(RedisError) {
        let deadline = ContinuousClock.now + timeout
        while !state.withLock({ $0.loaded }) {
            if state.withLock({ $0.closed }) { throw RedisError.closed }
            if await refresh(.initial) { continue }
            if state.withLock({ $0.loaded }) { return }
            guard ContinuousClock.now < deadline else {
                throw RedisError.unreachable("Redis Cluster: no seed answered CLUSTER SLOTS (seeds \(seedList))")
            }
            try? await Task.sleep(for: .milliseconds(20))
        }
    }

    private func connection(_ node: String) throws(RedisError) -> HiredisConnection {
        let r: Result<HiredisConnection, RedisError> = state.withLock { s in
            if s.closed { return .failure(.closed) }
            if let c = s.connections[node] { return .success(c) }
            let endpoint: RedisEndpoint
            if let seed = seeds.first(where: { $0.description == node }) {
                endpoint = seed
            } else if let colon = node.lastIndex(of: ":"), let port = Int(node[node.index(after: colon)...]) {
                endpoint = .tcp(host: String(node[..<colon]), port: port)
            } else {
                return .failure(.badReply("Redis Cluster: bad node address '\(node)'"))
            }
            let c = HiredisConnection(endpoint: endpoint, timeout: timeout, name: "redis-\(node.suffix(8))", logger: logger)
            s.connections[node] = c
            return .success(c)
        }
        return try r.get()
    }

    private func noteFailure(_ node: String) {
        state.withLock { $0.failedAt[node] = .now }
    }

    // MARK: Topology

    enum RefreshReason { case initial, moved, connectionFailure }

    /// Read the slot map again, unless a read is under way or (after connection failures) the back-off
    /// has not passed. Returns true when a new map was installed that differs from the old one (always
    /// true for the first).
    @discardableResult
    func refresh(_ reason: RefreshReason) async -> Bool {
        let now = ContinuousClock.now
        let candidates: [String]? = state.withLock { s in
            if s.closed || s.refreshing { return nil }
            if let last = s.lastRefresh {
                switch reason {
                case .initial: if now - last < .milliseconds(100) { return nil }
                case .moved: if now - last < .milliseconds(20) { return nil }
                case .connectionFailure: if now - last < s.backoff { return nil }
                }
            }
            s.refreshing = true
            let failed = s.failedAt
            let known = (s.masters + s.replicas).sorted { a, b in
                switch (failed[a], failed[b]) {
                case (nil, nil): return false
                case (nil, _): return true
                case (_, nil): return false
                case (let x?, let y?): return x < y
                }
            }
            let seedNames = seeds.map(\.description).filter { !known.contains($0) }
            return known + seedNames
        }
        guard let candidates else { return false }
        _refreshes.add(1, ordering: .relaxed)
        var found: (owner: [String], masters: [String], replicas: [String])?
        var errors: [String] = []
        for node in candidates {
            guard let conn = try? connection(node) else { continue }
            do {
                let r = try await conn.send(["CLUSTER", "SLOTS"])
                if case .error(let e) = r {
                    errors.append("\(node): \(e)")
                    continue
                }
                if let t = Self.parseSlots(r, askedHost: Self.host(of: conn.endpoint)) {
                    found = t
                    break
                }
                errors.append("\(node): no slots")
            } catch {
                errors.append("\(node): \(error)")
                state.withLock { $0.failedAt[node] = .now }
            }
        }
        let changed: Bool = state.withLock { s in
            s.refreshing = false
            s.lastRefresh = .now
            guard let found else {
                s.backoff = min(s.backoff * 2, Self.maxBackoff)
                return false
            }
            let changed = !s.loaded || s.owner != found.owner
            s.owner = found.owner
            s.masters = found.masters
            s.replicas = found.replicas
            s.loaded = true
            s.backoff = changed ? Self.minBackoff : min(s.backoff * 2, Self.maxBackoff)
            return changed
        }
        if let found, changed {
            logger.info("redis cluster topology", metadata: [
                "masters": "\(found.masters.joined(separator: ","))", "replicas": "\(found.replicas.count)",
            ])
        } else if found == nil {
            logger.warning("redis cluster topology unknown: no node answered CLUSTER SLOTS",
                           metadata: ["errors": "\(errors.prefix(4).joined(separator: "; "))"])
        }
        return changed
    }

    static func host(of e: RedisEndpoint) -> String {
        if case .tcp(let h, _) = e { return h }
        return "127.0.0.1"
    }

    /// `MOVED 3999 127.0.0.1:6381` / `ASK 3999 127.0.0.1:6381` → (slot, node).
    static func redirect(_ e: String) -> (Int, String)? {
        let p = e.split(separator: " ")
        guard p.count >= 3, let slot = Int(p[1]), slot >= 0, slot < ClusterSlot.count else { return nil }
        var node = String(p[2])
        if node.hasPrefix(":") { node = "127.0.0.1" + node }  // an empty announced host
        return (slot, node)
    }

    /// A `CLUSTER SLOTS` reply: the slot owners, the masters and the replicas; nil when it covers nothing.
    static func parseSlots(_ r: RedisValue, askedHost: String) -> (owner: [String], masters: [String], replicas: [String])? {
        guard let ranges = r.array, !ranges.isEmpty else { return nil }
        var owner = [String](repeating: "", count: ClusterSlot.count)
        var masters: [String] = []
        var replicas: [String] = []
        func name(_ v: RedisValue) -> String? {
            guard let a = v.array, a.count >= 2, let port = a[1].int else { return nil }
            var host = a[0].string ?? ""
            if host.isEmpty || host == "?" { host = askedHost }
            return "\(host):\(port)"
        }
        for range in ranges {
            guard let a = range.array, a.count >= 3, let lo = a[0].int, let hi = a[1].int, lo >= 0, hi < ClusterSlot.count, lo <= hi,
                let m = name(a[2])
            else { continue }
            for s in lo...hi { owner[s] = m }
            if !masters.contains(m) { masters.append(m) }
            for rep in a.dropFirst(3) {
                if let n = name(rep), !replicas.contains(n) { replicas.append(n) }
            }
        }
        guard !masters.isEmpty else { return nil }
        return (owner, masters.sorted(), replicas.sorted())
    }
}

/// One node's answer to a call sent to several nodes at once (a task group's element).
enum NodeReply<T: Sendable>: Sendable {
    case replied(String, T)
    case failed(String, RedisError)

    static func of(_ node: String, _ body: () async throws(RedisError) -> T) async -> NodeReply<T> {
        do { return .replied(node, try await body()) } catch { return .failed(node, error) }
    }
}
