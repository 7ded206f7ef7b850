import CLibPQ
import Glibc
import Foundation

/// A PostgreSQL error, with the server's message.
public struct PGError: Error, Sendable, CustomStringConvertible {
    public var message: String
    public var description: String { "PostgreSQL: \(message)" }
}

/// One libpq connection. Blocking and not thread-safe: one owner thread (a benchmark worker).
public final class PGConnection: @unchecked Sendable {
    private let conn: OpaquePointer

    /// - Parameter conninfo: e.g. `host=/tmp/pg dbname=postgres user=postgres`.
    public init(_ conninfo: String) throws(PGError) {
        guard let c = PQconnectdb(conninfo) else { throw PGError(message: "out of memory") }
        guard PQstatus(c) == CONNECTION_OK else {
            let m = String(cString: PQerrorMessage(c))
            PQfinish(c)
            throw PGError(message: m.trimmingCharacters(in: .newlines))
        }
        conn = c
    }

    deinit { PQfinish(conn) }

    /// Run `sql` with text parameters `$1…` (nil: NULL); returns the rows as text (nil for NULL).
    @discardableResult
    public func query(_ sql: String, _ params: [String?] = []) throws(PGError) -> [[String?]] {
        let res: OpaquePointer?
        if params.isEmpty {
            res = PQexec(conn, sql)
        } else {
            let cs = params.map { $0.map { strdup($0) } ?? nil }
            defer { cs.forEach { free($0) } }
            var ptrs = cs.map { $0.map { UnsafePointer<CChar>($0) } }
            res = ptrs.withUnsafeMutableBufferPointer { p in
                PQexecParams(conn, sql, Int32(params.count), nil, p.baseAddress, nil, nil, 0)
            }
        }
        guard let res else { throw PGError(message: String(cString: PQerrorMessage(conn))) }
        defer { PQclear(res) }
        let st = PQresultStatus(res)
        guard st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK else {
            throw PGError(message: String(cString: PQresultErrorMessage(res)).trimmingCharacters(in: .newlines))
        }
        var rows: [[String?]] = []
        for r in 0..<PQntuples(res) {
            var row: [String?] = []
            for f in 0..<PQnfields(res) {
                row.append(PQgetisnull(res, r, f) == 1 ? nil : String(cString: PQgetvalue(res, r, f)))
            }
            rows.append(row)
        }
        return rows
    }

    /// The number of rows the last command touched (`UPDATE … WHERE …`).
    public func execCount(_ sql: String, _ params: [String]) throws(PGError) -> Int {
        let cs = params.map { strdup($0) }
        defer { cs.forEach { free($0) } }
        var ptrs = cs.map { UnsafePointer<CChar>($0) }
        let res = ptrs.withUnsafeMutableBufferPointer { p in
            PQexecParams(conn, sql, Int32(params.count), nil, p.baseAddress, nil, nil, 0)
        }
        guard let res else { throw PGError(message: String(cString: PQerrorMessage(conn))) }
        defer { PQclear(res) }
        guard PQresultStatus(res) == PGRES_COMMAND_OK else {
            throw PGError(message: String(cString: PQresultErrorMessage(res)).trimmingCharacters(in: .newlines))
        }
        return Int(String(cString: PQcmdTuples(res))) ?? 0
    }
}
