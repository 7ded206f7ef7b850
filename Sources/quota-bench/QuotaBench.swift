import ArgumentParser
import Foundation
import NIOCore
import NIOPosix
import QuotaClient
import QuotaKafka
import QuotaRESP

@main
struct QuotaBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "quota-bench",
        abstract: "Load generator for quotad.",
        subcommands: [Flash.self, Stream.self])
}

/// Counters shared by all client tasks.
final class FlashStats: @unchecked Sendable {
    private let lock = NSLock()
    private(set) var ok = 0
    private(set) var errors: [String: Int] = [:]
    private(set) var done = 0
    private(set) var ids = Set<String>()
    private(set) var duplicates = 0
    private(set) var latenciesUs: [Int] = []

    func record(_ replies: [RESPValue], latencyUs: Int, keepIDs: Bool) {
        lock.lock()
        defer { lock.unlock() }
        if latenciesUs.count < 2_000_000 { latenciesUs.append(latencyUs) }
        for r in replies {
            if let code = r.errorCode {
                errors[code, default: 0] += 1
            } else {
                ok += 1
                if keepIDs, let id = r.string, !ids.insert(id).inserted { duplicates += 1 }
            }
        }
    }

    func finished() { lock.withLock { done += 1 } }

    var snapshot: (ok: Int, errors: [String: Int], done: Int) { lock.withLock { (ok, errors, done) } }
}

struct Flash: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Many clients claim one voucher through one or more quotad sockets until it sells out.")

    @Option(name: .long, parsing: .singleValue, help: "quotad socket (repeatable: clients are spread over them).")
    var socket: [String]
    @Option(name: .long) var voucher: String
    @Option(name: .long, help: "Concurrent connections in all.") var connections = 100
    @Option(name: .long, help: "Commands per pipelined batch.") var pipeline = 1
    @Option(name: .long, help: "Distinct user ids.") var users = 100_000
    @Flag(name: .long, help: "A new user id for every claim (for per-user limited vouchers).") var uniqueUsers = false
    @Option(name: .long, help: "Stop after this many seconds even if not sold out.") var duration: Double = 120
    @Option(name: .long, help: "Give up a connection after this many UNAVAILABLE replies in a row.")
    var maxUnavailable = 200
    @Flag(name: .long, help: "Show a progress line.") var progress = false
    @Flag(name: .long, help: "Print the result as JSON.") var json = false

    func run() async throws {
        guard !socket.isEmpty else { throw ValidationError("give at least one --socket") }
        let stats = FlashStats()
        let start = ContinuousClock.now
        let stopAt = start + .milliseconds(Int64(duration * 1000))
        let group = MultiThreadedEventLoopGroup.singleton
        let progressTask = Task {
            guard progress else { return }
            var last = 0
            var lastT = ContinuousClock.now
            while !Task.isCancelled {
                try? await Task.sleep(for: .milliseconds(250))
                let s = stats.snapshot
                let now = ContinuousClock.now
                let rate = Double(s.ok - last) / secs(now - lastT)
                last = s.ok
                lastT = now
                let errs = s.errors.sorted { $0.key < $1.key }.map { "\($0.key.lowercased()) \($0.value)" }
                    .joined(separator: "  ")
                FileHandle.standardError.write(Data(String(
                    format: "\r  sold %8d   %9.0f claims/s   %4d/%d clients done   %@   ",
                    s.ok, rate, s.done, connections, errs).utf8))
            }
        }
        try await withThrowingTaskGroup(of: Void.self) { g in
            for i in 0..<connections {
                let path = socket[i % socket.count]
                g.addTask {
                    let c = try await RESPClient.connect(path, group: group)
                    defer {
                        c.close()
                        stats.finished()
                    }
                    var unavailableInARow = 0
                    var n = 0
                    while ContinuousClock.now < stopAt {
                        let cmds = (0..<pipeline).map { k in
                            ["CLAIM", voucher, uniqueUsers ? "u\(i)-\(n + k)" : "user-\((i * 7919 + (n + k) * 104729) % users)"]
                        }
                        n += pipeline
                        let t0 = ContinuousClock.now
                        guard let replies = try? await c.pipeline(cmds) else { return }
                        let us = Int(secs(ContinuousClock.now - t0) * 1e6)
                        stats.record(replies, latencyUs: us, keepIDs: true)
                        if replies.contains(where: { $0.errorCode == "SOLDOUT" }) { return }
                        if replies.allSatisfy({ $0.errorCode == "UNAVAILABLE" }) {
                            unavailableInARow += 1
                            if unavailableInARow > maxUnavailable { return }
                            try await Task.sleep(for: .milliseconds(10))
                        } else {
                            unavailableInARow = 0
                        }
                    }
                }
            }
            try await g.waitForAll()
        }
        progressTask.cancel()
        await progressTask.value
        if progress { FileHandle.standardError.write(Data("\n".utf8)) }
        let elapsed = secs(ContinuousClock.now - start)
        let s = stats.snapshot
        let lat = stats.latenciesUs.sorted()
        func pct(_ p: Double) -> Int { lat.isEmpty ? 0 : lat[min(lat.count - 1, Int(Double(lat.count) * p))] }
        let result: [String: String] = [
            "sold": String(s.ok), "distinct_claim_ids": String(stats.ids.count),
            "duplicate_claim_ids": String(stats.duplicates), "seconds": String(format: "%.2f", elapsed),
            "claims_per_second": String(format: "%.0f", Double(s.ok) / max(elapsed, 0.001)),
            "batch_latency_p50_us": String(pct(0.5)), "batch_latency_p99_us": String(pct(0.99)),
            "errors": s.errors.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ","),
        ]
        if json {
            let e = JSONEncoder()
            e.outputFormatting = [.sortedKeys]
            print(String(decoding: try e.encode(result), as: UTF8.self))
        } else {
            for (k, v) in result.sorted(by: { $0.key < $1.key }) { print("\(k): \(v)") }
        }
    }
}

func secs(_ d: Duration) -> Double {
    let (s, a) = d.components
    return Double(s) + Double(a) / 1e18
}

struct Stream: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Read a claims topic back and count it: claimed and unclaimed events, distinct claim ids, re-sends.")

    @Option(name: .long) var brokers: String
    @Option(name: .long) var topic = "quota.claims"
    @Option(name: .long, help: "Only this voucher.") var voucher: String?
    @Option(name: .long, help: "Stop after this many seconds without a message.") var idle: Double = 4
    @Flag(name: .long) var json = false

    func run() async throws {
        let c = try KafkaConsumer(brokers: brokers, topic: topic, group: "quota-bench-\(UUID().uuidString)")
        defer { c.close() }
        var events = 0
        var claimed: [String: Int] = [:]
        var unclaimed = Set<String>()
        var tokens = 0
        for m in c.drain(idle: .milliseconds(Int64(idle * 1000)), limit: .seconds(600)) {
            guard let o = try? JSONSerialization.jsonObject(with: Data(m.value)) as? [String: Any],
                let id = o["claim_id"] as? String, let type = o["type"] as? String
            else { continue }
            if let voucher, o["voucher"] as? String != voucher { continue }
            events += 1
            if type == "claimed" {
                claimed[id, default: 0] += 1
                if claimed[id] == 1 { tokens += o["qty"] as? Int ?? 0 }
            } else {
                unclaimed.insert(id)
            }
        }
        let resent = claimed.values.reduce(0) { $0 + $1 - 1 }
        let result: [String: Int] = [
            "events": events, "distinct_claimed": claimed.count, "unclaimed": unclaimed.count,
            "net_claims": claimed.count - unclaimed.count, "tokens_claimed": tokens, "resent_duplicates": resent,
        ]
        if json {
            let e = JSONEncoder()
            e.outputFormatting = [.sortedKeys]
            print(String(decoding: try e.encode(result), as: UTF8.self))
        } else {
            for (k, v) in result.sorted(by: { $0.key < $1.key }) { print("\(k): \(v)") }
        }
    }
}
