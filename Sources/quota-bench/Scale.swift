import ArgumentParser
import Foundation
import QuotaHarness
import QuotaRedis

/// N quotad against one redis-server: the hot-key argument in numbers.
struct Scale: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "N quotad sidecars against one redis-server: claims/s, Redis CPU and commands, stranded tokens.")

    @Option(name: .long, help: "Sidecar counts to run, comma separated.") var sidecars = "1,2,4,8"
    @Option(name: .long, help: "Seconds per step.") var duration: Double = 5
    @Option(name: .long) var connections = 64
    @Option(name: .long) var pipeline = 16
    @Flag(name: .long) var json = false
    @Flag(name: .long) var quiet = false
    @Flag(name: .long, help: "On a 3-master Redis Cluster: quotad with each --shards count, and a Lua script per claim; Redis CPU and commands per node.")
    var cluster = false
    @Option(name: .long, help: "With --cluster: shard counts to run, comma separated.") var shards = "1,3"

    struct Step: Codable {
        var sidecars: Int
        var claimsPerSecond: Double
        var redisCPUSecondsPer1000Claims: Double
        var redisCommandsPer1000Claims: Double
        var strandedTokens: Int
        var booksBalance: Bool
    }

    func run() async throws {
        if cluster { return try await runCluster() }
        let counts = sidecars.split(separator: ",").compactMap { Int($0.trimmingCharacters(in: .whitespaces)) }
        guard !counts.isEmpty, counts.allSatisfy({ $0 >= 1 && $0 <= 64 }) else {
            throw ValidationError("--sidecars takes counts from 1 to 64, e.g. 1,2,4,8")
        }
        var steps: [Step] = []
        for n in counts {
            let redis = try await RedisServer()
            let limit = 1_000_000_000
            var w = try Workload.parse([])
            w.limit = limit
            w.connections = max(connections, n)
            w.pipeline = pipeline
            w.duration = duration
            w.sidecars = n
            w.quiet = quiet
            let before = try await redisCounters(redis.store)
            let r = try await Designs.quotad(w, redis: redis, voucher: "scale")
            let after = try await redisCounters(redis.store)
            if !quiet { FileHandle.standardError.write(Data("\n".utf8)) }
            let a = try await redis.account("scale")
            let k = Double(max(1, r.sold)) / 1000
            steps.append(Step(
                sidecars: n, claimsPerSecond: r.claimsPerSecond,
                redisCPUSecondsPer1000Claims: (after.cpu - before.cpu) / k,
                redisCommandsPer1000Claims: Double(after.commands - before.commands) / k,
                strandedTokens: a.outstanding, booksBalance: a.pool + r.soldInStore + a.outstanding == limit))
        }
        if json { return try printJSON(steps) }
        print("| quotad sidecars | claims/s (all) | Redis CPU s per 1,000 claims | Redis commands per 1,000 claims | stranded tokens after shutdown | pool + sold == limit |")
        print("|---:|---:|---:|---:|---:|---|")
        for s in steps {
            print(String(format: "| %d | %.0f | %.5f | %.2f | %d | %@ |", s.sidecars, s.claimsPerSecond,
                         s.redisCPUSecondsPer1000Claims, s.redisCommandsPer1000Claims, s.strandedTokens,
                         s.booksBalance ? "yes" : "NO"))
        }
    }
}

/// redis-server's counters of one cluster node: top-level commands and CPU seconds.
private func nodeCounters(_ cluster: RedisClusterServer, _ port: Int) async throws -> (commands: Int, cpu: Double) {
    redisCounters(info: try await cluster.command(port, "INFO", "all").string ?? "")
}

extension Scale {
    struct NodeStep: Codable {
        var design: String
        var claimsPerSecond: Double
        /// Per master (in port order): redis-server CPU ms and commands per 1,000 claims.
        var cpuMsPer1000Claims: [Double]
        var commandsPer1000Claims: [Double]
        var oversold: Int
    }

    /// quotad on a 3-master cluster with 1 and K shards, and a Lua script per claim on one hot key there:
    /// how the Redis work per claim spreads over the nodes.
    func runCluster() async throws {
        let shardCounts = shards.split(separator: ",").compactMap { Int($0.trimmingCharacters(in: .whitespaces)) }
        guard !shardCounts.isEmpty, shardCounts.allSatisfy({ (1...64).contains($0) }) else {
            throw ValidationError("--shards takes counts from 1 to 64, e.g. 1,3")
        }
        // One sidecar count here (default 3: one homed on each shard of a 3-shard voucher, most likely).
        let n = sidecars == "1,2,4,8" ? 3 : Int(sidecars.split(separator: ",").first.flatMap { Int($0) } ?? 3)
        guard (1...64).contains(n) else { throw ValidationError("--sidecars: with --cluster, one count from 1 to 64") }
        let c = try await RedisClusterServer(masters: 3)
        let masters = try await c.masterPorts()
        var steps: [NodeStep] = []
        let limit = 1_000_000_000
        for k in shardCounts {
            let id = "scale-\(k)"
            _ = try await c.store.createVoucher(id: id, limit: limit, perUser: 0, totalLimit: limit, region: "sg", shards: k)
            let dir = TempDir()
            var qs: [Quotad] = []
            for i in 0..<n {
                qs.append(try await Quotad(redisURL: c.url, dir: dir, host: "scale-\(k)-\(i)", durability: "none",
                                           extraYAML: "log_level: warning\n"))
            }
            let before = try await countersOf(c, masters)
            let progress = Progress()
            let shown = quiet ? nil : Progress.show(progress, label: "quotad \(k) shards", of: connections)
            let r = try await runRESP(
                sockets: qs.map(\.socket), connections: max(connections, n), pipeline: pipeline, users: 1_000_000,
                uniqueUsers: false, duration: duration, progress: progress,
                command: { ["CLAIM", id, $0] }, classify: classifyQuotad)
            shown?.cancel()
            _ = await shown?.value
            let after = try await countersOf(c, masters)
            steps.append(step("quotad, \(k) shard\(k == 1 ? "" : "s"), \(n) sidecars", r, before, after, oversold: 0))
            for q in qs { _ = try await q.stop() }
            let a = try await c.account(id)
            if a.leases != 0 { FileHandle.standardError.write(Data("warning: \(a.leases) leases open after shutdown\n".utf8)) }
        }
        // A Lua script per claim: the voucher's stock is one key, so one master does all the work.
        let stock = "lua:{bench}:stock"
        let owner = try await c.masterPort(ofSlot: ClusterSlot.of(stock))
        guard let sock = c.socketPath(owner) else { throw ValidationError("no socket for node \(owner)") }
        _ = try await c.command(owner, "SET", stock, String(limit))
        let sha = try await c.command(owner, "SCRIPT", "LOAD", Designs.luaClaim).string ?? ""
        let before = try await countersOf(c, masters)
        let progress = Progress()
        let shown = quiet ? nil : Progress.show(progress, label: "redis-lua", of: connections)
        let r = try await runRESP(
            sockets: [sock], connections: connections, pipeline: pipeline, users: 1_000_000, uniqueUsers: false,
            duration: duration, progress: progress,
            command: { ["EVALSHA", sha, "2", stock, "lua:{bench}:users", $0, "0"] },
            classify: { v in
                switch v {
                case .integer(1): return .ok(id: nil)
                case .integer(0): return .soldOut
                default: return .refused(v.errorCode ?? "BADREPLY")
                }
            })
        shown?.cancel()
        _ = await shown?.value
        let after = try await countersOf(c, masters)
        let left = try await c.command(owner, "GET", stock).int ?? 0
        steps.append(step("Lua script per claim (one hot key)", r, before, after, oversold: max(0, r.ok - (limit - left))))
        if json { return try printJSON(steps) }
        let names = masters.map { "node \($0)" }
        print("| design | claims/s | " + names.map { "\($0) CPU ms / 1,000 claims" }.joined(separator: " | ")
              + " | " + names.map { "\($0) commands / 1,000 claims" }.joined(separator: " | ") + " |")
        print("|---|---:|" + String(repeating: "---:|", count: 2 * masters.count))
        for s in steps {
            print("| \(s.design) | \(String(format: "%.0f", s.claimsPerSecond)) | "
                  + s.cpuMsPer1000Claims.map { String(format: "%.3f", $0) }.joined(separator: " | ") + " | "
                  + s.commandsPer1000Claims.map { String(format: "%.2f", $0) }.joined(separator: " | ") + " |")
        }
    }
}

private func countersOf(_ c: RedisClusterServer, _ masters: [Int]) async throws -> [(commands: Int, cpu: Double)] {
    var out: [(commands: Int, cpu: Double)] = []
    for m in masters { out.append(try await nodeCounters(c, m)) }
    return out
}

private func step(_ design: String, _ r: LoadResult, _ before: [(commands: Int, cpu: Double)],
                  _ after: [(commands: Int, cpu: Double)], oversold: Int) -> Scale.NodeStep {
    let k = Double(max(1, r.ok)) / 1000
    return Scale.NodeStep(
        design: design, claimsPerSecond: r.claimsPerSecond,
        cpuMsPer1000Claims: zip(after, before).map { ($0.cpu - $1.cpu) * 1000 / k },
        commandsPer1000Claims: zip(after, before).map { Double($0.commands - $1.commands) / k }, oversold: oversold)
}
