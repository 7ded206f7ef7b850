import ArgumentParser
import Foundation
import Histogram
import NIOCore
import NIOPosix
import QuotaChaos
import QuotaClient
import QuotaHarness
import QuotaRESP
import QuotaRedis
import Synchronization

// The two ends of a flash sale, measured against real servers: `quota-bench tail` (is every token sold
// before anyone is told SOLDOUT?) and `quota-bench opening` (how fast are the first claims of a
// scheduled sale, against a Redis Lua script per claim?).

/// One claim attempt as its client saw it (seconds since the run's start).
struct Attempt: Sendable {
    enum Outcome: String, Sendable { case ok, soldOut = "SOLDOUT", unavailable = "UNAVAILABLE", userLimit = "USERLIMIT",
                                      inactive = "INACTIVE", other = "OTHER" }
    var sent: Double
    var received: Double
    var outcome: Outcome
}

func attemptOutcome(_ v: RESPValue?) -> Attempt.Outcome {
    guard let v else { return .other }
    if let code = v.errorCode { return Attempt.Outcome(rawValue: code) ?? .other }
    if case .bulkString(.some) = v { return .ok }
    return .other
}

/// Hands out work items to many connections.
final class WorkQueue: Sendable {
    private let next = Atomic<Int>(0)
    let count: Int
    init(count: Int) { self.count = count }
    func take() -> Int? {
        let i = next.wrappingAdd(1, ordering: .relaxed).oldValue
        return i < count ? i : nil
    }
}

func median(_ xs: [Double]) -> Double {
    guard !xs.isEmpty else { return 0 }
    let s = xs.sorted()
    return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
}

// MARK: - The end

struct Tail: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "The end of a sale: demand over stock spread over sidecars; is every token sold, and is anyone told SOLDOUT while tokens are left?")

    @Option(name: .long, help: "Sidecars (each with its own clients).") var sidecars = 3
    @Option(name: .long, help: "Voucher limit.") var limit = 2000
    @Option(name: .long, help: "Per-user limit (0: none).") var perUser = 3
    @Option(name: .long, help: "Distinct users.") var users = 1000
    @Option(name: .long, help: "Claim attempts per user, spread over the sidecars.") var attempts = 5
    @Option(name: .long, help: "Client connections in all.") var connections = 60
    @Option(name: .long, help: "Rounds (each on fresh servers).") var rounds = 5
    @Option(name: .long, help: "quotad durability: none | journal.") var durability = "journal"
    @Option(name: .long, help: "limits.tail_wait_ms of the sidecars.") var tailWaitMs = 1000
    @Option(name: .long, help: "Random seed of the attempts' order.") var seed = 1
    @Flag(name: .long, help: "Print the result as JSON.") var json = false

    struct Round: Codable {
        var sold: Int
        var soldInRedis: Int
        var limit: Int
        var attempts: Int
        var soldOutReplies: Int
        /// SOLDOUT replies received before a claim that was later granted had been sent.
        var soldOutWhileTokensLeft: Int
        var unavailable: Int
        var userLimit: Int
        /// From the first SOLDOUT reply to the last granted claim's reply (negative: SOLDOUT came after).
        var firstSoldOutToExhaustionMs: Double
        var seconds: Double
        var tokensLeftInRedis: Int
        var recallsReceived: Int
    }

    struct Summary: Codable {
        var sidecars: Int
        var limit: Int
        var perUser: Int
        var users: Int
        var attempts: Int
        var connections: Int
        var rounds: [Round]
        var everyRoundExact: Bool
        var soldOutWhileTokensLeftTotal: Int
        var medianFirstSoldOutToExhaustionMs: Double
    }

    func validate() throws {
        guard sidecars >= 1, limit >= 1, users >= 1, attempts >= 1, connections >= 1, rounds >= 1 else {
            throw ValidationError("--sidecars, --limit, --users, --attempts, --connections and --rounds must be >= 1")
        }
        guard ["none", "journal"].contains(durability) else { throw ValidationError("--durability: none or journal") }
    }

    func run() async throws {
        var out: [Round] = []
        for round in 1...rounds {
            let r = try await runRound(round)
            out.append(r)
            let line = "round \(round): sold \(r.sold) of \(r.limit) (Redis: \(r.soldInRedis), left \(r.tokensLeftInRedis)); "
                + "\(r.soldOutReplies) SOLDOUT, \(r.soldOutWhileTokensLeft) of them while tokens were left; "
                + "\(r.unavailable) UNAVAILABLE; first SOLDOUT → exhaustion \(String(format: "%.1f", r.firstSoldOutToExhaustionMs)) ms"
            FileHandle.standardError.write(Data((line + "\n").utf8))
        }
        let s = Summary(
            sidecars: sidecars, limit: limit, perUser: perUser, users: users, attempts: attempts, connections: connections,
            rounds: out, everyRoundExact: out.allSatisfy { $0.sold == $0.limit && $0.soldInRedis == $0.limit },
            soldOutWhileTokensLeftTotal: out.reduce(0) { $0 + $1.soldOutWhileTokensLeft },
            medianFirstSoldOutToExhaustionMs: median(out.map(\.firstSoldOutToExhaustionMs)))
        if json { return try emitBenchJSON(s) }
        print("| rounds | sidecars | limit | sold (each round) | SOLDOUT while tokens left | UNAVAILABLE (median) | first SOLDOUT → exhaustion (median) |")
        print("|---:|---:|---:|---|---:|---:|---:|")
        print("| \(rounds) | \(sidecars) | \(limit) | \(out.map { String($0.sold) }.joined(separator: ", ")) | "
            + "\(s.soldOutWhileTokensLeftTotal) | \(Int(median(out.map { Double($0.unavailable) }))) | "
            + "\(String(format: "%.1f", s.medianFirstSoldOutToExhaustionMs)) ms |")
        if !s.everyRoundExact { throw ExitCode(1) }
    }

    private func runRound(_ round: Int) async throws -> Round {
        let redis = try await RedisServer()
        let dir = TempDir()
        let voucher = "tail-\(round)"
        _ = try await redis.store.createVoucher(id: voucher, limit: limit, perUser: perUser, totalLimit: limit, region: "sg")
        var hosts: [Quotad] = []
        for i in 0..<sidecars {
            hosts.append(try await Quotad(redis: redis, dir: dir, host: "tail-\(i)",
                                          extraYAML: "log_level: warning\n"
                                            + (tailWaitMs == 1000 ? "" : "limits: { tail_wait_ms: \(tailWaitMs) }\n"),
                                          durability: durability))
        }
        // Every (user, attempt), in a seeded random order.
        var items: [(user: Int, attempt: Int)] = []
        for u in 0..<users { for a in 0..<attempts { items.append((u, a)) } }
        var rng = SplitMix(UInt64(seed * 1000 + round))
        items.shuffle(using: &rng)
        let work = WorkQueue(count: items.count)
        let start = ContinuousClock.now
        let allItems = items
        let sockets = hosts.map(\.socket)
        let n = sidecars
        let results = try await withThrowingTaskGroup(of: [Attempt].self) { g in
            for c in 0..<connections {
                g.addTask {
                    let client = try await RESPClient.connect(sockets[c % n])
                    defer { client.close() }
                    var mine: [Attempt] = []
                    while let i = work.take() {
                        let it = allItems[i]
                        let sent = secs(ContinuousClock.now - start)
                        let v = try? await client.send("CLAIM", voucher, "user-\(it.user)", "REQ", "r\(round)-\(i)")
                        mine.append(Attempt(sent: sent, received: secs(ContinuousClock.now - start), outcome: attemptOutcome(v)))
                    }
                    return mine
                }
            }
            var all: [Attempt] = []
            for try await r in g { all += r }
            return all
        }
        let seconds = secs(ContinuousClock.now - start)
        var recalls = 0
        for h in hosts { recalls += max(0, (try? await h.stat("recalls_received")) ?? 0) }
        for h in hosts { _ = try await h.stop() }
        let a = try await redis.account(voucher)
        let ok = results.filter { $0.outcome == .ok }
        let soldOut = results.filter { $0.outcome == .soldOut }
        let lastOKSent = ok.map(\.sent).max() ?? 0
        let lastOKReceived = ok.map(\.received).max() ?? 0
        let firstSoldOut = soldOut.map(\.received).min()
        return Round(
            sold: ok.count, soldInRedis: a.leased - a.returned - a.restocked, limit: limit, attempts: results.count,
            soldOutReplies: soldOut.count, soldOutWhileTokensLeft: soldOut.filter { $0.received < lastOKSent }.count,
            unavailable: results.filter { $0.outcome == .unavailable }.count,
            userLimit: results.filter { $0.outcome == .userLimit }.count,
            firstSoldOutToExhaustionMs: firstSoldOut.map { (lastOKReceived - $0) * 1000 } ?? 0, seconds: seconds,
            tokensLeftInRedis: a.pool, recallsReceived: recalls)
    }
}

// MARK: - The opening

struct Opening: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "A scheduled sale opening with every connection already waiting: quotad (opening leases) against a Redis Lua script per claim, side by side.")

    @Option(name: .long, help: "Voucher limit.") var limit = 20_000
    @Option(name: .long, help: "Connections waiting at the opening.") var connections = 300
    @Option(name: .long, help: "Commands in flight per connection.") var pipeline = 1
    @Option(name: .long, help: "quotad sidecars (connections are spread over them).") var sidecars = 1
    @Option(name: .long, help: "quotad durability: none | journal.") var durability = "journal"
    @Option(name: .long, help: "Rounds per design (alternating); medians are reported.") var rounds = 3
    @Option(name: .long, help: "Seconds from creating the sale to its opening.") var lead: Double = 3
    @Option(name: .long, help: "Designs to run: quotad, quotad-cold (no opening lease), redis-lua.")
    var designs = "quotad,quotad-cold,redis-lua"
    @Flag(name: .long, help: "Print the result as JSON.") var json = false

    struct Run: Codable {
        var design: String
        var sold: Int
        var p50First100msUs: Double
        var p99First100msUs: Double
        var claimsFirst100ms: Int
        var p50FirstSecondUs: Double
        var p99FirstSecondUs: Double
        var claimsFirstSecond: Int
        var redisCommandsPerClaim: Double
        var saleSeconds: Double
        var inactive: Int
        var oversell: Int
    }

    struct Summary: Codable {
        var limit: Int
        var connections: Int
        var pipeline: Int
        var sidecars: Int
        var durability: String
        var rounds: Int
        var runs: [Run]
        var medians: [Run]
    }

    static let luaClaim = """
        local t = redis.call('TIME')
        local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
        if now < tonumber(ARGV[1]) then return -2 end
        local s = tonumber(redis.call('GET', KEYS[1]) or '0')
        if s <= 0 then return 0 end
        redis.call('DECR', KEYS[1])
        return 1
        """

    func validate() throws {
        guard limit >= 1, connections >= 1, pipeline >= 1, sidecars >= 1, rounds >= 1, lead >= 1 else {
            throw ValidationError("--limit, --connections, --pipeline, --sidecars, --rounds must be >= 1, --lead >= 1 s")
        }
        guard ["none", "journal"].contains(durability) else { throw ValidationError("--durability: none or journal") }
        for d in designs.split(separator: ",") where !["quotad", "quotad-cold", "redis-lua"].contains(String(d)) {
            throw ValidationError("--designs: unknown design '\(d)'")
        }
    }

    func run() async throws {
        let names = designs.split(separator: ",").map(String.init)
        var runs: [Run] = []
        for round in 1...rounds {
            for d in names {
                let r = try await runOnce(d, round: round)
                runs.append(r)
                FileHandle.standardError.write(Data(("round \(round) \(d): first 100 ms p50 \(Int(r.p50First100msUs)) µs p99 "
                    + "\(Int(r.p99First100msUs)) µs (\(r.claimsFirst100ms) claims); first second p99 \(Int(r.p99FirstSecondUs)) µs; "
                    + "\(String(format: "%.4f", r.redisCommandsPerClaim)) Redis cmds/claim; sold \(r.sold) in "
                    + "\(String(format: "%.3f", r.saleSeconds)) s\n").utf8))
            }
        }
        let medians = names.map { d -> Run in
            let rs = runs.filter { $0.design == d }
            return Run(design: d, sold: Int(median(rs.map { Double($0.sold) })),
                       p50First100msUs: median(rs.map(\.p50First100msUs)), p99First100msUs: median(rs.map(\.p99First100msUs)),
                       claimsFirst100ms: Int(median(rs.map { Double($0.claimsFirst100ms) })),
                       p50FirstSecondUs: median(rs.map(\.p50FirstSecondUs)), p99FirstSecondUs: median(rs.map(\.p99FirstSecondUs)),
                       claimsFirstSecond: Int(median(rs.map { Double($0.claimsFirstSecond) })),
                       redisCommandsPerClaim: median(rs.map(\.redisCommandsPerClaim)), saleSeconds: median(rs.map(\.saleSeconds)),
                       inactive: rs.reduce(0) { $0 + $1.inactive }, oversell: rs.map(\.oversell).max() ?? 0)
        }
        let s = Summary(limit: limit, connections: connections, pipeline: pipeline, sidecars: sidecars, durability: durability,
                        rounds: rounds, runs: runs, medians: medians)
        if json { return try emitBenchJSON(s) }
        print("| design | first 100 ms: p50 / p99 (claims) | first second: p50 / p99 (claims) | Redis cmds per claim | sale took | oversell |")
        print("|---|---|---|---:|---:|---:|")
        for m in medians {
            print("| \(m.design) | \(Table.ms(UInt64(m.p50First100msUs))) / \(Table.ms(UInt64(m.p99First100msUs))) (\(m.claimsFirst100ms)) | "
                + "\(Table.ms(UInt64(m.p50FirstSecondUs))) / \(Table.ms(UInt64(m.p99FirstSecondUs))) (\(m.claimsFirstSecond)) | "
                + "\(String(format: "%.4f", m.redisCommandsPerClaim)) | \(String(format: "%.3f", m.saleSeconds)) s | \(m.oversell) |")
        }
    }

    /// Redis's clock now, placed on this process's monotonic clock (not early: read after the reply).
    private func redisClock(_ redis: RedisServer) async throws -> (nowMs: Int64, at: ContinuousClock.Instant) {
        let ms = try await redis.store.nowMs()
        return (Int64(ms), ContinuousClock.now)
    }

    private func runOnce(_ design: String, round: Int) async throws -> Run {
        let redis = try await RedisServer()
        let dir = TempDir()
        let voucher = "open-\(round)"
        var hosts: [Quotad] = []
        var sockets: [String]
        var command: @Sendable () -> [String]
        let clock = try await redisClock(redis)
        let startMs = clock.nowMs + Int64(lead * 1000)
        let t0 = clock.at + .milliseconds(startMs - clock.nowMs) + .milliseconds(2)
        let uniq = "\(round)-\(UInt32.random(in: 0...UInt32.max))"
        switch design {
        case "redis-lua":
            let stock = "lua:{open}:stock"
            _ = try await redis.store.connection.send(["SET", stock, String(limit)])
            let sha = try await redis.store.connection.send(["SCRIPT", "LOAD", Self.luaClaim]).string ?? ""
            sockets = [redis.socket]
            let start = String(startMs)
            command = { ["EVALSHA", sha, "1", stock, start] }
        default:
            _ = try await redis.store.createVoucher(id: voucher, limit: limit, perUser: 0, totalLimit: limit, region: "sg",
                                                    startMs: startMs)
            for i in 0..<sidecars {
                hosts.append(try await Quotad(redis: redis, dir: dir, host: "open-\(i)", extraYAML: "log_level: warning\n",
                                              durability: durability))
            }
            if design == "quotad" { try await redis.store.warm(voucher: voucher, atMs: startMs) }
            sockets = hosts.map(\.socket)
            let box = UniqueBox()
            command = { ["CLAIM", voucher, "u\(uniq)-\(box.next())"] }
        }
        let before = try await redisCounters(redis.store)
        let group = MultiThreadedEventLoopGroup.singleton
        let pipeline = self.pipeline
        // (send time since t0 in seconds, latency µs, outcome) per claim.
        let results = try await withThrowingTaskGroup(of: ([(Double, Double)], Int, Int).self) { g in
            for c in 0..<connections {
                let path = sockets[c % sockets.count]
                let cmd = command
                g.addTask {
                    let client = try await RESPClient.connect(path, group: group)
                    defer { client.close() }
                    var mine: [(Double, Double)] = []
                    var ok = 0
                    var inactive = 0
                    try await Task.sleep(until: t0, clock: .continuous)
                    loop: while true {
                        let cmds = (0..<pipeline).map { _ in cmd() }
                        let sent = ContinuousClock.now
                        guard let replies = try? await client.pipeline(cmds) else { break }
                        let lat = secs(ContinuousClock.now - sent) * 1e6
                        var done = false
                        for v in replies {
                            switch v {
                            case .bulkString(.some), .integer(1):
                                ok += 1
                                mine.append((secs(sent - t0), lat))
                            case .integer(-2):
                                inactive += 1
                            case .integer(0):
                                done = true
                            default:
                                let code = v.errorCode ?? "?"
                                if code == "INACTIVE" { inactive += 1 } else if code == "SOLDOUT" { done = true }
                                else if code != "UNAVAILABLE" && code != "BUSY" { done = true }
                            }
                        }
                        if done { break loop }
                    }
                    return (mine, ok, inactive)
                }
            }
            var all: [(Double, Double)] = []
            var ok = 0
            var inactive = 0
            for try await (m, o, i) in g {
                all += m
                ok += o
                inactive += i
            }
            return (all, ok, inactive)
        }
        let after = try await redisCounters(redis.store)
        for h in hosts { _ = try await h.stop() }
        let (claims, sold, inactive) = results
        func pct(_ xs: [Double], _ p: Double) -> Double {
            guard !xs.isEmpty else { return 0 }
            let s = xs.sorted()
            let rank = Int((Double(s.count) * p / 100).rounded(.up)) - 1
            return s[min(s.count - 1, max(0, rank))]
        }
        let first100 = claims.filter { $0.0 < 0.1 }.map(\.1)
        let firstSecond = claims.filter { $0.0 < 1 }.map(\.1)
        let saleEnd = claims.map { $0.0 + $0.1 / 1e6 }.max() ?? 0
        var inStore = sold
        if design == "redis-lua" {
            inStore = limit - (try await redis.store.connection.send(["GET", "lua:{open}:stock"]).int ?? 0)
        } else {
            let a = try await redis.account(voucher)
            inStore = a.leased - a.returned - a.restocked
        }
        return Run(design: design, sold: sold, p50First100msUs: pct(first100, 50), p99First100msUs: pct(first100, 99),
                   claimsFirst100ms: first100.count, p50FirstSecondUs: pct(firstSecond, 50),
                   p99FirstSecondUs: pct(firstSecond, 99), claimsFirstSecond: firstSecond.count,
                   redisCommandsPerClaim: sold > 0 ? Double(after.commands - before.commands) / Double(sold) : 0,
                   saleSeconds: saleEnd, inactive: inactive, oversell: max(0, max(sold, inStore) - limit))
    }
}

/// A counter shared by the closures of one run.
final class UniqueBox: Sendable {
    private let counter = Atomic<Int>(0)
    func next() -> Int { counter.wrappingAdd(1, ordering: .relaxed).newValue }
}

func emitBenchJSON(_ value: some Encodable) throws {
    let e = JSONEncoder()
    e.outputFormatting = [.prettyPrinted, .sortedKeys]
    print(String(decoding: try e.encode(value), as: UTF8.self))
}
