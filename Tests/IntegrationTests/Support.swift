import Foundation
import Glibc
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import QuotaClient
import QuotaRESP
import QuotaRedis
import Testing

/// Where the built executables are: `QUOTAD_BIN_DIR`, else next to this test bundle.
enum Bin {
    static let dir: String = {
        if let d = ProcessInfo.processInfo.environment["QUOTAD_BIN_DIR"] { return d }
        var url = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        while url.path != "/" {
            url.deleteLastPathComponent()
            if FileManager.default.fileExists(atPath: url.appendingPathComponent("quotad").path) { return url.path }
        }
        return FileManager.default.currentDirectoryPath + "/.build/debug"
    }()
    static func path(_ name: String) -> String { "\(dir)/\(name)" }
}

enum TestError: Error, CustomStringConvertible {
    case timeout(String)
    case failed(String)
    var description: String {
        switch self {
        case .timeout(let s): return "timed out: \(s)"
        case .failed(let s): return s
        }
    }
}

/// A private directory under /tmp, removed at the end (short paths: Unix socket paths are limited to 107 bytes).
final class TempDir: @unchecked Sendable {
    let path: String
    init() {
        var template = Array("/tmp/qd-XXXXXX".utf8CString)
        path = template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)) }
    }
    deinit { try? FileManager.default.removeItem(atPath: path) }
    func file(_ name: String) -> String { "\(path)/\(name)" }
}

/// Poll `check` until it is true or `timeout` passes.
func eventually(_ what: String, timeout: Duration = .seconds(10), _ check: () async throws -> Bool) async throws {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
        if (try? await check()) == true { return }
        try await Task.sleep(for: .milliseconds(50))
    }
    throw TestError.timeout(what)
}

/// A child process with its output in a log file.
final class ChildProcess: @unchecked Sendable {
    let process = Process()
    let log: String

    init(_ exe: String, _ args: [String], log: String) throws {
        self.log = log
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        let fh = FileHandle(forWritingAtPath: log)!
        process.executableURL = URL(fileURLWithPath: exe)
        process.arguments = args
        process.standardOutput = fh
        process.standardError = fh
        process.standardInput = FileHandle.nullDevice
        try process.run()
    }

    var pid: Int32 { process.processIdentifier }
    var isRunning: Bool { process.isRunning }
    func signal(_ s: Int32) { kill(pid, s) }

    /// Wait for exit; returns the exit status (or 128+signal).
    func wait(timeout: Duration = .seconds(20)) async throws -> Int32 {
        try await eventually("process \(process.executableURL!.lastPathComponent) exits", timeout: timeout) {
            !process.isRunning
        }
        return process.terminationReason == .uncaughtSignal ? 128 + process.terminationStatus : process.terminationStatus
    }

    var output: String { (try? String(contentsOfFile: log, encoding: .utf8)) ?? "" }

    deinit {
        if process.isRunning {
            kill(pid, SIGKILL)
            process.waitUntilExit()
        }
    }
}

/// A real redis-server on a private Unix socket. `persistent` keeps data across kill -9
/// and restart (AOF, fsync always).
final class RedisServer: @unchecked Sendable {
    let dir: TempDir
    let socket: String
    let persistent: Bool
    private(set) var child: ChildProcess?
    let store: QuotaStore

    init(persistent: Bool = false) async throws {
        dir = TempDir()
        socket = dir.file("redis.sock")
        self.persistent = persistent
        var logger = Logger(label: "test.redis")
        logger.logLevel = .critical
        store = QuotaStore(connection: HiredisConnection(endpoint: .unix(path: socket), timeout: .seconds(2), logger: logger))
        try await start()
    }

    var url: String { "unix://\(socket)" }

    func start() async throws {
        var args = ["--port", "0", "--unixsocket", socket, "--dir", dir.path, "--save", ""]
        args += persistent ? ["--appendonly", "yes", "--appendfsync", "always"] : ["--appendonly", "no"]
        child = try ChildProcess("/usr/bin/redis-server", args, log: dir.file("redis.log"))
        try await eventually("redis-server answers PING") {
            (try? await store.connection.send(["PING"])) == .status("PONG")
        }
    }

    func kill9() async throws {
        child?.signal(SIGKILL)
        _ = try await child?.wait()
        child = nil
    }

    func command(_ args: String...) async throws -> RedisValue {
        try await store.connection.send(args)
    }

    /// Pool, tokens outstanding in leases, leases outstanding, leased and returned totals.
    func account(_ voucher: String) async throws -> (pool: Int, outstanding: Int, leases: Int, leased: Int, returned: Int) {
        let rec = try #require(try await store.voucher(voucher))
        let leases = try await store.leases(voucher: voucher)
        return (rec.pool, leases.reduce(0) { $0 + $1.granted - $1.returned }, leases.count, rec.leased, rec.returned)
    }

    deinit {
        store.connection.close()
    }
}

/// A real quotad process.
final class Quotad: @unchecked Sendable {
    let child: ChildProcess
    let socket: String
    let config: String

    init(redis: RedisServer, dir: TempDir, host: String, extraYAML: String = "", args: [String] = []) async throws {
        socket = dir.file("\(host).sock")
        config = dir.file("\(host).yaml")
        let yaml = """
            host_id: \(host)
            region: sg
            regions:
              sg: { redis: "\(redis.url)" }
            socket: { path: \(socket) }
            durability: none
            \(extraYAML)
            """
        try yaml.write(toFile: config, atomically: true, encoding: .utf8)
        child = try ChildProcess(Bin.path("quotad"), ["--config", config] + args, log: dir.file("\(host).log"))
        let socket = self.socket
        try await eventually("quotad \(host) answers PING") {
            guard let c = try? await RESPClient.connect(socket) else { return false }
            defer { c.close() }
            return try await c.send("PING") == .simpleString("PONG")
        }
    }

    /// SIGTERM and wait: returns the exit status.
    func stop() async throws -> Int32 {
        child.signal(SIGTERM)
        return try await child.wait()
    }

    func info() async throws -> [String: String] {
        let c = try await RESPClient.connect(socket)
        defer { c.close() }
        let text = try #require(try await c.send("INFO", "all").string)
        var out: [String: String] = [:]
        for line in text.split(whereSeparator: \.isNewline) {
            if let i = line.firstIndex(of: ":"), !line.hasPrefix("#") {
                out[String(line[..<i])] = String(line[line.index(after: i)...])
            }
        }
        return out
    }

    func stat(_ key: String) async throws -> Int { Int(try await info()[key] ?? "") ?? -1 }
}

/// Run quotactl; returns (exit status, stdout + stderr).
func quotactl(_ args: [String]) async throws -> (Int32, String) {
    let dir = TempDir()
    let p = try ChildProcess(Bin.path("quotactl"), args, log: dir.file("out"))
    let status = try await p.wait()
    return (status, p.output)
}

