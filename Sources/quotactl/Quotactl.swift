import ArgumentParser
import Foundation
import Logging
import QuotaConfig
import QuotaCore
import QuotaLedger
import QuotaRedis

@main
struct Quotactl: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "quotactl",
        abstract: "Operate quotad: vouchers, lease policy, audit, reconcile, rehydrate, journals, status.",
        subcommands: [VoucherCommand.self, LeaseCommand.self, AuditCommand.self, ReconcileCommand.self, RehydrateCommand.self,
                      JournalCommand.self, StatusCommand.self, RebalanceCommand.self])
}

/// Where to find the regions' Redis and the local quotad.
struct Connection: ParsableArguments {
    @Option(name: .long, help: "quotad config file (uses regions, region, socket).") var config: String?
    @Option(name: .long, help: "Redis URL of a single region (instead of --config).") var redis: String?
    @Option(name: .long, help: "Redis call timeout in milliseconds.") var timeoutMs: Int = 2000
    @Flag(name: .long, help: "Machine-readable JSON output.") var json = false

    /// Region name → Redis URL, and the default region.
    func regions() throws -> (regions: [String: String], home: String, socket: String?) {
        if let redis {
            _ = try RedisEndpoint(url: redis)
            let home = (try? loadConfig())?.region ?? "default"
            return ([home: redis], home, nil)
        }
        guard config != nil else {
            throw ValidationError("say where Redis is: --redis redis://127.0.0.1:6379 or --config /etc/quotad.yaml")
        }
        let c = try loadConfig()!
        return (c.regions, c.region, c.socket.path)
    }

    func loadConfig() throws -> SidecarConfig? {
        guard let config else { return nil }
        guard let text = try? String(contentsOfFile: config, encoding: .utf8) else {
            throw ValidationError("cannot read config file '\(config)'")
        }
        do {
            return try SidecarConfig.load(yaml: text, defaultHostID: "quotactl")
        } catch {
            throw ValidationError("\(error)")
        }
    }

    func store(_ url: String) throws -> QuotaStore {
        var logger = Logger(label: "quotactl")
        logger.logLevel = .error
        return try QuotaStore(url: url, timeout: .milliseconds(timeoutMs), logger: logger)
    }

    func home() throws -> QuotaStore {
        let r = try regions()
        return try store(r.regions[r.home]!)
    }
}

func emitJSON(_ value: some Encodable) throws {
    let e = JSONEncoder()
    e.outputFormatting = [.prettyPrinted, .sortedKeys]
    print(String(decoding: try e.encode(value), as: UTF8.self))
}

func requireVoucherID(_ id: String) throws {
    guard QuotaStore.isValidVoucherID(id) else {
        throw ValidationError("invalid voucher id '\(id)': use 1-64 of A-Z a-z 0-9 _ . : -")
    }
}

/// Run Redis calls against `url`; a failure becomes an error that says what to do.
func withRedis<T>(_ url: String, _ body: () async throws(RedisError) -> T) async throws -> T {
    let r: Result<T, RedisError>
    do { r = .success(try await body()) } catch { r = .failure(error) }
    switch r {
    case .success(let v): return v
    case .failure(let e): throw redisFailure(e, url)
    }
}

/// Turn a Redis failure into an error that says what to do.
func redisFailure(_ e: RedisError, _ url: String) -> ValidationError {
    switch e {
    case .unreachable(let why):
        return ValidationError("cannot reach Redis at \(url): \(why). Is redis-server running? Check --redis/--config.")
    default:
        return ValidationError("Redis at \(url): \(e)")
    }
}

struct VoucherJSON: Codable {
    var id: String
    var region: String
    var state: String
    var limit: Int
    var total_limit: Int
    var pool: Int
    var per_user: Int
    var leased: Int
    var returned: Int
    var leases_outstanding: Int
    var tokens_outstanding: Int
    var lease_policy: [String: Double]
    var start_ms: Int64
    var end_ms: Int64
    /// Hot-key shards: each shard's pool (absent for an unsharded voucher).
    var shard_pools: [Int]?

    init(_ r: VoucherRecord, leases: [LeaseRecord]) {
        id = r.id
        region = r.region
        state = r.status.rawValue
        limit = r.limit
        total_limit = r.totalLimit
        pool = r.pool
        per_user = r.perUser
        leased = r.leased
        returned = r.returned
        // Open leases only: closed ones stay listed (until archived) but hold nothing.
        let open = leases.filter { $0.state == .open }
        leases_outstanding = open.count
        tokens_outstanding = open.reduce(0) { $0 + $1.outstanding }
        var p: [String: Double] = [:]
        if let v = r.policy.min { p["min"] = Double(v) }
        if let v = r.policy.max { p["max"] = Double(v) }
        if let v = r.policy.targetSeconds { p["target_seconds"] = v }
        if let v = r.policy.ttlSeconds { p["ttl"] = v }
        if let v = r.policy.opening { p["opening"] = Double(v) }
        lease_policy = p
        start_ms = r.startMs
        end_ms = r.endMs
        shard_pools = r.shardPools.isEmpty ? nil : r.shardPools
    }
}

struct VoucherCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "voucher", abstract: "Create and inspect vouchers.",
        subcommands: [Create.self, Show.self, List.self, Pause.self, Resume.self, Close.self, SetSchedule.self, Warm.self])

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create a voucher and its region pools.")
        @Argument(help: "Voucher id.") var id: String
        @Option(name: .long, help: "Total limit across all regions.") var limit: Int
        @Option(name: .long, help: "Per-user limit (0 = none).") var perUser: Int = 0
        @Option(name: .long, parsing: .singleValue, help: "Region allocation R=N (repeatable); default: all to the home region.")
        var region: [String] = []
        @Option(name: .long, help: "Hot-key shards: each region's pool split into this many sub-pools on different slots (1-64).")
        var shards: Int = 1
        @Option(name: .long, help: "Sale opening: RFC 3339 or +30s (Redis's clock). Before it CLAIM answers INACTIVE.")
        var start: String?
        @Option(name: .long, help: "Sale end: RFC 3339 or +10m (Redis's clock). After it CLAIM answers INACTIVE.")
        var end: String?
        @OptionGroup var conn: Connection

        func run() async throws {
            try requireVoucherID(id)
            guard limit >= 0 else { throw ValidationError("--limit must be >= 0") }
            guard perUser >= 0 else { throw ValidationError("--per-user must be >= 0") }
            guard (1...64).contains(shards) else { throw ValidationError("--shards must be from 1 to 64, got \(shards)") }
            let r = try conn.regions()
            var alloc: [(String, Int)] = []
            if region.isEmpty {
                alloc = [(r.home, limit)]
            } else {
                for s in region {
                    let parts = s.split(separator: "=")
                    guard parts.count == 2, let n = Int(parts[1]), n >= 0 else {
                        throw ValidationError("--region takes REGION=N, got '\(s)'")
                    }
                    let name = String(parts[0])
                    guard r.regions[name] != nil else {
                        throw ValidationError("--region \(name): no Redis known for region '\(name)' (add regions.\(name).redis to the config)")
                    }
                    alloc.append((name, n))
                }
                let sum = alloc.reduce(0) { $0 + $1.1 }
                guard sum == limit else {
                    throw ValidationError("--region allocations add up to \(sum), but --limit is \(limit)")
                }
            }
            var created: [String] = []
            var definitions: [(key: String, value: [UInt8])] = []
            let now = Int64(Date().timeIntervalSince1970 * 1000)
            for (name, n) in alloc {
                let url = r.regions[name]!
                let s = try conn.store(url)
                let redisNow = Int64(try await withRedis(url) { () async throws(RedisError) in try await s.nowMs() })
                let startMs = try start.map { try parseSaleTime($0, option: "--start", redisNowMs: redisNow) } ?? 0
                let endMs = try end.map { try parseSaleTime($0, option: "--end", redisNowMs: redisNow) } ?? 0
                if startMs > 0 && endMs > 0 && endMs <= startMs {
                    throw ValidationError("--end (\(formatUTC(ms: endMs))) must be after --start (\(formatUTC(ms: startMs)))")
                }
                let ok = try await withRedis(url) { () async throws(RedisError) in
                    try await s.createVoucher(id: id, limit: n, perUser: perUser, totalLimit: limit, region: name,
                                              startMs: startMs, endMs: endMs, shards: shards)
                }
                guard ok else {
                    throw ValidationError("voucher '\(id)' already exists in region \(name)"
                        + (created.isEmpty ? "" : " (created in \(created.joined(separator: ", ")) before this)"))
                }
                created.append(name)
                let gen = try await withRedis(url) { () async throws(RedisError) in try await s.regionGeneration() } ?? ""
                definitions.append((id, VoucherDefinition(voucher: id, region: name, limit: n, totalLimit: limit, perUser: perUser,
                                                          state: "active", generation: gen, tsMs: now).kafkaValue))
            }
            // The ledger keeps what each region's allocation is (rehydration rebuilds pools from it).
            if let cfg = try conn.loadConfig(), let brokers = cfg.kafka.brokers {
                _ = try produceEvents(brokers: brokers, topic: cfg.kafka.topic, definitions)
            }
            if conn.json {
                try emitJSON(["id": id, "limit": String(limit), "regions": alloc.map { "\($0.0)=\($0.1)" }.joined(separator: ",")])
            } else {
                print("created voucher \(id): limit \(limit)\(perUser > 0 ? ", \(perUser) per user" : ""), "
                    + alloc.map { "\($0.0)=\($0.1)" }.joined(separator: " ") + (shards > 1 ? ", \(shards) shards per region" : ""))
            }
        }
    }

    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show a voucher's pool and leases in every region.")
        @Argument var id: String
        @Flag(name: .long, help: "Every region side by side: allocation, pool, leased, sold, transfers in and out.")
        var global = false
        @OptionGroup var conn: Connection

        func run() async throws {
            try requireVoucherID(id)
            if global { return try await showGlobal(id, conn) }
            let r = try conn.regions()
            var out: [VoucherJSON] = []
            var leaseLists: [[LeaseRecord]] = []
            var nowMs: Int64 = 0
            for (name, url) in r.regions.sorted(by: { $0.key < $1.key }) {
                let s = try conn.store(url)
                let found = try await withRedis(url) { () async throws(RedisError) -> (VoucherRecord, [LeaseRecord], Int64)? in
                    guard let rec = try await s.voucher(id) else { return nil }
                    return (rec, try await s.leases(voucher: id), Int64(try await s.nowMs()))
                }
                guard let (rec, leases, now) = found else { continue }
                nowMs = now
                var j = VoucherJSON(rec, leases: leases)
                if j.region.isEmpty { j.region = name }
                out.append(j)
                leaseLists.append(leases)
            }
            guard !out.isEmpty else { throw ValidationError("no voucher '\(id)' (see: quotactl voucher list)") }
            if conn.json { return try emitJSON(out) }
            for (j, leases) in zip(out, leaseLists) {
                print("voucher \(j.id)  region \(j.region)  state \(j.state)")
                print("  limit \(j.limit) (total \(j.total_limit))  pool \(j.pool)  per-user \(j.per_user == 0 ? "none" : String(j.per_user))")
                print("  leased \(j.leased)  returned \(j.returned)  outstanding \(j.tokens_outstanding) in \(j.leases_outstanding) lease(s)")
                if let p = j.shard_pools {
                    print("  shards \(p.count): pools " + p.map(String.init).joined(separator: " "))
                }
                if j.start_ms > 0 || j.end_ms > 0 {
                    print("  sale: \(describeSchedule(startMs: j.start_ms, endMs: j.end_ms, nowMs: nowMs))")
                }
                if !j.lease_policy.isEmpty {
                    print("  lease policy: " + j.lease_policy.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " "))
                }
                for l in leases {
                    print("    lease \(l.id) host \(l.host) granted \(l.granted) returned \(l.returned) expires_ms \(l.expiresMs)")
                }
            }
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List vouchers of the home region.")
        @OptionGroup var conn: Connection

        func run() async throws {
            let r = try conn.regions()
            let url = r.regions[r.home]!
            let s = try conn.store(url)
            let recs = try await withRedis(url) { () async throws(RedisError) in
                try await s.vouchers(try await s.voucherIDs())
            }
            let rows = recs.compactMap { $0 }.map { VoucherJSON($0, leases: []) }
            if conn.json { return try emitJSON(rows) }
            if rows.isEmpty { print("no vouchers in region \(r.home)") }
            for j in rows { print("\(j.id)\t\(j.state)\tlimit \(j.limit)\tpool \(j.pool)") }
        }
    }

    struct Pause: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Stop claims (sidecars answer INACTIVE).")
        @Argument var id: String
        @OptionGroup var conn: Connection
        func run() async throws { try await setState(id, .paused, conn) }
    }

    struct Resume: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Allow claims again.")
        @Argument var id: String
        @OptionGroup var conn: Connection
        func run() async throws { try await setState(id, .active, conn) }
    }

    struct Close: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "End the voucher for good (sidecars return their stock).")
        @Argument var id: String
        @OptionGroup var conn: Connection
        func run() async throws { try await setState(id, .closed, conn) }
    }
}

func setState(_ id: String, _ s: VoucherStatus, _ conn: Connection) async throws {
    try requireVoucherID(id)
    let r = try conn.regions()
    var found = false
    var definitions: [(key: String, value: [UInt8])] = []
    let now = Int64(Date().timeIntervalSince1970 * 1000)
    for (name, url) in r.regions.sorted(by: { $0.key < $1.key }) {
        let store = try conn.store(url)
        if try await withRedis(url, { () async throws(RedisError) in try await store.setStatus(id, s) }) {
            found = true
            if let rec = try await withRedis(url, { () async throws(RedisError) in try await store.voucher(id) }) {
                definitions.append((id, VoucherDefinition(voucher: id, region: name, limit: rec.limit, totalLimit: rec.totalLimit,
                                                          perUser: rec.perUser, state: s.rawValue, generation: rec.generation,
                                                          tsMs: now).kafkaValue))
            }
        }
    }
    if let cfg = try conn.loadConfig(), let brokers = cfg.kafka.brokers {
        _ = try produceEvents(brokers: brokers, topic: cfg.kafka.topic, definitions)
    }
    guard found else { throw ValidationError("no voucher '\(id)' (see: quotactl voucher list)") }
    if conn.json { try emitJSON(["id": id, "state": s.rawValue]) } else { print("voucher \(id): \(s.rawValue)") }
}

struct LeaseCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "lease", abstract: "Lease policy (picked up by running sidecars within policy_refresh).",
        subcommands: [Set.self, Advise.self])

    struct Set: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Set a region's default lease policy, or one voucher's override (--voucher).")
        @Option(name: .long) var voucher: String?
        @Option(name: .long, help: "Region whose Redis holds the policy (default: the home region).") var region: String?
        @Option(name: .long) var min: Int?
        @Option(name: .long) var max: Int?
        @Option(name: .long) var targetSeconds: Double?
        @Option(name: .long, help: "Lease time to live, seconds (>= 1).") var ttl: Double?
        @Option(name: .long, help: "Opening lease per host before a scheduled sale opens, tokens.") var opening: Int?
        @OptionGroup var conn: Connection

        func run() async throws {
            if let voucher { try requireVoucherID(voucher) }
            if let min, min < 1 { throw ValidationError("--min must be >= 1") }
            if let max, max < 1 { throw ValidationError("--max must be >= 1") }
            if let min, let max, max < min { throw ValidationError("--max must be >= --min") }
            if let targetSeconds, !(targetSeconds >= 0.001 && targetSeconds <= 3600) {
                throw ValidationError("--target-seconds must be between 0.001 and 3600")
            }
            if let ttl, !(ttl >= 1 && ttl <= 3600) { throw ValidationError("--ttl must be between 1 and 3600 seconds") }
            if let opening, !(1...1_000_000_000).contains(opening) { throw ValidationError("--opening must be between 1 and 1000000000") }
            let p = LeasePolicyOverride(min: min, max: max, targetSeconds: targetSeconds, ttlSeconds: ttl, opening: opening)
            guard !p.isEmpty else {
                throw ValidationError("nothing to set: give --min, --max, --target-seconds, --ttl or --opening")
            }
            let r = try conn.regions()
            let name = region ?? r.home
            guard let url = r.regions[name] else { throw ValidationError("--region \(name): no Redis known for it") }
            let store = try conn.store(url)
            let voucher = self.voucher
            guard try await withRedis(url, { () async throws(RedisError) in try await store.setPolicy(p, voucher: voucher) })
            else {
                throw ValidationError("no voucher '\(voucher ?? "")' in region \(name)")
            }
            let what = voucher.map { "voucher \($0)" } ?? "region \(name) default"
            if conn.json {
                try emitJSON(["scope": what, "fields": QuotaStorePolicyText.describe(p)])
            } else {
                print("lease policy for \(what): \(QuotaStorePolicyText.describe(p))")
            }
        }
    }
}

enum QuotaStorePolicyText {
    static func describe(_ p: LeasePolicyOverride) -> String {
        var a: [String] = []
        if let v = p.min { a.append("min=\(v)") }
        if let v = p.max { a.append("max=\(v)") }
        if let v = p.targetSeconds { a.append("target_seconds=\(v)") }
        if let v = p.ttlSeconds { a.append("ttl=\(v)") }
        if let v = p.opening { a.append("opening=\(v)") }
        return a.joined(separator: " ")
    }
}

struct StatusCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "status", abstract: "The local quotad's INFO, readable.")
    @Option(name: .long, help: "quotad socket (default: socket.path of --config, else /run/quotad/quotad.sock).")
    var socket: String?
    @OptionGroup var conn: Connection

    func run() async throws {
        let path = try socket ?? conn.loadConfig()?.socket.path ?? "/run/quotad/quotad.sock"
        var logger = Logger(label: "quotactl")
        logger.logLevel = .error
        let c = HiredisConnection(endpoint: .unix(path: path), timeout: .milliseconds(conn.timeoutMs), logger: logger)
        defer { c.close() }
        let reply: RedisValue
        do {
            reply = try await c.send(["INFO", "all"])
        } catch {
            throw ValidationError("cannot reach quotad at \(path): \(error). Is it running? Use --socket PATH.")
        }
        guard let text = reply.string else { throw ValidationError("unexpected reply from quotad: \(reply)") }
        var sections: [String: [String: String]] = [:]
        var current = ""
        var order: [String] = []
        for raw in text.split(whereSeparator: \.isNewline) {
            let line = raw.trimmingCharacters(in: .whitespaces)
            if line.hasPrefix("# ") {
                current = String(line.dropFirst(2)).lowercased()
                order.append(current)
                continue
            }
            guard let colon = line.firstIndex(of: ":") else { continue }
            sections[current, default: [:]][String(line[..<colon])] = String(line[line.index(after: colon)...])
        }
        if conn.json { return try emitJSON(sections) }
        for s in order {
            print(s.capitalized)
            for (k, v) in (sections[s] ?? [:]).sorted(by: { $0.key < $1.key }) {
                print("  " + k.padding(toLength: 28, withPad: " ", startingAt: 0) + " " + v)
            }
        }
    }
}

/// One region of `voucher show ID --global`.
struct GlobalRegionJSON: Codable {
    var region: String
    var state: String
    /// The region's allocation now, and the one it was created with.
    var allocation: Int
    var allocated_at_creation: Int?
    var pool: Int
    /// Tokens in open leases (held by hosts, served or not).
    var leased: Int
    /// Tokens sold through closed leases.
    var sold: Int
    var transfers_in: Int
    var transfers_out: Int
    /// Tokens this region sent that the destination has not received yet.
    var in_flight_out: Int
    var transfers: [TransferRecord]
}

struct GlobalJSON: Codable {
    var id: String
    var limit: Int
    var allocations: Int
    var in_flight: Int
    var regions: [GlobalRegionJSON]
    var problems: [String]
}

/// `voucher show ID --global`: every region side by side.
func showGlobal(_ id: String, _ conn: Connection) async throws {
    let r = try conn.regions()
    var rows: [GlobalRegionJSON] = []
    var books: [(region: String, books: VoucherAudit)] = []
    for (name, url) in r.regions.sorted(by: { $0.key < $1.key }) {
        let s = try conn.store(url)
        let got = try await withRedis(url) { () async throws(RedisError) -> (VoucherRecord, [LeaseRecord], [TransferRecord])? in
            guard let rec = try await s.voucher(id) else { return nil }
            return (rec, try await s.leases(voucher: id), try await s.transfers(voucher: id))
        }
        guard let (rec, leases, transfers) = got else { continue }
        let b = VoucherAudit(record: rec, leases: leases, transfers: transfers)
        books.append((name, b))
        rows.append(GlobalRegionJSON(region: name, state: rec.status.rawValue, allocation: rec.limit, allocated_at_creation: rec.allocated,
                                     pool: rec.pool, leased: b.openOutstanding, sold: b.closedOutstanding, transfers_in: rec.received,
                                     transfers_out: rec.sent, in_flight_out: 0, transfers: transfers))
    }
    guard !rows.isEmpty else { throw ValidationError("no voucher '\(id)' (see: quotactl voucher list)") }
    var received: [String: Set<String>] = [:]
    for (name, b) in books { received[name] = Set((b.transfers ?? []).filter { !$0.outgoing }.map(\.id)) }
    for i in rows.indices { rows[i].in_flight_out = books[i].books.inFlight(received: received).reduce(0) { $0 + $1.amount } }
    let g = VoucherAudit.globalProblems(books)
    let out = GlobalJSON(id: id, limit: books.map(\.books.totalLimit).max() ?? 0, allocations: rows.reduce(0) { $0 + $1.allocation },
                         in_flight: g.inFlight, regions: rows, problems: g.problems + books.flatMap { $0.books.transferProblems() })
    if conn.json { return try emitJSON(out) }
    print("voucher \(id)  limit \(out.limit) = allocations \(out.allocations) + in flight \(out.in_flight)")
    let header = ["region", "state", "allocation", "pool", "leased", "sold", "in", "out", "in flight"]
    var table = [header]
    for row in rows {
        table.append([row.region, row.state, String(row.allocation), String(row.pool), String(row.leased), String(row.sold),
                      String(row.transfers_in), String(row.transfers_out), String(row.in_flight_out)])
    }
    let widths = header.indices.map { c in table.map { $0[c].count }.max() ?? 0 }
    for line in table {
        print("  " + line.enumerated().map { $0.element.padding(toLength: widths[$0.offset], withPad: " ", startingAt: 0) }
            .joined(separator: "  "))
    }
    for row in rows {
        for t in row.transfers where t.direction == .out && t.state == .taken {
            print("  transfer \(t.id): \(t.amount) from \(row.region) to \(t.peer) left taken (finish: quotactl rebalance \(id) --resume)")
        }
    }
    for p in out.problems { print("  IMBALANCE \(p)") }
}
