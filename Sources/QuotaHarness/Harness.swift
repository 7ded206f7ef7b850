import Foundation
import Glibc
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import QuotaClient
import QuotaKafka
import QuotaRESP
import QuotaCore
import QuotaJournal
import QuotaRedis

/// Where the built executables are: `QUOTAD_BIN_DIR`, else next to this test bundle.
public enum Bin {
    public static let dir: String = {
        if let d = ProcessInfo.processInfo.environment["QUOTAD_BIN_DIR"] { return d }
        var url = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        while url.path != "/" {
            url.deleteLastPathComponent()
            if FileManager.default.fileExists(atPath: url.appendingPathComponent("quotad").path) { return url.path }
        }
        return FileManager.default.currentDirectoryPath + "/.build/debug"
    }()
    public static func path(_ name: String) -> String { "\(dir)/\(name)" }
}

public enum TestError: Error, CustomStringConvertible {
    case timeout(String)
    case failed(String)
    public var description: String {
        switch self {
        case .timeout(let s): return "timed out: \(s)"
        case .failed(let s): return s
        }
    }
}

/// A private directory under /tmp, removed at the end (short paths: Unix socket paths are limited to 107 bytes).
public final class TempDir: @unchecked Sendable {
    public let path: String
    public init() {
        var template = Array("/tmp/qd-XXXXXX".utf8CString)
        path = template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)) }
    }
    /// `QUOTAD_KEEP_TMP=1` keeps the directories (logs, journals) for a look after a failure.
    deinit {
        if ProcessInfo.processInfo.environment["QUOTAD_KEEP_TMP"] == nil { try? FileManager.default.removeItem(atPath: path) }
    }
    public func file(_ name: String) -> String { "\(path)/\(name)" }
}

/// Run blocking work (a Kafka drain or flush, seconds long) on a thread of its own, not on Swift concurrency's
/// pool: the pool has one thread per core (two here), and tests blocking both of them stalled every other test
/// in the process (CI: a sidecar's replies "not answered" for 30 s and a 600-round-trip test past 3 minutes,
/// while nothing was wrong with the sidecars).
public func offThePool<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { (c: CheckedContinuation<T, any Error>) in
        let t = Thread { c.resume(with: Result { try body() }) }
        t.stackSize = 1 << 20
        t.start()
    }
}

/// Poll `check` every `every` until it is true or `timeout` passes.
public func eventually(_ what: String, timeout: Duration = .seconds(10), every: Duration = .milliseconds(50),
                       _ check: () async throws -> Bool) async throws {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
        if (try? await check()) == true { return }
        try await Task.sleep(for: every)
    }
    throw TestError.timeout(what)
}

/// A child process with its output in a log file.
public final class ChildProcess: @unchecked Sendable {
    public let process = Process()
    public let log: String

    public init(_ exe: String, _ args: [String], log: String, environment: [String: String] = [:]) throws {
        self.log = log
        let fh: FileHandle
        if log == "/dev/null" {
            fh = FileHandle.nullDevice
        } else {
            _ = FileManager.default.createFile(atPath: log, contents: nil)
            fh = FileHandle(forWritingAtPath: log)!
        }
        process.executableURL = URL(fileURLWithPath: exe)
        process.arguments = args
        if !environment.isEmpty {
            process.environment = ProcessInfo.processInfo.environment.merging(environment) { _, new in new }
        }
        process.standardOutput = fh
        process.standardError = fh
        process.standardInput = FileHandle.nullDevice
        try process.run()
    }

    public var pid: Int32 { process.processIdentifier }
    public var isRunning: Bool { process.isRunning }
    public func signal(_ s: Int32) { kill(pid, s) }

    /// Wait for exit; returns the exit status (or 128+signal).
    public func wait(timeout: Duration = .seconds(20)) async throws -> Int32 {
        let what = ([process.executableURL!.lastPathComponent] + (process.arguments ?? []).prefix(4)).joined(separator: " ")
        try await eventually("process \(what) exits", timeout: timeout) {
            !process.isRunning
        }
        return process.terminationReason == .uncaughtSignal ? 128 + process.terminationStatus : process.terminationStatus
    }

    public var output: String { (try? String(contentsOfFile: log, encoding: .utf8)) ?? "" }

    deinit {
        if process.isRunning {
            kill(pid, SIGKILL)
            // Bounded: Foundation's waitUntilExit can spin for ever on a child it did not reap.
            for _ in 0..<200 where process.isRunning { usleep(10_000) }
        }
    }
}

/// A real redis-server on a private Unix socket. `durable` (the default, what quotad requires) keeps
/// data across kill -9 and restart (AOF, fsync always); without it Redis forgets everything on a restart.
public final class RedisServer: @unchecked Sendable {
    public let dir: TempDir
    public let socket: String
    public let durable: Bool
    public private(set) var child: ChildProcess?
    public let store: QuotaStore

    public init(durable: Bool = true) async throws {
        dir = TempDir()
        socket = dir.file("redis.sock")
        self.durable = durable
        var logger = Logger(label: "test.redis")
        logger.logLevel = .critical
        store = QuotaStore(connection: HiredisConnection(endpoint: .unix(path: socket), timeout: .seconds(2), logger: logger))
        try await start()
    }

    public var url: String { "unix://\(socket)" }

    public func start() async throws {
        var args = ["--port", "0", "--unixsocket", socket, "--dir", dir.path, "--save", "", "--enable-debug-command", "yes"]
        args += durable ? ["--appendonly", "yes", "--appendfsync", "always"] : ["--appendonly", "no"]
        child = try ChildProcess("/usr/bin/redis-server", args, log: dir.file("redis.log"))
        // Up to a minute: at the start of a test run every suite starts its servers at once on 2 cores (a CI run
        // at 08cb6c8 took over 10 s here once).
        try await eventually("redis-server answers PING", timeout: .seconds(60)) {
            (try? await store.connection.send(["PING"])) == .status("PONG")
        }
    }

    public func kill9() async throws {
        child?.signal(SIGKILL)
        _ = try await child?.wait()
        child = nil
    }

    public func command(_ args: String...) async throws -> RedisValue {
        try await store.connection.send(args)
    }

    /// Make Redis stall for `seconds` (`DEBUG SLEEP`), from its own connection; returns at once.
    public func stall(_ seconds: Double) {
        let c = HiredisConnection(endpoint: .unix(path: socket), timeout: .seconds(Int64(seconds) + 10), logger: Logger(label: "stall"))
        Task {
            _ = try? await c.send(["DEBUG", "SLEEP", String(seconds)])
            c.close()
        }
    }

    /// Kill -9, throw its data away, start again: a Redis that forgot everything.
    public func restartEmpty() async throws {
        try await kill9()
        for f in (try? FileManager.default.contentsOfDirectory(atPath: dir.path)) ?? [] where f.hasPrefix("appendonly") || f.hasSuffix(".rdb") {
            try? FileManager.default.removeItem(atPath: dir.file(f))
        }
        try await start()
    }

    /// Pool, tokens outstanding in open leases, open leases, leased, returned and restocked totals.
    public func account(_ voucher: String) async throws
        -> (pool: Int, outstanding: Int, leases: Int, leased: Int, returned: Int, restocked: Int)
    {
        guard let rec = try await store.voucher(voucher) else { throw TestError.failed("no voucher '\(voucher)' in Redis") }
        let open = try await store.leases(voucher: voucher).filter { $0.state == .open }
        return (rec.pool, open.reduce(0) { $0 + $1.outstanding }, open.count, rec.leased, rec.returned, rec.restocked)
    }

    /// The voucher's books as Redis holds them, for ``VoucherAudit`` checks.
    public func books(_ voucher: String) async throws -> VoucherAudit { try await store.books(voucher) }

    /// Every accounting problem of `voucher`: Redis's own books (R1–R3), each stopped host's journal
    /// (J1–J3), and, given `netClaimed`, the claims against the books (C1). Empty when it all balances.
    public func audit(_ voucher: String, journals: [(host: String, dir: String)] = [], netClaimed: Int? = nil) async throws
        -> [String]
    {
        try await store.auditProblems(voucher, journals: journals, netClaimed: netClaimed)
    }

    deinit {
        store.connection.close()
    }
}

/// A real quotad process.
public final class Quotad: @unchecked Sendable {
    public private(set) var child: ChildProcess
    public let socket: String
    public let config: String

    public let logPath: String
    public let host: String
    private let environment: [String: String]
    public private(set) var restarts = 0

    /// `durable`: journal under `dir` and Kafka at `kafka` (topic `topic`), in `durability` mode.
    public init(redis: RedisServer, dir: TempDir, host: String, extraYAML: String = "", args: [String] = [],
         kafka: KafkaBroker? = nil, topic: String = "quota.claims", durability: String? = nil,
         journalMaxBytes: Int? = nil) async throws {
        self.host = host
        socket = dir.file("\(host).sock")
        config = dir.file("\(host).yaml")
        logPath = dir.file("\(host).log")
        var yaml = """
            host_id: \(host)
            region: sg
            regions:
              sg: { redis: "\(redis.url)" }
            socket: { path: \(socket) }

            """
        if let kafka {
            yaml += "durability: \(durability ?? "journal")\n"
            yaml += "journal: { dir: \(dir.file("journal-\(host)")), segment_bytes: 65536"
            yaml += journalMaxBytes.map { ", max_bytes: \($0) }\n" } ?? " }\n"
            yaml += "kafka: { brokers: \"\(kafka.brokers)\", topic: \(topic) }\n"
        } else {
            yaml += "durability: \(durability ?? "none")\n"
            if durability == "journal" { yaml += "journal: { dir: \(dir.file("journal-\(host)")), segment_bytes: 65536 }\n" }
        }
        yaml += extraYAML
        try yaml.write(toFile: config, atomically: true, encoding: .utf8)
        environment = [:]
        child = try ChildProcess(Bin.path("quotad"), ["--config", config] + args, log: logPath)
        try await waitReady()
    }

    /// A sidecar on a config file written by the caller (`socket` and `host` must match it).
    public init(config: String, socket: String, host: String, log: String, environment: [String: String] = [:]) async throws {
        self.config = config
        self.socket = socket
        self.host = host
        self.logPath = log
        self.environment = environment
        child = try ChildProcess(Bin.path("quotad"), ["--config", config], log: log, environment: environment)
        try await waitReady()
    }

    /// The journal directory of this sidecar (when it has one).
    public var journalDir: String { (config as NSString).deletingLastPathComponent + "/journal-" + host }

    /// All runs' logs.
    public var allLogs: String { (0...restarts).map { (try? String(contentsOfFile: $0 == 0 ? logPath : "\(logPath).\($0)", encoding: .utf8)) ?? "" }.joined() }

    /// Start again with the same config (after kill -9): a new log file per run.
    public func restart() async throws {
        // A second quotad on the same config is refused (its socket's lock is held) while the first one goes
        // on answering PING: a test that forgot to stop the first would go on testing the first.
        guard !child.isRunning else {
            throw TestError.failed("restart while the previous quotad (pid \(child.pid)) still runs: stop or kill it first")
        }
        restarts += 1
        child = try ChildProcess(Bin.path("quotad"), ["--config", config], log: "\(logPath).\(restarts)",
                                 environment: environment)
        try await waitReady()
    }

    /// Until quotad answers, or its process has exited. A restart restores the journal before the socket
    /// opens (seconds for a large journal in a debug build, and many times that while every suite runs
    /// on the same 2 cores: a 20 s bound failed once so in CI), so the bound is generous; a quotad that
    /// exits is reported at once with its log.
    private func waitReady() async throws {
        let socket = self.socket
        let child = self.child
        let deadline = ContinuousClock.now + .seconds(90)
        while ContinuousClock.now < deadline {
            if let c = try? await RESPClient.connect(socket) {
                let r = try? await c.send("PING")
                c.close()
                if r == .simpleString("PONG") || r?.errorCode == "NOAUTH" { return }  // NOAUTH: a socket.password is set
            }
            guard child.isRunning else {
                throw TestError.failed("quotad exited before it answered PING: \(child.output.suffix(2000))")
            }
            try await Task.sleep(for: .milliseconds(50))
        }
        throw TestError.timeout("quotad answers PING within 90 s")
    }

    /// SIGTERM and wait: returns the exit status.
    /// (A stop may take its drain, up to 10 s, and a Kafka flush, up to 10 s, on a loaded machine more.)
    public func stop(timeout: Duration = .seconds(60)) async throws -> Int32 {
        child.signal(SIGTERM)
        return try await child.wait(timeout: timeout)
    }

    /// SIGTERM and wait up to `timeout`; nil (and kill -9) when it did not exit by then.
    public func stopOrKill(timeout: Duration) async -> Int32? {
        child.signal(SIGTERM)
        if let st = try? await child.wait(timeout: timeout) { return st }
        child.signal(SIGKILL)
        _ = try? await child.wait()
        return nil
    }

    public func info() async throws -> [String: String] {
        let c = try await RESPClient.connect(socket)
        defer { c.close() }
        guard let text = try await c.send("INFO", "all").string else { throw TestError.failed("INFO did not answer a string") }
        var out: [String: String] = [:]
        for line in text.split(whereSeparator: \.isNewline) {
            if let i = line.firstIndex(of: ":"), !line.hasPrefix("#") {
                out[String(line[..<i])] = String(line[line.index(after: i)...])
            }
        }
        return out
    }

    public func stat(_ key: String) async throws -> Int { Int(try await info()[key] ?? "") ?? -1 }

    /// kill -9 and wait.
    public func kill9() async throws {
        child.signal(SIGKILL)
        _ = try await child.wait()
    }

    /// Run quotad on `config` expecting it to refuse to start: its exit status and output.
    public static func refusedStart(config: String, log: String) async throws -> (Int32, String) {
        let p = try ChildProcess(Bin.path("quotad"), ["--config", config], log: log)
        let st = try await p.wait(timeout: .seconds(20))
        return (st, p.output)
    }
}

/// Run quotactl; returns (exit status, stdout + stderr).
public func quotactl(_ args: [String]) async throws -> (Int32, String) {
    let dir = TempDir()
    let p = try ChildProcess(Bin.path("quotactl"), args, log: dir.file("out"))
    // (Generous: a debug build starting beside the whole suite on 2 cores once took more than 20 s.)
    let status = try await p.wait(timeout: .seconds(60))
    return (status, p.output)
}


/// A real Kafka-compatible broker: Tansu (memory storage) on a free loopback port.
public final class KafkaBroker: @unchecked Sendable {
    public let port: Int
    public private(set) var child: ChildProcess
    public let dir = TempDir()
    public var brokers: String { "127.0.0.1:\(port)" }

    public init() async throws {
        port = try freePort()
        child = try Self.launch(port)
        let port = self.port
        let child = self.child
        try await eventually("tansu listens on \(port)") { canConnect(port) }
        // The listener must be this broker (not one that took the port first and left ours unable to bind).
        try await Task.sleep(for: .milliseconds(100))
        guard child.isRunning else { throw TestError.failed("tansu on \(port) exited at start: \(child.output.suffix(300))") }
    }

    private static func launch(_ port: Int) throws -> ChildProcess {
        guard let bin = ProcessInfo.processInfo.environment["TANSU_BIN"] else {
            throw TestError.failed("TANSU_BIN is not set: run the tests with `make test` (scripts/test.sh sources scripts/kafka-env.sh)")
        }
        let url = "tcp://127.0.0.1:\(port)"
        // Tansu logs a lot at info level: keep only warnings.
        setenv("RUST_LOG", "warn", 1)
        return try ChildProcess(bin, ["broker", "--listener-url", url, "--advertised-listener-url", url], log: "/dev/null")
    }

    /// kill -9 the broker and start a new one on the same port: memory storage, so it has lost every
    /// topic, message and producer id (a broker restarted without its state).
    public func restartEmpty() async throws {
        child.signal(SIGKILL)
        _ = try await child.wait()
        child = try Self.launch(port)
        let port = self.port
        try await eventually("tansu listens on \(port) again") { canConnect(port) }
    }

    /// Every message of `topic`, read by a fresh consumer group until `idle` passes with none. (Seconds of
    /// blocking reads: on a thread of its own, see ``offThePool(_:)``.)
    public func consume(_ topic: String, idle: Duration = .seconds(4)) async throws -> [KafkaMessage] {
        let brokers = self.brokers
        return try await offThePool {
            let c = try KafkaConsumer(brokers: brokers, topic: topic, group: "test-\(UUID().uuidString)")
            defer { c.close() }
            return c.drain(idle: idle, limit: .seconds(120))
        }
    }
}

/// Ports ``freePort()`` handed out in this process: never handed out twice. The kernel may give a port that
/// was bound and closed a moment ago to the next `bind(0)`, so two tests starting servers at once could get
/// the same one; the second server then fails to bind while the first answers on it (a test then stops or
/// kills a broker that is not the one its sidecars talk to).
private let handedOut = NIOLockedValueBox(Set<Int>())

public func freePort() throws -> Int {
    for _ in 0..<100 {
        let p = try anyFreePort()
        if handedOut.withLockedValue({ $0.insert(p).inserted }) { return p }
    }
    throw TestError.failed("no free port not handed out before")
}

private func anyFreePort() throws -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    addr.sin_port = 0
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    let ok = withUnsafeMutablePointer(to: &addr) { p in
        p.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) == 0 && getsockname(fd, $0, &len) == 0 }
    }
    guard ok else { throw TestError.failed("no free port") }
    return Int(UInt16(bigEndian: addr.sin_port))
}

public func canConnect(_ port: Int) -> Bool {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    return connectLoopback(fd, port: port)
}

/// Connect `fd` to 127.0.0.1:`port`.
func connectLoopback(_ fd: Int32, port: Int) -> Bool {
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    addr.sin_port = UInt16(port).bigEndian
    return withUnsafeMutablePointer(to: &addr) { p in
        p.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 }
    }
}

/// A claim event read back from Kafka.
public struct StreamedClaim: Equatable {
    public var type: String
    public var claimID: String
    public var voucher: String
    public var qty: Int
    public var raw: [UInt8]

    public init?(_ m: KafkaMessage) {
        guard let o = try? JSONSerialization.jsonObject(with: Data(m.value)) as? [String: Any],
            let t = o["type"] as? String, let id = o["claim_id"] as? String, let v = o["voucher"] as? String,
            let q = o["qty"] as? Int
        else { return nil }
        type = t
        claimID = id
        voucher = v
        qty = q
        raw = m.value
    }
}

/// `GET path` from `127.0.0.1:port` over plain HTTP/1.0: (status code, body).
public func httpGet(port: Int, path: String) throws -> (Int, String) {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    guard connectLoopback(fd, port: port) else { throw TestError.failed("cannot connect to 127.0.0.1:\(port)") }
    let req = Array("GET \(path) HTTP/1.0\r\nHost: localhost\r\n\r\n".utf8)
    _ = req.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
    var data: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n <= 0 { break }
        data += buf[0..<n]
    }
    let text = String(decoding: data, as: UTF8.self)
    let status = Int(text.split(separator: " ").dropFirst().first ?? "") ?? 0
    let body = text.range(of: "\r\n\r\n").map { String(text[$0.upperBound...]) } ?? ""
    return (status, body)
}

extension QuotaStore {
    /// A voucher's books as Redis holds them (standalone or cluster).
    func books(_ voucher: String) async throws -> VoucherAudit {
        guard let rec = try await self.voucher(voucher) else { throw TestError.failed("no voucher '\(voucher)' in Redis") }
        return VoucherAudit(record: rec, leases: try await leases(voucher: voucher))
    }

    /// Every accounting problem of `voucher`: Redis's own books (R1–R3), each stopped host's journal
    /// (J1–J3), and, given `netClaimed`, the claims against the books (C1). Empty when it all balances.
    func auditProblems(_ voucher: String, journals: [(host: String, dir: String)], netClaimed: Int?) async throws -> [String] {
        let b = try await books(voucher)
        var out = b.redisProblems()
        for j in journals {
            out += b.journalProblems(host: j.host, ledger: JournalRecovery.read(dir: j.dir).ledger, hostStopped: true)
        }
        if let netClaimed { out += b.claimProblems(netClaimed: netClaimed) }
        return out
    }
}
