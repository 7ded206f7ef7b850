import Foundation
import Glibc
import Logging
import QuotaCore
import QuotaJournal
import QuotaRedis

/// A real Redis Cluster on loopback: `masters` masters and `replicas` replicas of each, every node a
/// `redis-server --cluster-enabled yes` on ports from ``freePort()`` (the cluster bus on another free
/// port), joined by `redis-cli --cluster create … --cluster-yes`, ready when every node says
/// `cluster_state:ok` (and every replica is in sync). Nodes are durable (AOF, fsync always), fail over
/// after `nodeTimeoutMs`, and serve the slots they have when another master is down
/// (`cluster-require-full-coverage no`).
public final class RedisClusterServer: @unchecked Sendable {
    public struct Node: Sendable {
        public var port: Int
        public var busPort: Int
        public var dir: String
    }

    public let dir = TempDir()
    public private(set) var nodes: [Node] = []
    private var children: [Int: ChildProcess] = [:]
    private var direct: [Int: HiredisConnection] = [:]
    private let lock = NSLock()
    /// A store on the cluster (routed, as quotad's).
    public let store: QuotaStore
    public let nodeTimeoutMs: Int

    /// `redis-cluster://` URL naming every node as a seed.
    public var url: String { "redis-cluster://" + nodes.map { "127.0.0.1:\($0.port)" }.joined(separator: ",") }

    public init(masters: Int = 3, replicas: Int = 0, nodeTimeoutMs: Int = 1000) async throws {
        self.nodeTimeoutMs = nodeTimeoutMs
        var used: Set<Int> = []
        func port() throws -> Int {
            while true {
                let p = try freePort()
                if used.insert(p).inserted { return p }
            }
        }
        for i in 0..<(masters * (1 + replicas)) {
            let d = dir.file("n\(i)")
            try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
            nodes.append(Node(port: try port(), busPort: try port(), dir: d))
        }
        var logger = Logger(label: "test.redis-cluster")
        logger.logLevel = .critical
        store = try QuotaStore(url: "redis-cluster://" + nodes.map { "127.0.0.1:\($0.port)" }.joined(separator: ","),
                               timeout: .seconds(2), logger: logger)
        for n in nodes { try start(n) }
        for n in nodes {
            try await eventually("redis node \(n.port) answers PING") { try await self.command(n.port, "PING") == .status("PONG") }
        }
        let create = try ChildProcess(
            "/usr/bin/redis-cli",
            ["--cluster", "create"] + nodes.map { "127.0.0.1:\($0.port)" } + ["--cluster-replicas", String(replicas), "--cluster-yes"],
            log: dir.file("create.log"))
        guard try await create.wait(timeout: .seconds(30)) == 0 else { throw TestError.failed("redis-cli --cluster create: \(create.output)") }
        try await waitHealthy(masters: masters, replicas: masters * replicas, timeout: .seconds(30))
    }

    private func start(_ n: Node) throws {
        let args = [
            "--port", String(n.port), "--bind", "127.0.0.1", "--dir", n.dir, "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf", "--cluster-port", String(n.busPort),
            "--cluster-node-timeout", String(nodeTimeoutMs), "--cluster-replica-validity-factor", "0",
            "--cluster-require-full-coverage", "no", "--appendonly", "yes", "--appendfsync", "always", "--save", "",
            "--enable-debug-command", "yes", "--unixsocket", n.dir + "/redis.sock", "--unixsocketperm", "700",
        ]
        let c = try ChildProcess("/usr/bin/redis-server", args, log: n.dir + "/redis.log")
        lock.withLock { children[n.port] = c }
    }

    /// The Unix socket a node also listens on (for load generators that speak to one node).
    public func socketPath(_ port: Int) -> String? { nodes.first { $0.port == port }.map { $0.dir + "/redis.sock" } }

    /// A connection to one node (not routed: commands there may be answered `MOVED`).
    public func node(_ port: Int) -> HiredisConnection {
        lock.withLock {
            if let c = direct[port] { return c }
            var logger = Logger(label: "test.redis-node")
            logger.logLevel = .critical
            let c = HiredisConnection(endpoint: .tcp(host: "127.0.0.1", port: port), timeout: .seconds(5), logger: logger)
            direct[port] = c
            return c
        }
    }

    /// Send a command to one node.
    @discardableResult
    public func command(_ port: Int, _ args: String...) async throws -> RedisValue { try await node(port).send(args) }

    public func isRunning(_ port: Int) -> Bool { lock.withLock { children[port]?.isRunning ?? false } }

    /// The port of the master serving `slot`, asked of a running node.
    public func masterPort(ofSlot slot: Int) async throws -> Int {
        for n in nodes where isRunning(n.port) {
            guard let ranges = try? await command(n.port, "CLUSTER", "SLOTS").array else { continue }
            for r in ranges {
                guard let a = r.array, a.count >= 3, let lo = a[0].int, let hi = a[1].int, lo <= slot, slot <= hi,
                    let m = a[2].array, m.count >= 2, let p = m[1].int
                else { continue }
                return p
            }
        }
        throw TestError.failed("no running node knows the master of slot \(slot)")
    }

    /// Ports of the masters, as a running node sees them.
    public func masterPorts() async throws -> [Int] {
        for n in nodes where isRunning(n.port) {
            guard let ranges = try? await command(n.port, "CLUSTER", "SLOTS").array else { continue }
            return Set(ranges.compactMap { $0.array.flatMap { $0.count >= 3 ? $0[2].array?[1].int : nil } }).sorted()
        }
        throw TestError.failed("no running node answers CLUSTER SLOTS")
    }

    /// The hash slot of voucher `id`'s keys.
    public static func slot(ofVoucher id: String) -> Int { ClusterSlot.of("quota:{\(id)}") }

    public func nodeID(_ port: Int) async throws -> String {
        guard let id = try await command(port, "CLUSTER", "MYID").string else { throw TestError.failed("CLUSTER MYID on \(port)") }
        return id
    }

    /// Wait until every running node says `cluster_state:ok`, `masters` masters serve all slots, and
    /// `replicas` replicas are in sync with their master.
    public func waitHealthy(masters: Int, replicas: Int, timeout: Duration) async throws {
        try await eventually("redis cluster healthy", timeout: timeout) {
            var synced = 0
            for n in self.nodes where self.isRunning(n.port) {
                guard let info = try await self.command(n.port, "CLUSTER", "INFO").string, info.contains("cluster_state:ok"),
                    info.contains("cluster_slots_assigned:16384")
                else { return false }
                let repl = try await self.command(n.port, "INFO", "replication").string ?? ""
                if repl.contains("role:slave") {
                    guard repl.contains("master_link_status:up") else { return false }
                    synced += 1
                }
            }
            guard synced >= replicas else { return false }
            return try await self.masterPorts().count == masters
        }
    }

    /// kill -9 one node.
    public func kill9(_ port: Int) async throws {
        let c = lock.withLock { children[port] }
        c?.signal(SIGKILL)
        _ = try await c?.wait()
    }

    /// Move `slot` to the master on `port`, as `redis-cli --cluster reshard` does: IMPORTING on the
    /// target, MIGRATING on the source, `MIGRATE` of its keys (pausing `pause` after marking the slot, so
    /// that clients meet `ASK`/`TRYAGAIN`), then `SETSLOT … NODE` on every master.
    public func migrate(slot: Int, to port: Int, pause: Duration = .zero) async throws {
        let from = try await masterPort(ofSlot: slot)
        guard from != port else { return }
        let fromID = try await nodeID(from)
        let toID = try await nodeID(port)
        func ok(_ r: RedisValue, _ what: String) throws {
            if case .error(let e) = r { throw TestError.failed("\(what): \(e)") }
        }
        try ok(try await command(port, "CLUSTER", "SETSLOT", String(slot), "IMPORTING", fromID), "SETSLOT IMPORTING")
        try ok(try await command(from, "CLUSTER", "SETSLOT", String(slot), "MIGRATING", toID), "SETSLOT MIGRATING")
        if pause > .zero { try await Task.sleep(for: pause) }
        while true {
            let keys = (try await command(from, "CLUSTER", "GETKEYSINSLOT", String(slot), "100").array ?? []).compactMap(\.string)
            if keys.isEmpty { break }
            try ok(try await node(from).send(["MIGRATE", "127.0.0.1", String(port), "", "0", "5000", "KEYS"] + keys), "MIGRATE")
        }
        if pause > .zero { try await Task.sleep(for: pause) }
        for m in try await masterPorts() {
            try ok(try await command(m, "CLUSTER", "SETSLOT", String(slot), "NODE", toID), "SETSLOT NODE on \(m)")
        }
    }

    /// Pool, tokens outstanding in open leases, open leases, leased, returned and restocked totals.
    public func account(_ voucher: String) async throws
        -> (pool: Int, outstanding: Int, leases: Int, leased: Int, returned: Int, restocked: Int)
    {
        guard let rec = try await store.voucher(voucher) else { throw TestError.failed("no voucher '\(voucher)' in Redis") }
        let open = try await store.leases(voucher: voucher).filter { $0.state == .open }
        return (rec.pool, open.reduce(0) { $0 + $1.outstanding }, open.count, rec.leased, rec.returned, rec.restocked)
    }

    /// Every accounting problem of `voucher` (as ``RedisServer/audit(_:journals:netClaimed:)``).
    public func audit(_ voucher: String, journals: [(host: String, dir: String)] = [], netClaimed: Int? = nil) async throws
        -> [String]
    {
        try await store.auditProblems(voucher, journals: journals, netClaimed: netClaimed)
    }

    deinit {
        store.connection.close()
        for c in direct.values { c.close() }
        for c in children.values where c.isRunning { c.signal(SIGKILL) }
    }
}

extension Quotad {
    /// A sidecar of region `sg` on the Redis at `redisURL` (a `redis-cluster://` URL, say), with a journal
    /// under `dir` unless `durability` says otherwise.
    public convenience init(redisURL: String, dir: TempDir, host: String, durability: String = "journal",
                            extraYAML: String = "") async throws {
        let socket = dir.file("\(host).sock")
        let config = dir.file("\(host).yaml")
        var yaml = """
            host_id: \(host)
            region: sg
            regions:
              sg: { redis: "\(redisURL)" }
            socket: { path: \(socket) }
            durability: \(durability)

            """
        if durability == "journal" { yaml += "journal: { dir: \(dir.file("journal-\(host)")), segment_bytes: 65536 }\n" }
        yaml += extraYAML
        try yaml.write(toFile: config, atomically: true, encoding: .utf8)
        try await self.init(config: config, socket: socket, host: host, log: dir.file("\(host).log"))
    }
}
