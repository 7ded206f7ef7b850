import Foundation
import Logging
import NIOCore
import NIOPosix
import QuotaPostgres
import SQLiteNIO

/// A value bound into, or read from, a ledger statement.
public enum LedgerValue: Sendable, Equatable {
    case int(Int64)
    case text(String)
    case null

    public var int: Int? {
        switch self {
        case .int(let v): return Int(v)
        case .text(let s): return Int(s)
        case .null: return nil
        }
    }

    public var string: String? {
        switch self {
        case .int(let v): return String(v)
        case .text(let s): return s
        case .null: return nil
        }
    }
}

public struct LedgerError: Error, Sendable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// The SQL the two backends differ in.
public enum SQLDialect: Sendable {
    case sqlite, postgres

    /// The `n`th bind parameter (1-based).
    func param(_ n: Int) -> String { self == .sqlite ? "?\(n)" : "$\(n)" }
    /// Bind parameters one statement may carry.
    var maxParams: Int { self == .sqlite ? 30_000 : 60_000 }
}

/// One connection to the ledger database. Statements run in order; `transaction` runs its body between
/// `BEGIN` and `COMMIT` (rolled back on error) on this connection.
public protocol LedgerDatabase: Sendable {
    var dialect: SQLDialect { get }
    /// What the URL names, without a password (for logs).
    var description: String { get }
    func execute(_ sql: String, _ params: [LedgerValue]) async throws -> [[LedgerValue]]
    func close() async
}

extension LedgerDatabase {
    public func transaction(_ body: () async throws -> Void) async throws {
        _ = try await execute(dialect == .sqlite ? "BEGIN IMMEDIATE" : "BEGIN", [])
        do {
            try await body()
            _ = try await execute("COMMIT", [])
        } catch {
            _ = try? await execute("ROLLBACK", [])
            throw error
        }
    }
}

/// Open the database named by `ledger.db`: `sqlite:///path/to/ledger.db` or `postgres://user@host:port/db`
/// (any libpq connection URI; `?host=/socket/dir` for a Unix socket).
public func openLedgerDatabase(url: String, logger: Logger) async throws -> any LedgerDatabase {
    if url.hasPrefix("sqlite://") {
        let path = String(url.dropFirst("sqlite://".count))
        guard path.hasPrefix("/") else { throw LedgerError("ledger.db: sqlite URLs are sqlite:///absolute/path, got '\(url)'") }
        return try await SQLiteLedgerDatabase(path: path, logger: logger)
    }
    if url.hasPrefix("postgres://") || url.hasPrefix("postgresql://") {
        return try PostgresLedgerDatabase(url: url)
    }
    throw LedgerError("ledger.db: must be sqlite:///PATH or postgres://…, got '\(url)'")
}

/// SQLite through sqlite-nio (the SQLite library is compiled in: nothing to install). WAL, and
/// `synchronous=FULL`: a committed batch survives a power loss.
final class SQLiteLedgerDatabase: LedgerDatabase {
    let dialect = SQLDialect.sqlite
    let description: String
    private let conn: SQLiteConnection

    init(path: String, logger: Logger) async throws {
        let dir = (path as NSString).deletingLastPathComponent
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        conn = try await SQLiteConnection.open(storage: .file(path: path), logger: logger)
        description = "sqlite://\(path)"
        _ = try await execute("PRAGMA journal_mode=WAL", [])
        _ = try await execute("PRAGMA synchronous=FULL", [])
        _ = try await execute("PRAGMA busy_timeout=5000", [])
    }

    func execute(_ sql: String, _ params: [LedgerValue]) async throws -> [[LedgerValue]] {
        let binds: [SQLiteData] = params.map {
            switch $0 {
            case .int(let v): return .integer(Int(v))
            case .text(let s): return .text(s)
            case .null: return .null
            }
        }
        let rows = try await conn.query(sql, binds)
        return rows.map { row in
            row.columns.map { c in
                switch c.data {
                case .integer(let v): return .int(Int64(v))
                case .text(let s): return .text(s)
                case .float(let d): return .int(Int64(d))
                case .null, .blob: return .null
                }
            }
        }
    }

    func close() async { try? await conn.close() }
}

/// PostgreSQL through libpq (owned by `QuotaPostgres`), on its own thread: libpq blocks.
final class PostgresLedgerDatabase: LedgerDatabase, @unchecked Sendable {
    let dialect = SQLDialect.postgres
    let description: String
    private let conn: PGConnection
    private let queue = DispatchQueue(label: "quota-ledger.postgres")

    init(url: String) throws {
        do {
            conn = try PGConnection(url)
        } catch {
            throw LedgerError("ledger.db: cannot connect to PostgreSQL: \(error)")
        }
        description = url.replacingOccurrences(of: #":[^:@/]*@"#, with: ":***@", options: .regularExpression)
        _ = try conn.query("SET client_min_messages = warning")
    }

    func execute(_ sql: String, _ params: [LedgerValue]) async throws -> [[LedgerValue]] {
        let conn = self.conn
        let texts = params.map(\.string)
        return try await withCheckedThrowingContinuation { c in
            queue.async {
                do {
                    let rows = try conn.query(sql, texts)
                    c.resume(returning: rows.map { $0.map { $0.map(LedgerValue.text) ?? .null } })
                } catch {
                    c.resume(throwing: LedgerError("\(error)"))
                }
            }
        }
    }

    func close() async {}
}
