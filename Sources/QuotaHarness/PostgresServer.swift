import Foundation
import Glibc

/// A private PostgreSQL server: a fresh cluster in a temp dir, listening only on a Unix socket
/// there. PostgreSQL refuses to run as root: then it runs as the `postgres` user (via `setpriv`).
public final class PostgresServer: @unchecked Sendable {
    public let dir = TempDir()
    public let socketDir: String
    public private(set) var child: ChildProcess?

    public var conninfo: String { "host=\(socketDir) dbname=postgres user=postgres" }
    /// The same as a libpq URI (`ledger.db`).
    public var url: String { "postgresql://postgres@/postgres?host=\(socketDir)" }

    public init() async throws {
        socketDir = dir.path
        let bin = try Self.binDir()
        let data = dir.file("data")
        let asRoot = getuid() == 0
        if asRoot {
            // The postgres user must be able to reach and own its directories.
            chmod(dir.path, 0o755)
            try FileManager.default.createDirectory(atPath: data, withIntermediateDirectories: true)
            guard let pw = getpwnam("postgres") else { throw TestError.failed("no 'postgres' user (apt-get install postgresql)") }
            chown(data, pw.pointee.pw_uid, pw.pointee.pw_gid)
            chown(dir.path, pw.pointee.pw_uid, pw.pointee.pw_gid)
        }
        func command(_ exe: String, _ args: [String]) -> (String, [String]) {
            asRoot ? ("/usr/bin/setpriv", ["--reuid=postgres", "--regid=postgres", "--init-groups", "--", exe] + args)
                : (exe, args)
        }
        let (ie, ia) = command("\(bin)/initdb", ["-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
        let initdb = try ChildProcess(ie, ia, log: dir.file("initdb.log"))
        guard try await initdb.wait(timeout: .seconds(60)) == 0 else {
            throw TestError.failed("initdb failed: \(initdb.output)")
        }
        let (pe, pa) = command("\(bin)/postgres", [
            "-D", data, "-k", socketDir, "-c", "listen_addresses=", "-c", "max_connections=200",
            "-c", "shared_buffers=128MB",
        ])
        child = try ChildProcess(pe, pa, log: dir.file("postgres.log"))
        let sock = "\(socketDir)/.s.PGSQL.5432"
        try await eventually("postgres listens", timeout: .seconds(30)) { FileManager.default.fileExists(atPath: sock) }
        // Listening is not accepting: until recovery at start ends, connections get "the database system is
        // starting up" (a loaded fresh-clone run met it after the 300 ms this used to wait).
        try await eventually("postgres accepts connections", timeout: .seconds(30)) {
            let ready = try ChildProcess("\(bin)/pg_isready", ["-h", self.socketDir, "-U", "postgres", "-d", "postgres"],
                                         log: self.dir.file("pg_isready.log"))
            return try await ready.wait(timeout: .seconds(10)) == 0
        }
    }

    static func binDir() throws -> String {
        let root = "/usr/lib/postgresql"
        let versions = ((try? FileManager.default.contentsOfDirectory(atPath: root)) ?? []).compactMap(Int.init).sorted()
        guard let v = versions.last else { throw TestError.failed("PostgreSQL server not installed (apt-get install postgresql)") }
        return "\(root)/\(v)/bin"
    }

    /// Fast shutdown.
    public func stop() async throws {
        child?.signal(SIGINT)
        _ = try await child?.wait(timeout: .seconds(30))
        child = nil
    }
}
