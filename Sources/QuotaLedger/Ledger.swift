import Foundation

/// The ledger's tables and queries, over either backend.
///
/// Tables (every row written once: inserts are idempotent by their natural key, so a re-delivered or
/// re-sent event changes nothing; totals are derived by the queries, never stored twice):
/// `claims`, `claim_shares` (which lease served how many), `cancellations`, `cancel_shares` (and
/// whether each went back to its lease or to the pool), `leases` (grants, with the durability mode),
/// `lease_closes`, `vouchers` (definitions), `journal_ships` (what a shipped journal proves per lease),
/// and `ledger_offsets` (the next offset per partition, written in the same transaction as the rows:
/// a batch is in the database with its offsets, or not at all).
public struct Ledger: Sendable {
    public let db: any LedgerDatabase

    public init(db: any LedgerDatabase) { self.db = db }

    static let schema = [
        """
        CREATE TABLE IF NOT EXISTS ledger_offsets (topic TEXT NOT NULL, part INTEGER NOT NULL,
          next_offset BIGINT NOT NULL, PRIMARY KEY (topic, part))
        """,
        """
        CREATE TABLE IF NOT EXISTS claims (claim_id TEXT PRIMARY KEY, voucher TEXT NOT NULL, user_id TEXT NOT NULL,
          qty BIGINT NOT NULL, region TEXT NOT NULL, host TEXT NOT NULL, ts_ms BIGINT NOT NULL)
        """,
        "CREATE INDEX IF NOT EXISTS claims_voucher ON claims (voucher, region, user_id)",
        """
        CREATE TABLE IF NOT EXISTS claim_shares (claim_id TEXT NOT NULL, voucher TEXT NOT NULL, region TEXT NOT NULL,
          lease TEXT NOT NULL, qty BIGINT NOT NULL, PRIMARY KEY (claim_id, lease))
        """,
        "CREATE INDEX IF NOT EXISTS claim_shares_lease ON claim_shares (voucher, region, lease)",
        """
        CREATE TABLE IF NOT EXISTS cancellations (claim_id TEXT PRIMARY KEY, voucher TEXT NOT NULL, region TEXT NOT NULL,
          ts_ms BIGINT NOT NULL)
        """,
        """
        CREATE TABLE IF NOT EXISTS cancel_shares (claim_id TEXT NOT NULL, voucher TEXT NOT NULL, region TEXT NOT NULL,
          lease TEXT NOT NULL, qty BIGINT NOT NULL, to_pool INTEGER NOT NULL, PRIMARY KEY (claim_id, lease))
        """,
        "CREATE INDEX IF NOT EXISTS cancel_shares_lease ON cancel_shares (voucher, region, lease)",
        """
        CREATE TABLE IF NOT EXISTS leases (voucher TEXT NOT NULL, region TEXT NOT NULL, lease TEXT NOT NULL,
          host TEXT NOT NULL, granted BIGINT NOT NULL, durability TEXT NOT NULL, ts_ms BIGINT NOT NULL,
          PRIMARY KEY (voucher, region, lease))
        """,
        """
        CREATE TABLE IF NOT EXISTS lease_closes (voucher TEXT NOT NULL, region TEXT NOT NULL, lease TEXT NOT NULL,
          host TEXT NOT NULL, granted BIGINT NOT NULL, served BIGINT NOT NULL, returned BIGINT NOT NULL,
          gone INTEGER NOT NULL, ts_ms BIGINT NOT NULL, PRIMARY KEY (voucher, region, lease))
        """,
        """
        CREATE TABLE IF NOT EXISTS vouchers (voucher TEXT NOT NULL, region TEXT NOT NULL, limit_tokens BIGINT NOT NULL,
          total_limit BIGINT NOT NULL, per_user BIGINT NOT NULL, state TEXT NOT NULL, gen TEXT NOT NULL, ts_ms BIGINT NOT NULL,
          PRIMARY KEY (voucher, region))
        """,
        """
        CREATE TABLE IF NOT EXISTS journal_ships (host TEXT NOT NULL, region TEXT NOT NULL, voucher TEXT NOT NULL,
          lease TEXT NOT NULL, granted BIGINT NOT NULL, served BIGINT NOT NULL, ts_ms BIGINT NOT NULL,
          PRIMARY KEY (host, region, voucher, lease))
        """,
        """
        CREATE TABLE IF NOT EXISTS journal_ship_requests (host TEXT NOT NULL, region TEXT NOT NULL, voucher TEXT NOT NULL,
          req TEXT NOT NULL, PRIMARY KEY (region, voucher, req))
        """,
    ]

    /// Create the tables if they are not there.
    public func migrate() async throws {
        for s in Self.schema { _ = try await db.execute(s, []) }
    }

    /// The next offset to read per partition of `topic` (absent: from the beginning).
    public func offsets(topic: String) async throws -> [Int32: Int64] {
        let rows = try await db.execute("SELECT part, next_offset FROM ledger_offsets WHERE topic = \(db.dialect.param(1))",
                                        [.text(topic)])
        var out: [Int32: Int64] = [:]
        for r in rows { if let p = r[0].int, let o = r[1].int { out[Int32(p)] = Int64(o) } }
        return out
    }

    /// One consumed message.
    public struct Message: Sendable {
        public var partition: Int32
        public var offset: Int64
        /// nil: not an event the ledger keeps (its offset still moves on).
        public var event: LedgerEvent?
        public init(partition: Int32, offset: Int64, event: LedgerEvent?) {
            self.partition = partition
            self.offset = offset
            self.event = event
        }
    }

    /// Rows inserted by one batch (for throughput figures).
    public struct Written: Sendable {
        public var claims = 0
        public var cancellations = 0
        public var other = 0
        public var rows: Int { claims + cancellations + other }
    }

    /// Write a batch and the offsets after it, in one transaction.
    @discardableResult
    public func write(_ batch: [Message], topic: String) async throws -> Written {
        var claims: [[LedgerValue]] = []
        var claimShares: [[LedgerValue]] = []
        var cancels: [[LedgerValue]] = []
        var cancelShares: [[LedgerValue]] = []
        var leases: [[LedgerValue]] = []
        var closes: [[LedgerValue]] = []
        var vouchers: [String: [LedgerValue]] = [:]
        var ships: [[LedgerValue]] = []
        var shipReqs: [[LedgerValue]] = []
        var next: [Int32: Int64] = [:]
        func i(_ n: Int) -> LedgerValue { .int(Int64(n)) }
        for m in batch {
            next[m.partition] = max(next[m.partition] ?? 0, m.offset + 1)
            guard let e = m.event else { continue }
            switch e {
            case .claimed(let id, let v, let u, let q, let r, let h, let shares, let ts):
                claims.append([.text(id), .text(v), .text(u), i(q), .text(r), .text(h), .int(ts)])
                for s in shares { claimShares.append([.text(id), .text(v), .text(r), .text(s.lease), i(s.qty)]) }
            case .unclaimed(let id, let v, let r, let shares, let ts):
                cancels.append([.text(id), .text(v), .text(r), .int(ts)])
                for s in shares {
                    cancelShares.append([.text(id), .text(v), .text(r), .text(s.lease), i(s.qty), i(s.toPool ? 1 : 0)])
                }
            case .leaseGranted(let v, let r, let h, let l, let g, let d, let ts):
                leases.append([.text(v), .text(r), .text(l), .text(h), i(g), .text(d), .int(ts)])
            case .leaseClosed(let v, let r, let h, let l, let g, let s, let rt, let gone, let ts):
                closes.append([.text(v), .text(r), .text(l), .text(h), i(g), i(s), i(rt), i(gone ? 1 : 0), .int(ts)])
            case .voucherDefined(let d):
                // The newest definition of a voucher in a batch wins (and the upsert keeps the newest across batches).
                let key = "\(d.voucher)|\(d.region)"
                if (vouchers[key]?[7].int ?? Int.min) <= Int(d.tsMs) {
                    vouchers[key] = [.text(d.voucher), .text(d.region), i(d.limit), i(d.totalLimit), i(d.perUser),
                                     .text(d.state), .text(d.generation), .int(d.tsMs)]
                }
            case .journalShipped(let h, let r, let v, let ls, let reqs, let ts):
                for l in ls { ships.append([.text(h), .text(r), .text(v), .text(l.lease), i(l.granted), i(l.served), .int(ts)]) }
                for q in reqs { shipReqs.append([.text(h), .text(r), .text(v), .text(q)]) }
            }
        }
        var written = Written()
        try await db.transaction {
            written.claims = try await insert("claims", ["claim_id", "voucher", "user_id", "qty", "region", "host", "ts_ms"],
                                              claims, conflict: "(claim_id) DO NOTHING")
            _ = try await insert("claim_shares", ["claim_id", "voucher", "region", "lease", "qty"], claimShares,
                                 conflict: "(claim_id, lease) DO NOTHING")
            written.cancellations = try await insert("cancellations", ["claim_id", "voucher", "region", "ts_ms"], cancels,
                                                     conflict: "(claim_id) DO NOTHING")
            _ = try await insert("cancel_shares", ["claim_id", "voucher", "region", "lease", "qty", "to_pool"], cancelShares,
                                 conflict: "(claim_id, lease) DO NOTHING")
            written.other += try await insert("leases", ["voucher", "region", "lease", "host", "granted", "durability", "ts_ms"],
                                              leases, conflict: "(voucher, region, lease) DO NOTHING")
            written.other += try await insert(
                "lease_closes", ["voucher", "region", "lease", "host", "granted", "served", "returned", "gone", "ts_ms"],
                closes, conflict: "(voucher, region, lease) DO NOTHING")
            written.other += try await insert(
                "vouchers", ["voucher", "region", "limit_tokens", "total_limit", "per_user", "state", "gen", "ts_ms"],
                Array(vouchers.values),
                conflict: """
                    (voucher, region) DO UPDATE SET limit_tokens = excluded.limit_tokens, total_limit = excluded.total_limit,
                    per_user = excluded.per_user, state = excluded.state, gen = excluded.gen, ts_ms = excluded.ts_ms
                    WHERE excluded.ts_ms >= vouchers.ts_ms
                    """)
            written.other += try await insert("journal_ships", ["host", "region", "voucher", "lease", "granted", "served", "ts_ms"],
                                              ships, conflict: "(host, region, voucher, lease) DO NOTHING")
            written.other += try await insert("journal_ship_requests", ["host", "region", "voucher", "req"], shipReqs,
                                              conflict: "(region, voucher, req) DO NOTHING")
            _ = try await insert("ledger_offsets", ["topic", "part", "next_offset"],
                                 next.map { [.text(topic), .int(Int64($0.key)), .int($0.value)] },
                                 conflict: "(topic, part) DO UPDATE SET next_offset = excluded.next_offset")
        }
        return written
    }

    /// A multi-row `INSERT … ON CONFLICT …`, in chunks under the backend's bind limit. Returns the rows sent.
    private func insert(_ table: String, _ cols: [String], _ rows: [[LedgerValue]], conflict: String) async throws -> Int {
        guard !rows.isEmpty else { return 0 }
        let per = max(1, db.dialect.maxParams / cols.count)
        var start = 0
        while start < rows.count {
            let chunk = rows[start..<min(rows.count, start + per)]
            var sql = "INSERT INTO \(table) (\(cols.joined(separator: ", "))) VALUES "
            var params: [LedgerValue] = []
            params.reserveCapacity(chunk.count * cols.count)
            var first = true
            for r in chunk {
                if !first { sql += "," }
                first = false
                sql += "(" + (0..<cols.count).map { db.dialect.param(params.count + $0 + 1) }.joined(separator: ",") + ")"
                params += r
            }
            sql += " ON CONFLICT \(conflict)"
            _ = try await db.execute(sql, params)
            start += per
        }
        return rows.count
    }

    // MARK: - Queries (reconciliation, rehydration, audits)

    private func p(_ n: Int) -> String { db.dialect.param(n) }

    /// What the stream says of each lease of a voucher in a region.
    public struct LeaseView: Sendable, Equatable {
        public var lease: String
        public var host: String?
        public var granted: Int?
        /// `journal`, `kafka` or `none`, from its `lease_granted` event.
        public var durability: String?
        /// Tokens of claims of this lease, and of their cancellations (back to the lease, and to the pool).
        public var claimed = 0
        public var cancelledToLease = 0
        public var cancelledToPool = 0
        /// Its `lease_closed` event, if the host closed it.
        public var closedReturned: Int?
        public var closedServed: Int?
        /// What a shipped journal of its host says it served, if one was shipped.
        public var journalServed: Int?

        public init(lease: String) { self.lease = lease }

        /// Net tokens sold through the lease that are not back in it or in the pool.
        public var soldNet: Int { claimed - cancelledToLease - cancelledToPool }
    }

    /// The leases of every voucher of a region (or of one), as the stream tells them: voucher → lease → view.
    public func leaseViews(region: String, voucher: String? = nil) async throws -> [String: [String: LeaseView]] {
        var out: [String: [String: LeaseView]] = [:]
        func update(_ v: String, _ l: String, _ body: (inout LeaseView) -> Void) {
            var view = out[v]?[l] ?? LeaseView(lease: l)
            body(&view)
            out[v, default: [:]][l] = view
        }
        let filter = voucher == nil ? "" : " AND voucher = \(p(2))"
        let k: [LedgerValue] = [.text(region)] + (voucher.map { [LedgerValue.text($0)] } ?? [])
        for r in try await db.execute("SELECT voucher, lease, host, granted, durability FROM leases WHERE region = \(p(1))\(filter)", k) {
            update(r[0].string ?? "", r[1].string ?? "") {
                $0.host = r[2].string
                $0.granted = r[3].int
                $0.durability = r[4].string
            }
        }
        for r in try await db.execute(
            "SELECT voucher, lease, SUM(qty) FROM claim_shares WHERE region = \(p(1))\(filter) GROUP BY voucher, lease", k)
        {
            update(r[0].string ?? "", r[1].string ?? "") { $0.claimed = r[2].int ?? 0 }
        }
        for r in try await db.execute(
            "SELECT voucher, lease, to_pool, SUM(qty) FROM cancel_shares WHERE region = \(p(1))\(filter) GROUP BY voucher, lease, to_pool", k)
        {
            update(r[0].string ?? "", r[1].string ?? "") {
                if r[2].int == 1 { $0.cancelledToPool = r[3].int ?? 0 } else { $0.cancelledToLease = r[3].int ?? 0 }
            }
        }
        for r in try await db.execute("SELECT voucher, lease, returned, served FROM lease_closes WHERE region = \(p(1))\(filter)", k) {
            update(r[0].string ?? "", r[1].string ?? "") {
                $0.closedReturned = r[2].int
                $0.closedServed = r[3].int
            }
        }
        for r in try await db.execute("SELECT voucher, lease, served FROM journal_ships WHERE region = \(p(1))\(filter)", k) {
            update(r[0].string ?? "", r[1].string ?? "") { $0.journalServed = r[2].int }
        }
        return out
    }

    /// Lease requests a shipped journal says were never seen answered: `voucher|req`.
    public func shippedRequests(region: String) async throws -> Set<String> {
        let rows = try await db.execute("SELECT voucher, req FROM journal_ship_requests WHERE region = \(p(1))", [.text(region)])
        return Set(rows.map { "\($0[0].string ?? "")|\($0[1].string ?? "")" })
    }

    /// Net tokens claimed (claims minus cancellations) per voucher of a region.
    public func netClaimed(region: String) async throws -> [String: Int] {
        var out: [String: Int] = [:]
        for r in try await db.execute("SELECT voucher, SUM(qty) FROM claims WHERE region = \(p(1)) GROUP BY voucher", [.text(region)]) {
            out[r[0].string ?? "", default: 0] += r[1].int ?? 0
        }
        for r in try await db.execute("""
            SELECT x.voucher, SUM(c.qty) FROM cancellations x JOIN claims c ON c.claim_id = x.claim_id
            WHERE x.region = \(p(1)) GROUP BY x.voucher
            """, [.text(region)])
        {
            out[r[0].string ?? "", default: 0] -= r[1].int ?? 0
        }
        return out
    }

    /// Every standing claim (not cancelled) of a voucher in a region: claim id, user, qty.
    public func standingClaims(voucher: String, region: String) async throws -> [(claimID: String, user: String, qty: Int)] {
        let rows = try await db.execute("""
            SELECT c.claim_id, c.user_id, c.qty FROM claims c LEFT JOIN cancellations x ON x.claim_id = c.claim_id
            WHERE c.voucher = \(p(1)) AND c.region = \(p(2)) AND x.claim_id IS NULL
            """, [.text(voucher), .text(region)])
        return rows.map { ($0[0].string ?? "", $0[1].string ?? "", $0[2].int ?? 0) }
    }

    /// The newest definition of every voucher of a region.
    public func vouchers(region: String) async throws -> [VoucherDefinition] {
        let rows = try await db.execute(
            "SELECT voucher, limit_tokens, total_limit, per_user, state, gen, ts_ms FROM vouchers WHERE region = \(p(1)) ORDER BY voucher",
            [.text(region)])
        return rows.map {
            VoucherDefinition(voucher: $0[0].string ?? "", region: region, limit: $0[1].int ?? 0, totalLimit: $0[2].int ?? 0,
                              perUser: $0[3].int ?? 0, state: $0[4].string ?? "active", generation: $0[5].string ?? "",
                              tsMs: Int64($0[6].int ?? 0))
        }
    }

    /// Every voucher the ledger has seen in a region (defined, or with claims or leases).
    public func voucherIDs(region: String) async throws -> [String] {
        let rows = try await db.execute("""
            SELECT voucher FROM vouchers WHERE region = \(p(1)) UNION SELECT voucher FROM claims WHERE region = \(p(2))
            UNION SELECT voucher FROM leases WHERE region = \(p(3))
            """, [.text(region), .text(region), .text(region)])
        return rows.compactMap { $0[0].string }.sorted()
    }

    /// Row counts (for progress and the figures).
    public func counts() async throws -> (claims: Int, cancellations: Int) {
        let c = try await db.execute("SELECT COUNT(*) FROM claims", [])
        let u = try await db.execute("SELECT COUNT(*) FROM cancellations", [])
        return (c.first?[0].int ?? 0, u.first?[0].int ?? 0)
    }
}
