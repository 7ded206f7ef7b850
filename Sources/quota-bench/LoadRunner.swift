import Foundation
import Histogram
import NIOCore
import NIOPosix
import QuotaClient
import QuotaRESP

/// How one reply counts.
enum ClaimOutcome: Sendable, Equatable {
    case ok(id: String?)
    case soldOut
    case refused(String)
}

/// What one load run measured.
struct LoadResult: Sendable {
    var ok = 0
    var errors: [String: Int] = [:]
    /// Per-claim latency in microseconds (a pipelined claim waits as long as its batch).
    var latency = Histogram<UInt64>(highestTrackableValue: 120_000_000, numberOfSignificantValueDigits: .three)
    var seconds = 0.0
    var ids = Set<String>()
    var duplicates = 0

    var claimsPerSecond: Double { Double(ok) / max(seconds, 0.001) }
    func percentile(_ p: Double) -> UInt64 { latency.totalCount == 0 ? 0 : latency.valueAtPercentile(p) }

    mutating func merge(_ o: LoadResult) {
        ok += o.ok
        for (k, v) in o.errors { errors[k, default: 0] += v }
        latency.add(o.latency)
        for id in o.ids where !ids.insert(id).inserted { duplicates += 1 }
        duplicates += o.duplicates
    }
}

/// Live counters for the progress line.
final class Progress: @unchecked Sendable {
    private let lock = NSLock()
    private var ok = 0
    private var done = 0
    func add(_ n: Int) { lock.withLock { ok += n } }
    func finished() { lock.withLock { done += 1 } }
    var snapshot: (ok: Int, done: Int) { lock.withLock { (ok, done) } }

    /// Print `label sold … claims/s …` to stderr every 250 ms until cancelled.
    static func show(_ p: Progress, label: String, of total: Int) -> Task<Void, Never> {
        Task {
            var last = 0
            var lastT = ContinuousClock.now
            while !Task.isCancelled {
                try? await Task.sleep(for: .milliseconds(250))
                let s = p.snapshot
                let now = ContinuousClock.now
                let rate = Double(s.ok - last) / secs(now - lastT)
                last = s.ok
                lastT = now
                FileHandle.standardError.write(Data(String(
                    format: "\r  %-10@ sold %9d   %9.0f claims/s   %4d/%d clients done   ", label as NSString,
                    s.ok, rate, s.done, total).utf8))
            }
        }
    }
}

/// A small deterministic generator for user ids; `unique` ids are new in every run of the program.
struct UserPicker: Sendable {
    static let run = String(UInt32.random(in: 0...UInt32.max), radix: 36)
    var state: UInt64
    let users: Int
    let unique: Bool
    let prefix: String
    var n = 0
    init(seed: Int, users: Int, unique: Bool) {
        state = UInt64(seed) &* 0x9E37_79B9_7F4A_7C15 | 1
        self.users = max(1, users)
        self.unique = unique
        prefix = "u\(UserPicker.run)-\(seed)-"
    }
    mutating func next() -> String {
        n += 1
        if unique { return prefix + String(n) }
        state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
        return "user-\((state >> 33) % UInt64(users))"
    }
}

/// Drives RESP servers (quotad sockets, or redis-server for the Lua baseline) with `connections`
/// clients, each sending `pipeline` commands at a time, until the voucher sells out or `duration` passes.
func runRESP(
    sockets: [String], connections: Int, pipeline: Int, users: Int, uniqueUsers: Bool, duration: Double,
    maxUnavailable: Int = 200, keepIDs: Bool = false, progress: Progress,
    command: @escaping @Sendable (String) -> [String], classify: @escaping @Sendable (RESPValue) -> ClaimOutcome
) async throws -> LoadResult {
    let start = ContinuousClock.now
    let stopAt = start + .milliseconds(Int64(duration * 1000))
    let group = MultiThreadedEventLoopGroup.singleton
    var total = try await withThrowingTaskGroup(of: LoadResult.self) { g in
        for i in 0..<connections {
            let path = sockets[i % sockets.count]
            g.addTask {
                var r = LoadResult()
                let c = try await RESPClient.connect(path, group: group)
                defer {
                    c.close()
                    progress.finished()
                }
                var users = UserPicker(seed: i + 1, users: users, unique: uniqueUsers)
                var unavailableInARow = 0
                while ContinuousClock.now < stopAt {
                    let cmds = (0..<pipeline).map { _ in command(users.next()) }
                    let t0 = ContinuousClock.now
                    guard let replies = try? await c.pipeline(cmds) else { return r }
                    let us = UInt64(max(1, secs(ContinuousClock.now - t0) * 1e6))
                    _ = r.latency.record(us, count: UInt64(replies.count))
                    var soldOut = false
                    var allUnavailable = true
                    var okNow = 0
                    for reply in replies {
                        switch classify(reply) {
                        case .ok(let id):
                            okNow += 1
                            allUnavailable = false
                            if keepIDs, let id, !r.ids.insert(id).inserted { r.duplicates += 1 }
                        case .soldOut:
                            soldOut = true
                            allUnavailable = false
                            r.errors["SOLDOUT", default: 0] += 1
                        case .refused(let code):
                            if code != "UNAVAILABLE" { allUnavailable = false }
                            r.errors[code, default: 0] += 1
                        }
                    }
                    r.ok += okNow
                    progress.add(okNow)
                    if soldOut { return r }
                    if allUnavailable {
                        unavailableInARow += 1
                        if unavailableInARow > maxUnavailable { return r }
                        try await Task.sleep(for: .milliseconds(10))
                    } else {
                        unavailableInARow = 0
                    }
                }
                return r
            }
        }
        var total = LoadResult()
        for try await r in g { total.merge(r) }
        return total
    }
    total.seconds = secs(ContinuousClock.now - start)
    return total
}

/// quotad's replies: a bulk string is a claim id.
@Sendable func classifyQuotad(_ r: RESPValue) -> ClaimOutcome {
    if let code = r.errorCode { return code == "SOLDOUT" ? .soldOut : .refused(code) }
    if case .bulkString(let b?) = r { return .ok(id: String(buffer: b)) }
    return .refused("BADREPLY")
}

func secs(_ d: Duration) -> Double {
    let (s, a) = d.components
    return Double(s) + Double(a) / 1e18
}
