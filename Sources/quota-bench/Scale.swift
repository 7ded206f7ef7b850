import ArgumentParser
import Foundation
import QuotaHarness

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

    struct Step: Codable {
        var sidecars: Int
        var claimsPerSecond: Double
        var redisCPUSecondsPer1000Claims: Double
        var redisCommandsPer1000Claims: Double
        var strandedTokens: Int
        var booksBalance: Bool
    }

    func run() async throws {
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
