import ArgumentParser
import Foundation
import Logging
import NIOConcurrencyHelpers
import QuotaConfig
import QuotaCore
import QuotaJournal
import QuotaKafka
import QuotaLedger
import QuotaRedis

/// The ledger and the stream, as the operator tools reach them.
struct LedgerAccess {
    let config: SidecarConfig
    let ledger: Ledger

    /// Open `ledger.db` of `--config` (or `--ledger`), first reading the Kafka tail the ledger has not
    /// consumed yet (so it is complete up to now), unless `catchUp` is false.
    static func open(_ conn: Connection, ledgerURL: String?, catchUp: Bool) async throws -> LedgerAccess {
        guard let cfg = try conn.loadConfig() else {
            throw ValidationError("give --config FILE: the ledger (ledger.db) and Kafka (kafka.*) are in it")
        }
        var logger = Logger(label: "quotactl")
        logger.logLevel = .error
        let url = ledgerURL ?? cfg.ledger.db
        let db: any LedgerDatabase
        do { db = try await openLedgerDatabase(url: url, logger: logger) } catch { throw ValidationError("\(error)") }
        let ledger = Ledger(db: db)
        try await ledger.migrate()
        if catchUp, let brokers = cfg.kafka.brokers {
            var o = LedgerConsumer.Options(brokers: brokers, topic: cfg.kafka.topic)
            o.idleExit = .seconds(2)
            o.batch = cfg.ledger.batch
            try await LedgerConsumer(ledger: ledger, options: o, logger: logger).run()
        }
        return LedgerAccess(config: cfg, ledger: ledger)
    }
}

/// Produce events to the claim topic and wait until Kafka acknowledged them all.
func produceEvents(brokers: String, topic: String, _ events: [(key: String, value: [UInt8])]) throws -> Int {
    var logger = Logger(label: "quotactl.kafka")
    logger.logLevel = .error
    do {
        return try KafkaProducer.produceAll(brokers: brokers, topic: topic, events, logger: logger)
    } catch {
        throw ValidationError("\(error)")
    }
}

/// `quotactl reconcile`: Redis, the ledger and Kafka side by side; `--repair` reclaims the leases of hosts
/// that are gone, where what they sold is proven.
struct ReconcileCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "reconcile",
        abstract: "Compare Redis with the ledger per voucher and region; with --repair, reclaim expired leases of gone hosts.",
        discussion: """
            First reads the Kafka tail into the ledger. Then, per voucher and region: Redis's books (R1-R3),
            every closed lease against what the ledger says it sold (C2), the ledger's net claims against the
            books (C1), and every open lease: held by a live host, or expired (Redis's clock) more than --grace
            ago. --repair reclaims an expired lease when what it sold is proven complete: its lease_granted event
            says durability kafka (every answered claim was on Kafka first), or its host closed it
            (lease_closed), or its host's journal was shipped (quotactl journal ship). Otherwise it is reported
            unproven and left alone, unless --forfeit VOUCHER/LEASE writes its tokens off (under-issue, never
            oversell). Exit status 1 when something does not balance and is not explained.
            """)

    @Option(name: .long, help: "Only this voucher.") var voucher: String?
    @Flag(name: .long, help: "Reclaim expired leases of gone hosts whose sales are proven.") var repair = false
    @Option(name: .long, parsing: .singleValue, help: "Write off an unproven lease: VOUCHER/LEASE (repeatable; with --repair).")
    var forfeit: [String] = []
    @Option(name: .long, help: "Seconds past a lease's expiry (Redis's clock) before it may be reclaimed.") var grace: Double = 30
    @Option(name: .long, help: "Override ledger.db.") var ledger: String?
    @Flag(name: .long, help: "Do not read the Kafka tail into the ledger first.") var noCatchUp = false
    @OptionGroup var conn: Connection

    struct LeaseLine: Codable {
        var voucher: String
        var region: String
        var lease: String
        var host: String
        var state: String
        var granted: Int
        var returned: Int
        var restocked: Int
        var ledgerSold: Int
        var proof: String?
        var action: String
    }

    struct VoucherLine: Codable {
        var voucher: String
        var region: String
        var limit: Int
        var pool: Int
        var openLeases: Int
        var soldThroughClosedLeases: Int
        var ledgerNetClaims: Int
        var problems: [String]
    }

    struct Report: Codable {
        var vouchers: [VoucherLine]
        var leases: [LeaseLine]
        var reclaimed: Int
        var writtenOff: Int
        var unproven: Int
        /// Closed leases whose host's events are not (all) on the ledger yet.
        var incomplete: Int
        var balanced: Bool
        var seconds: Double
    }

    func run() async throws {
        if let voucher { try requireVoucherID(voucher) }
        let t0 = ContinuousClock.now
        let access = try await LedgerAccess.open(conn, ledgerURL: ledger, catchUp: !noCatchUp)
        let forfeits = Set(forfeit)
        for f in forfeits where !f.contains("/") { throw ValidationError("--forfeit takes VOUCHER/LEASE, got '\(f)'") }
        var vouchers: [VoucherLine] = []
        var leases: [LeaseLine] = []
        var reclaimed = 0
        var writtenOff = 0
        var unproven = 0
        var incomplete = 0
        for (region, url) in access.config.regions.sorted(by: { $0.key < $1.key }) {
            let store = try conn.store(url)
            let views = try await access.ledger.leaseViews(region: region, voucher: voucher)
            let shippedRequests = try await access.ledger.shippedRequests(region: region)
            let net = try await access.ledger.netClaimed(region: region)
            let ids: [String]
            if let voucher {
                ids = [voucher]
            } else {
                ids = Set(try await withRedis(url) { () async throws(RedisError) in try await store.voucherIDs() })
                    .union(try await access.ledger.voucherIDs(region: region)).sorted()
            }
            let nowMs = try await withRedis(url) { () async throws(RedisError) in try await store.nowMs() }
            for id in ids {
                guard let rec = try await withRedis(url, { () async throws(RedisError) in try await store.voucher(id) }) else {
                    if net[id] != nil {
                        vouchers.append(VoucherLine(voucher: id, region: region, limit: 0, pool: 0, openLeases: 0,
                                                    soldThroughClosedLeases: 0, ledgerNetClaims: net[id] ?? 0,
                                                    problems: ["the ledger has claims of '\(id)' in \(region), Redis has no such voucher (see quotactl rehydrate)"]))
                    }
                    continue
                }
                let records = try await withRedis(url) { () async throws(RedisError) in try await store.leases(voucher: id) }
                let books = VoucherAudit(record: rec, leases: records)
                var problems = books.redisProblems()
                let view = views[id] ?? [:]
                for l in records {
                    let v = view[l.id] ?? Ledger.LeaseView(lease: l.id)
                    var line = LeaseLine(voucher: id, region: region, lease: l.id, host: l.host, state: l.state.rawValue,
                                         granted: l.granted, returned: l.returned, restocked: l.restocked,
                                         ledgerSold: v.soldNet,
                                         proof: Self.proof(v, record: l, unansweredInShippedJournal: shippedRequests.contains("\(id)|\(QuotaStore.journaledRequest(l.req, lease: l.id))")),
                                         action: "")
                    switch l.state {
                    case .closed, .reclaimed:
                        if l.outstanding == v.soldNet { continue }
                        // The ledger is complete for a lease once its lease_closed (or its host's shipped journal,
                        // or kafka mode) is on it; before that, the host's events may simply not be on Kafka yet.
                        if line.proof != nil || l.state == .reclaimed {
                            problems.append("C2 lease \(l.id) (\(l.host)): Redis kept \(l.outstanding) tokens, the ledger says it sold \(v.soldNet)")
                            line.action = "MISMATCH"
                        } else {
                            incomplete += 1
                            line.action = "the ledger has \(v.soldNet) of the \(l.outstanding) tokens it kept: \(l.host)'s events are not on "
                                + "Kafka yet (ship its journal if it is gone)"
                        }
                    case .open:
                        let due = l.expiresMs + Int(grace * 1000)
                        if nowMs < l.expiresMs {
                            line.action = "held by \(l.host) (live, expires in \((l.expiresMs - nowMs) / 1000) s)"
                        } else if nowMs < due {
                            line.action = "expired \((nowMs - l.expiresMs) / 1000) s ago; reclaimable after the grace (\((due - nowMs) / 1000) s)"
                        } else if let proof = line.proof {
                            if repair {
                                let r = try await withRedis(url) { () async throws(RedisError) in
                                    try await store.reclaim(voucher: id, lease: l.id, sold: v.soldNet, grace: .milliseconds(Int64(grace * 1000)),
                                                            forfeit: false)
                                }
                                switch r {
                                case .reclaimed(let n):
                                    reclaimed += n
                                    line.action = "reclaimed: \(n) tokens back to the pool (sold \(v.soldNet), proven by \(proof))"
                                case .soldTooHigh(let most):
                                    problems.append("lease \(l.id): the ledger says it sold \(v.soldNet), but it can have sold at most \(most)")
                                    line.action = "REFUSED"
                                default:
                                    line.action = "not reclaimed: \(r)"
                                }
                            } else {
                                line.action = "reclaimable: \(l.granted - l.returned - l.restocked - v.soldNet) tokens (sold \(v.soldNet), proven by \(proof)); run with --repair"
                            }
                        } else if forfeits.contains("\(id)/\(l.id)") && repair {
                            let r = try await withRedis(url) { () async throws(RedisError) in
                                try await store.reclaim(voucher: id, lease: l.id, sold: 0, grace: .milliseconds(Int64(grace * 1000)),
                                                        forfeit: true)
                            }
                            if case .reclaimed = r { writtenOff += l.outstanding }
                            line.action = "forfeited: \(l.outstanding) tokens written off (\(r))"
                        } else {
                            unproven += 1
                            line.action = "UNPROVEN: \(l.outstanding) tokens held by gone host \(l.host); ship its journal "
                                + "(quotactl journal ship --dir DIR) or --forfeit \(id)/\(l.id)"
                        }
                    }
                    leases.append(line)
                }
                // After the repairs, the books again.
                let after = VoucherAudit(record: try await withRedis(url) { () async throws(RedisError) in try await store.voucher(id) } ?? rec,
                                         leases: try await withRedis(url) { () async throws(RedisError) in try await store.leases(voucher: id) })
                if repair { problems = after.redisProblems() + problems.filter { !$0.hasPrefix("R") } }
                let n = net[id] ?? 0
                let complete = after.leases.allSatisfy { l in
                    l.state == "o" || l.outstanding == (view[l.id]?.soldNet ?? 0)
                }
                for p in after.claimProblems(netClaimed: n) where p.contains("OVERSOLD") || (after.openOutstanding == 0 && complete) {
                    problems.append(p)
                }
                vouchers.append(VoucherLine(voucher: id, region: region, limit: after.limit, pool: after.pool,
                                            openLeases: after.leases.filter { $0.state == "o" }.count,
                                            soldThroughClosedLeases: after.closedOutstanding, ledgerNetClaims: n, problems: problems))
            }
        }
        let balanced = vouchers.allSatisfy(\.problems.isEmpty)
        let report = Report(vouchers: vouchers, leases: leases, reclaimed: reclaimed, writtenOff: writtenOff, unproven: unproven,
                            incomplete: incomplete, balanced: balanced, seconds: Double((ContinuousClock.now - t0).components.attoseconds) / 1e18
                                + Double((ContinuousClock.now - t0).components.seconds))
        if conn.json {
            try emitJSON(report)
        } else {
            print("| voucher | region | limit | pool | open leases | sold (closed leases) | ledger net claims | balanced |")
            print("|---|---|---:|---:|---:|---:|---:|---|")
            for v in vouchers {
                print("| \(v.voucher) | \(v.region) | \(v.limit) | \(v.pool) | \(v.openLeases) | \(v.soldThroughClosedLeases) | \(v.ledgerNetClaims) | \(v.problems.isEmpty ? "yes" : "NO") |")
            }
            for l in leases { print("  \(l.voucher)/\(l.lease) @\(l.region) \(l.host) [\(l.state)] granted \(l.granted) returned \(l.returned) restocked \(l.restocked): \(l.action)") }
            for v in vouchers { for p in v.problems { print("  IMBALANCE \(v.voucher)@\(v.region): \(p)") } }
            print("reclaimed \(reclaimed) tokens, wrote off \(writtenOff), \(unproven) lease(s) unproven, "
                + "\(incomplete) closed lease(s) not yet complete on the ledger; "
                + "\(balanced ? "balanced" : "NOT balanced") (\(String(format: "%.2f", report.seconds)) s)")
        }
        await access.ledger.db.close()
        if !balanced { throw ExitCode(1) }
    }

    /// Why a lease's sales are known to be complete, or nil. Under `durability: kafka` every answered claim
    /// was on Kafka before its reply, after the lease's grant on the same partition: the ledger, read to the
    /// end, holds all of them (even when the grant itself never reached Kafka: then nothing was answered).
    static func proof(_ v: Ledger.LeaseView, record: LeaseRecord, unansweredInShippedJournal: Bool = false) -> String? {
        if v.durability == "kafka" || record.durability == "kafka" { return "durability kafka" }
        // Granted to a request its host's shipped journal never saw answered: nothing was served from it.
        if unansweredInShippedJournal && v.soldNet == 0 { return "shipped journal (grant never journaled)" }
        if v.closedServed != nil { return "lease_closed" }
        if v.journalServed != nil { return "shipped journal" }
        return nil
    }
}

/// `quotactl journal ship --dir DIR`: stream a (dead) host's journal to Kafka, with proof of completeness.
struct JournalCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "journal", abstract: "A host's journal.", subcommands: [Ship.self])

    struct Ship: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Stream a host's journal (e.g. a dead host's disk) to Kafka, with a journal_shipped event per voucher.",
            discussion: """
                Reads every segment of DIR (refused while a quotad holds it), produces every claim, cancellation and
                lease event it holds (consumers dedupe by claim id), then, per voucher, one journal_shipped event that
                lists each open lease of the host with what the journal says it served: the proof reconciliation needs
                to reclaim those leases exactly. Refused when the journal is corrupt (its served counts are not proven).
                """)
        @Option(name: .long, help: "The journal directory.") var dir: String
        @Option(name: .long, help: "The host's id, when the journal no longer says it (its first segments were deleted).")
        var host: String?
        @OptionGroup var conn: Connection

        func run() async throws {
            guard let cfg = try conn.loadConfig(), let brokers = cfg.kafka.brokers else {
                throw ValidationError("give --config FILE with kafka.brokers: the journal is shipped to that topic")
            }
            guard FileManager.default.fileExists(atPath: dir) else { throw ValidationError("--dir \(dir): no such directory") }
            if AuditCommand.isLocked(dir) { throw ValidationError("--dir \(dir): a quotad is running on it; ship a journal only once its host is gone") }
            let rec = JournalRecovery.read(dir: dir)
            guard rec.leaseStateTrusted else {
                throw ValidationError("journal \(dir) is corrupt (\(rec.issues.first ?? "?")): what it served is not proven; use reconcile --forfeit")
            }
            let fromEvents = rec.segments.lazy.flatMap(\.events).compactMap { e -> String? in
                switch e {
                case .claim(let c): return c.host
                case .leaseGranted(let g): return g.host
                case .leaseClosed(let c): return c.host
                }
            }.first
            guard let host = self.host ?? rec.boots.last?.host ?? fromEvents else {
                throw ValidationError("journal \(dir) does not say which host wrote it: give --host")
            }
            var events: [(key: String, value: [UInt8])] = []
            for seg in rec.segments { for e in seg.events { events.append((e.key, e.kafkaValue)) } }
            let byVoucher = Dictionary(grouping: rec.ledger.openAccounts.filter(\.trusted), by: \.voucher)
            let requests = Dictionary(grouping: rec.ledger.requests, by: \.value).mapValues { $0.map(\.key).sorted() }
            let now = Int64(Date().timeIntervalSince1970 * 1000)
            for v in Set(byVoucher.keys).union(requests.keys).sorted() {
                events.append((v, journalShippedValue(host: host, region: cfg.region, voucher: v,
                                                      leases: (byVoucher[v] ?? []).map { .init(lease: $0.lease, granted: $0.granted, served: $0.served) },
                                                      requests: requests[v] ?? [], tsMs: now)))
            }
            let n = try produceEvents(brokers: brokers, topic: cfg.kafka.topic, events)
            if conn.json {
                try emitJSON(["host": host, "events": String(n), "open_leases": String(byVoucher.values.reduce(0) { $0 + $1.count })])
            } else {
                print("shipped \(n) events of \(host)'s journal (\(byVoucher.values.reduce(0) { $0 + $1.count }) open lease(s) with proof) to \(cfg.kafka.topic)")
            }
        }
    }
}
