import ArgumentParser
import Foundation
import Glibc
import QuotaCore
import QuotaJournal
import QuotaRedis

/// `quotactl audit ID [--journal DIR ...]`: check the accounting identity (docs/accounting.md).
struct AuditCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "audit",
        abstract: "Check a voucher's books: Redis's own identity, and each given host journal against Redis.",
        discussion: """
            Checks, per region (docs/accounting.md): pool + leased - returned - restocked == limit; the lease
            records sum to the counters; no lease gave back more than it was granted; the allocation is the created
            one less what transfers sent plus what they received (quotactl rebalance), and the transfer records
            sum to those. With --config (every region), across regions: the allocations plus the transfers in
            flight (taken from a source, not yet received) equal the voucher's limit, and every received
            transfer was taken by its source with the same amount. With --journal DIR (a
            host's journal directory, repeatable): every lease the journal holds is in Redis with the same
            grant; leases Redis closed were closed with what the journal says was not served; a stopped host
            holds no lease open. Exits 1 on any imbalance.
            """)

    @Argument(help: "Voucher id.") var id: String
    @Option(name: .long, parsing: .singleValue, help: "A host's journal directory (repeatable).")
    var journal: [String] = []
    @OptionGroup var conn: Connection

    struct RegionReport: Codable {
        var region: String
        var limit: Int
        var pool: Int
        var leased: Int
        var returned: Int
        var restocked: Int
        var open_leases: Int
        var tokens_in_open_leases: Int
        var tokens_sold_through_closed_leases: Int
        /// The allocation it was created with (nil: not recorded, no transfer touched it).
        var allocated: Int?
        var sent: Int
        var received: Int
        /// Tokens this region sent that their destination has not received yet.
        var in_flight_out: Int
        var problems: [String]
    }

    struct GlobalReport: Codable {
        var total_limit: Int
        var allocations: Int
        var in_flight: Int
        var problems: [String]
        /// Regions whose Redis has no region marker (lost its data, not yet rehydrated): their allocation
        /// is unknown, so the cross-region checks (G1, G2) are not made (not an imbalance; see rehydrate).
        var regions_lost: [String]? = nil
    }

    struct JournalReport: Codable {
        var dir: String
        var host: String
        var running: Bool
        var open_leases: Int
        var served_in_open_leases: Int
        var net_claims_in_journal: Int
        var problems: [String]
    }

    struct Report: Codable {
        var voucher: String
        var regions: [RegionReport]
        var journals: [JournalReport]
        /// Across regions (only with --config: every region known).
        var global: GlobalReport?
        var balanced: Bool
    }

    func run() async throws {
        try requireVoucherID(id)
        let r = try conn.regions()
        var regions: [RegionReport] = []
        var journals: [JournalReport] = []
        var found = false
        var booksByRegion: [(String, VoucherAudit)] = []
        var lost: [String] = []
        for (name, url) in r.regions.sorted(by: { $0.key < $1.key }) {
            let s = try conn.store(url)
            let voucher = id
            let got = try await withRedis(url) { () async throws(RedisError) -> (VoucherRecord, [LeaseRecord], [TransferRecord])? in
                guard let rec = try await s.voucher(voucher) else { return nil }
                return (rec, try await s.leases(voucher: voucher), try await s.transfers(voucher: voucher))
            }
            guard let (rec, leases, transfers) = got else {
                if try await withRedis(url, { () async throws(RedisError) in try await s.regionGeneration() }) == nil {
                    lost.append(name)
                }
                continue
            }
            found = true
            let b = VoucherAudit(record: rec, leases: leases, transfers: transfers)
            booksByRegion.append((name, b))
            regions.append(RegionReport(
                region: name, limit: b.limit, pool: b.pool, leased: b.leased, returned: b.returned, restocked: b.restocked,
                open_leases: leases.filter { $0.state == .open }.count, tokens_in_open_leases: b.openOutstanding,
                tokens_sold_through_closed_leases: b.closedOutstanding, allocated: rec.allocated, sent: rec.sent,
                received: rec.received, in_flight_out: 0, problems: b.redisProblems()))
        }
        var global: GlobalReport?
        if conn.config != nil && !booksByRegion.isEmpty && !lost.isEmpty {
            global = GlobalReport(total_limit: booksByRegion.map(\.1.totalLimit).max() ?? 0,
                                  allocations: booksByRegion.reduce(0) { $0 + $1.1.limit }, in_flight: 0, problems: [],
                                  regions_lost: lost)
        } else if conn.config != nil && !booksByRegion.isEmpty {
            let g = VoucherAudit.globalProblems(booksByRegion.map { (region: $0.0, books: $0.1) })
            var received: [String: Set<String>] = [:]
            for (name, b) in booksByRegion { received[name] = Set((b.transfers ?? []).filter { !$0.outgoing }.map(\.id)) }
            for (i, (_, b)) in booksByRegion.enumerated() {
                regions[i].in_flight_out = b.inFlight(received: received).reduce(0) { $0 + $1.amount }
            }
            global = GlobalReport(total_limit: booksByRegion.map(\.1.totalLimit).max() ?? 0,
                                  allocations: booksByRegion.reduce(0) { $0 + $1.1.limit }, in_flight: g.inFlight,
                                  problems: g.problems)
        }
        guard found else { throw ValidationError("no voucher '\(id)' (see: quotactl voucher list)") }
        for dir in journal {
            guard FileManager.default.fileExists(atPath: dir) else { throw ValidationError("--journal \(dir): no such directory") }
            let rec = JournalRecovery.read(dir: dir)
            let host = rec.boots.last?.host ?? "?"
            let running = Self.isLocked(dir)
            var problems = rec.issues.map { "journal: \($0)" }
            // A journal's leases are in its own region's Redis: check it against every region that has the voucher.
            for (_, b) in booksByRegion {
                problems += b.journalProblems(host: host, ledger: rec.ledger, hostStopped: !running)
            }
            let mine = rec.ledger.openAccounts.filter { $0.voucher == id }
            let net = rec.history.filter { $0.voucher == id }.reduce(0) { $0 + ($1.kind == .claimed ? $1.qty : -$1.qty) }
            journals.append(JournalReport(
                dir: dir, host: host, running: running, open_leases: mine.count,
                served_in_open_leases: mine.reduce(0) { $0 + $1.served }, net_claims_in_journal: net, problems: problems))
        }
        let balanced = regions.allSatisfy(\.problems.isEmpty) && journals.allSatisfy(\.problems.isEmpty)
            && (global?.problems.isEmpty ?? true)
        let report = Report(voucher: id, regions: regions, journals: journals, global: global, balanced: balanced)
        if conn.json {
            try emitJSON(report)
        } else {
            print("audit of voucher \(id)")
            for g in regions {
                print("  region \(g.region): limit \(g.limit) = pool \(g.pool) + leased \(g.leased) - returned \(g.returned) - restocked \(g.restocked)")
                print("    open leases \(g.open_leases) holding \(g.tokens_in_open_leases); sold through closed leases \(g.tokens_sold_through_closed_leases)")
                if g.sent > 0 || g.received > 0 {
                    print("    allocation \(g.limit) = created \(g.allocated.map(String.init) ?? "?") - sent \(g.sent) + received \(g.received)"
                        + (g.in_flight_out > 0 ? "; \(g.in_flight_out) sent still in flight" : ""))
                }
                for p in g.problems { print("    IMBALANCE \(p)") }
            }
            for j in journals {
                print("  journal \(j.dir) (host \(j.host), \(j.running ? "running" : "stopped")): \(j.open_leases) open lease(s), "
                    + "\(j.served_in_open_leases) served in them; net claims in the retained journal \(j.net_claims_in_journal)")
                for p in j.problems { print("    IMBALANCE \(p)") }
            }
            if let g = global, let lost = g.regions_lost {
                print("  all regions: not checked: region(s) \(lost.joined(separator: ", ")) have no region marker (their Redis "
                    + "lost its data?): run quotactl rehydrate --region R there")
            } else if let g = global {
                print("  all regions: limit \(g.total_limit) = allocations \(g.allocations) + in flight \(g.in_flight)")
                for p in g.problems { print("    IMBALANCE \(p)") }
            }
            print(balanced ? "balanced" : "NOT balanced")
        }
        if !balanced { throw ExitCode(1) }
    }

    /// Is a quotad running on this journal (its LOCK held)?
    static func isLocked(_ dir: String) -> Bool {
        let f = open(dir + "/LOCK", O_RDWR | O_CLOEXEC)
        guard f >= 0 else { return false }
        defer { close(f) }
        if flock(f, LOCK_EX | LOCK_NB) == 0 {
            flock(f, LOCK_UN)
            return false
        }
        return true
    }
}
