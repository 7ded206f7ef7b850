import ArgumentParser
import Foundation
import Histogram
import QuotaHarness
import QuotaPostgres
import QuotaRESP
import QuotaRedis

/// The workload shared by every design.
struct Workload: ParsableArguments {
    @Option(name: .long, help: "Voucher limit (tokens).") var limit = 300_000
    @Option(name: .long, help: "Distinct users.") var users = 1_000_000
    @Option(name: .long, help: "Per-user limit (0 = none).") var perUser = 0
    @Option(name: .long, help: "Concurrent connections (PostgreSQL: worker threads).") var connections = 50
    @Option(name: .long, help: "Commands per pipelined batch (RESP designs).") var pipeline = 16
    @Option(name: .long, help: "Longest run per design, seconds (a design stops earlier when sold out).")
    var duration: Double = 30
    @Option(name: .long, help: "quotad sidecars sharing the load.") var sidecars = 1
    @Flag(name: .long, help: "No progress line.") var quiet = false
}

/// One design's row of the table.
struct DesignResult: Codable, Sendable {
    var design: String
    var claimsPerSecond: Double
    var p50us: UInt64
    var p99us: UInt64
    var p999us: UInt64
    var redisCommandsPerClaim: Double
    /// redis-server CPU time per 1,000 successful claims, milliseconds.
    var redisCPUmsPer1000Claims: Double
    /// Successful claims as the clients saw them.
    var sold: Int
    /// Claims as the store records them after the run.
    var soldInStore: Int
    var limit: Int
    var oversell: Int
    /// The largest number of claims one user holds in the store (per-user limit check).
    var maxPerUser: Int
    var seconds: Double
    var errors: [String: Int]
}

/// redis-server's counters: top-level commands processed and CPU seconds.
func redisCounters(_ store: QuotaStore) async throws -> (commands: Int, cpu: Double) {
    redisCounters(info: try await store.connection.send(["INFO", "all"]).string ?? "")
}

/// The same counters from an `INFO all` reply's text.
func redisCounters(info: String) -> (commands: Int, cpu: Double) {
    var commands = 0
    var cpu = 0.0
    for line in info.split(whereSeparator: \.isNewline) {
        let kv = line.split(separator: ":", maxSplits: 1).map(String.init)
        guard kv.count == 2 else { continue }
        if kv[0] == "total_commands_processed" { commands = Int(kv[1]) ?? 0 }
        if kv[0] == "used_cpu_sys" || kv[0] == "used_cpu_user" { cpu += Double(kv[1].trimmingCharacters(in: .whitespaces)) ?? 0 }
    }
    return (commands, cpu)
}

enum Designs {
    /// quotad: `sidecars` processes leasing from one redis-server.
    static func quotad(_ w: Workload, redis: RedisServer, voucher: String = "bench-quotad") async throws -> DesignResult {
        _ = try await redis.store.createVoucher(id: voucher, limit: w.limit, perUser: w.perUser, totalLimit: w.limit, region: "sg")
        let dir = TempDir()
        var sidecars: [Quotad] = []
        for i in 0..<w.sidecars {
            sidecars.append(try await Quotad(redis: redis, dir: dir, host: "bench-\(i)", extraYAML: "log_level: warning\n"))
        }
        let before = try await redisCounters(redis.store)
        let progress = Progress()
        let shown = w.quiet ? nil : Progress.show(progress, label: "quotad", of: w.connections)
        let r = try await runRESP(
            sockets: sidecars.map(\.socket), connections: w.connections, pipeline: w.pipeline, users: w.users,
            uniqueUsers: false, duration: w.duration, progress: progress,
            command: { ["CLAIM", voucher, $0] }, classify: classifyQuotad)
        shown?.cancel()
        _ = await shown?.value
        let after = try await redisCounters(redis.store)
        for s in sidecars { _ = try await s.stop() }
        let a = try await redis.account(voucher)
        var maxPerUser = 0
        if w.perUser > 0 {
            // quotad's default per_user.groups (the sidecars run with the default). Counts only: claim
            // markers live in their own keys (`…:m`), so every field here is a user.
            for g in 0..<64 {
                let key = QuotaStore.userGroupKey(voucher: voucher, group: g)
                for (_, v) in QuotaStore.fields(try await redis.store.connection.send(["HGETALL", key])) {
                    maxPerUser = max(maxPerUser, Int(v) ?? 0)
                }
            }
        }
        let inStore = a.leased - a.returned - a.outstanding
        return row("quotad", r, w, commands: after.commands - before.commands, cpu: after.cpu - before.cpu, inStore: inStore,
                   maxPerUser: maxPerUser)
    }

    static let luaClaim = """
        local per = tonumber(ARGV[2])
        if per > 0 then
          local n = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
          if n >= per then return -1 end
        end
        local s = tonumber(redis.call('GET', KEYS[1]) or '0')
        if s <= 0 then return 0 end
        redis.call('DECR', KEYS[1])
        redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
        return 1
        """

    /// A Lua script per claim on one hot key (the per-user check and the stock in one voucher slot).
    static func redisLua(_ w: Workload, redis: RedisServer) async throws -> DesignResult {
        let stock = "lua:{bench}:stock"
        let usersKey = "lua:{bench}:users"
        _ = try await redis.store.connection.send(["SET", stock, String(w.limit)])
        let sha = try await redis.store.connection.send(["SCRIPT", "LOAD", luaClaim]).string ?? ""
        let before = try await redisCounters(redis.store)
        let progress = Progress()
        let shown = w.quiet ? nil : Progress.show(progress, label: "redis-lua", of: w.connections)
        let per = String(w.perUser)
        let r = try await runRESP(
            sockets: [redis.socket], connections: w.connections, pipeline: w.pipeline, users: w.users,
            uniqueUsers: false, duration: w.duration, progress: progress,
            command: { ["EVALSHA", sha, "2", stock, usersKey, $0, per] },
            classify: { v in
                switch v {
                case .integer(1): return .ok(id: nil)
                case .integer(0): return .soldOut
                case .integer(-1): return .refused("USERLIMIT")
                default: return .refused(v.errorCode ?? "BADREPLY")
                }
            })
        shown?.cancel()
        _ = await shown?.value
        let after = try await redisCounters(redis.store)
        let left = try await redis.store.connection.send(["GET", stock]).int ?? 0
        let counts = (try await redis.store.connection.send(["HVALS", usersKey]).array ?? []).compactMap(\.int)
        // Tokens taken from the stock key, or counted to users if that is more (a disagreement shows as oversell).
        let inStore = max(w.limit - left, counts.reduce(0, +))
        return row("redis-lua", r, w, commands: after.commands - before.commands, cpu: after.cpu - before.cpu, inStore: inStore,
                   maxPerUser: counts.max() ?? 0)
    }

    /// A database transaction per claim: lock the voucher row, check, update, insert, commit.
    static func postgres(_ w: Workload, pg: PostgresServer) async throws -> DesignResult {
        let admin = try PGConnection(pg.conninfo)
        try admin.query("DROP TABLE IF EXISTS user_voucher; DROP TABLE IF EXISTS vouchers")
        try admin.query("CREATE TABLE vouchers (id text PRIMARY KEY, limit_ int NOT NULL, claimed int NOT NULL DEFAULT 0)")
        try admin.query("""
            CREATE TABLE user_voucher (claim_id bigserial PRIMARY KEY, voucher text NOT NULL, user_id text NOT NULL,
                                       created timestamptz NOT NULL DEFAULT now())
            """)
        try admin.query("CREATE INDEX ON user_voucher (voucher, user_id)")
        try admin.query("INSERT INTO vouchers (id, limit_) VALUES ('bench', $1)", [String(w.limit)])
        let progress = Progress()
        let shown = w.quiet ? nil : Progress.show(progress, label: "postgres", of: w.connections)
        let start = ContinuousClock.now
        let stopAt = start + .milliseconds(Int64(w.duration * 1000))
        let conninfo = pg.conninfo
        let per = w.perUser
        var total = try await withThrowingTaskGroup(of: LoadResult.self) { g in
            for i in 0..<w.connections {
                g.addTask {
                    try await runOnThread {
                        var r = LoadResult()
                        defer { progress.finished() }
                        let c = try PGConnection(conninfo)
                        var users = UserPicker(seed: i + 1, users: w.users, unique: false)
                        while ContinuousClock.now < stopAt {
                            let user = users.next()
                            let t0 = ContinuousClock.now
                            let outcome = try claimTransaction(c, user: user, perUser: per)
                            _ = r.latency.record(UInt64(max(1, secs(ContinuousClock.now - t0) * 1e6)))
                            switch outcome {
                            case .ok:
                                r.ok += 1
                                progress.add(1)
                            case .soldOut:
                                r.errors["SOLDOUT", default: 0] += 1
                                return r
                            case .refused(let code):
                                r.errors[code, default: 0] += 1
                            }
                        }
                        return r
                    }
                }
            }
            var total = LoadResult()
            for try await r in g { total.merge(r) }
            return total
        }
        total.seconds = secs(ContinuousClock.now - start)
        shown?.cancel()
        _ = await shown?.value
        let claimed = Int(try admin.query("SELECT claimed FROM vouchers WHERE id = 'bench'")[0][0] ?? "0") ?? 0
        let rows = Int(try admin.query("SELECT count(*) FROM user_voucher")[0][0] ?? "0") ?? 0
        let inStoreRows = max(claimed, rows)  // a disagreement shows as oversell
        let maxPer = Int(try admin.query("SELECT coalesce(max(n), 0) FROM (SELECT count(*) n FROM user_voucher GROUP BY user_id) t")[0][0] ?? "0") ?? 0
        return row("postgres", total, w, commands: 0, cpu: 0, inStore: inStoreRows, maxPerUser: maxPer)
    }

    /// `BEGIN; SELECT … FOR UPDATE; [per-user count]; UPDATE … claimed+1 WHERE claimed < limit; INSERT …; COMMIT`.
    static func claimTransaction(_ c: PGConnection, user: String, perUser: Int) throws -> ClaimOutcome {
        try c.query("BEGIN")
        let v = try c.query("SELECT limit_, claimed FROM vouchers WHERE id = 'bench' FOR UPDATE")
        guard let lim = Int(v[0][0] ?? ""), let claimed = Int(v[0][1] ?? ""), claimed < lim else {
            try c.query("ROLLBACK")
            return .soldOut
        }
        if perUser > 0 {
            let n = Int(try c.query("SELECT count(*) FROM user_voucher WHERE voucher = 'bench' AND user_id = $1", [user])[0][0] ?? "0") ?? 0
            if n >= perUser {
                try c.query("ROLLBACK")
                return .refused("USERLIMIT")
            }
        }
        guard try c.execCount("UPDATE vouchers SET claimed = claimed + 1 WHERE id = $1 AND claimed < limit_", ["bench"]) == 1 else {
            try c.query("ROLLBACK")
            return .soldOut
        }
        try c.query("INSERT INTO user_voucher (voucher, user_id) VALUES ('bench', $1)", [user])
        try c.query("COMMIT")
        return .ok(id: nil)
    }

    static func row(_ name: String, _ r: LoadResult, _ w: Workload, commands: Int, cpu: Double, inStore: Int,
                    maxPerUser: Int) -> DesignResult
    {
        DesignResult(
            design: name, claimsPerSecond: r.claimsPerSecond, p50us: r.percentile(50), p99us: r.percentile(99),
            p999us: r.percentile(99.9), redisCommandsPerClaim: r.ok > 0 ? Double(commands) / Double(r.ok) : 0,
            redisCPUmsPer1000Claims: r.ok > 0 ? cpu * 1000 / (Double(r.ok) / 1000) : 0,
            sold: r.ok, soldInStore: inStore, limit: w.limit, oversell: max(0, max(r.ok, inStore) - w.limit),
            maxPerUser: maxPerUser, seconds: r.seconds, errors: r.errors)
    }
}

/// Run blocking work (libpq) on its own thread, not on the concurrency pool.
func runOnThread<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { c in
        let t = Thread { c.resume(with: Result { try body() }) }
        t.stackSize = 1 << 20
        t.start()
    }
}

struct Compare: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "quotad against the designs it replaces (a DB transaction per claim, a Redis Lua script per claim), side by side.",
        discussion: "Starts a private redis-server and PostgreSQL (and the quotad sidecars) and stops them.")

    @OptionGroup var workload: Workload
    @Option(name: .long, parsing: .singleValue, help: "Designs to run: quotad, redis-lua, postgres (repeatable).")
    var design: [String] = ["quotad", "redis-lua", "postgres"]
    @Option(name: .long, help: "Write an SVG chart of throughput and latency here.") var chart: String?
    @Flag(name: .long, help: "Print the results as JSON.") var json = false

    func run() async throws {
        for d in design where !["quotad", "redis-lua", "postgres"].contains(d) {
            throw ValidationError("--design \(d): must be quotad, redis-lua or postgres")
        }
        let redis = try await RedisServer()
        var results: [DesignResult] = []
        if design.contains("quotad") { results.append(try await Designs.quotad(workload, redis: redis)); done() }
        if design.contains("redis-lua") { results.append(try await Designs.redisLua(workload, redis: redis)); done() }
        if design.contains("postgres") {
            let pg = try await PostgresServer()
            results.append(try await Designs.postgres(workload, pg: pg))
            done()
            try await pg.stop()
        }
        if let chart { try Chart.svg(results, workload: workload).write(toFile: chart, atomically: true, encoding: .utf8) }
        if json {
            try printJSON(results)
        } else {
            print(Table.markdown(results, workload: workload))
        }
        if results.contains(where: { $0.oversell > 0 || ($0.sold != $0.soldInStore) }) { throw ExitCode(2) }
    }

    func done() { if !workload.quiet { FileHandle.standardError.write(Data("\n".utf8)) } }
}

enum Table {
    static func ms(_ us: UInt64) -> String { us >= 1000 ? String(format: "%.1f ms", Double(us) / 1000) : "\(us) µs" }

    static func markdown(_ rs: [DesignResult], workload w: Workload) -> String {
        var s = "workload: limit \(w.limit), \(w.users) users, per-user \(w.perUser == 0 ? "none" : String(w.perUser)), "
        s += "\(w.connections) connections, pipeline \(w.pipeline) (RESP designs), \(w.sidecars) quotad, "
        s += "at most \(Int(w.duration)) s per design\n"
        s += "machine: \(ProcessInfo.processInfo.activeProcessorCount) cores, \(ProcessInfo.processInfo.physicalMemory >> 30) GiB, "
        s += "\(ProcessInfo.processInfo.operatingSystemVersionString); everything (servers and load) on this machine\n\n"
        s += "| design | claims/s | p50 | p99 | p999 | Redis commands per claim | Redis CPU ms per 1,000 claims | sold (clients) | sold (store) | limit | oversell | max per user |\n"
        s += "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        for r in rs {
            s += "| \(r.design) | \(Int(r.claimsPerSecond)) | \(ms(r.p50us)) | \(ms(r.p99us)) | \(ms(r.p999us)) | "
            s += String(format: "%.4f | %.2f", r.redisCommandsPerClaim, r.redisCPUmsPer1000Claims)
            s += " | \(r.sold) | \(r.soldInStore) | \(r.limit) | \(r.oversell) | \(r.maxPerUser) |\n"
        }
        s += "\nRedis commands: INFO total_commands_processed (commands run by Lua scripts included) per successful claim.\n"
        if let q = rs.first(where: { $0.design == "quotad" }) {
            s += "\n"
            for b in rs where b.design != "quotad" && b.claimsPerSecond > 0 {
                s += String(format: "quotad / %@: %.1fx claims/s, p99 %.2fx\n", b.design as NSString,
                            q.claimsPerSecond / b.claimsPerSecond, Double(q.p99us) / Double(max(1, b.p99us)))
            }
        }
        return s
    }
}

enum Chart {
    /// Two panels of horizontal bars: claims/s and p99 latency per design.
    static func svg(_ rs: [DesignResult], workload w: Workload) -> String {
        let width = 760.0
        let rowH = 34.0
        let panelH = Double(rs.count) * rowH + 40
        let height = panelH * 3 + 60
        let colors = ["quotad": "#2b8a3e", "redis-lua": "#c92a2a", "postgres": "#1864ab"]
        var s = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(Int(width))\" height=\"\(Int(height))\" font-family=\"sans-serif\" font-size=\"13\">\n"
        s += "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
        s += "<text x=\"10\" y=\"22\" font-size=\"15\" font-weight=\"bold\">quota-bench: limit \(w.limit), \(w.connections) connections, pipeline \(w.pipeline), per-user \(w.perUser == 0 ? "none" : String(w.perUser))</text>\n"
        func panel(_ title: String, _ y0: Double, _ value: (DesignResult) -> Double, _ label: (DesignResult) -> String) {
            s += "<text x=\"10\" y=\"\(Int(y0 + 20))\" font-weight=\"bold\">\(title)</text>\n"
            let maxV = rs.map(value).max() ?? 1
            for (i, r) in rs.enumerated() {
                let y = y0 + 30 + Double(i) * rowH
                let len = maxV > 0 ? (width - 260) * value(r) / maxV : 0
                s += "<text x=\"10\" y=\"\(Int(y + 18))\">\(r.design)</text>\n"
                s += "<rect x=\"110\" y=\"\(Int(y + 4))\" width=\"\(Int(max(1, len)))\" height=\"\(Int(rowH - 10))\" fill=\"\(colors[r.design] ?? "#555")\"/>\n"
                s += "<text x=\"\(Int(118 + len))\" y=\"\(Int(y + 18))\">\(label(r))</text>\n"
            }
        }
        panel("throughput (claims/s, higher is better)", 30, { $0.claimsPerSecond }, { "\(Int($0.claimsPerSecond))/s" })
        panel("p99 claim latency (lower is better)", 30 + panelH, { Double($0.p99us) }, { Table.ms($0.p99us) })
        panel("redis-server CPU per 1,000 claims (lower is better; postgres: no Redis)", 30 + 2 * panelH,
              { $0.redisCPUmsPer1000Claims }, { String(format: "%.2f ms", $0.redisCPUmsPer1000Claims) })
        s += "</svg>\n"
        return s
    }
}
