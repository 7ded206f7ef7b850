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
        subcommands: [Compare.self, Scale.self, Flash.self, Stream.self, Chaos.self, LedgerBench.self, Tail.self, Opening.self],
        defaultSubcommand: Compare.self)
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
        let progress = Progress()
        let shown = self.progress ? Progress.show(progress, label: voucher, of: connections) : nil
        let voucher = self.voucher
        let r = try await runRESP(
            sockets: socket, connections: connections, pipeline: pipeline, users: users, uniqueUsers: uniqueUsers,
            duration: duration, maxUnavailable: maxUnavailable, keepIDs: true, progress: progress,
            command: { ["CLAIM", voucher, $0] }, classify: classifyQuotad)
        shown?.cancel()
        _ = await shown?.value
        if self.progress { FileHandle.standardError.write(Data("\n".utf8)) }
        let result: [String: String] = [
            "sold": String(r.ok), "distinct_claim_ids": String(r.ids.count), "duplicate_claim_ids": String(r.duplicates),
            "seconds": String(format: "%.2f", r.seconds), "claims_per_second": String(format: "%.0f", r.claimsPerSecond),
            "latency_p50_us": String(r.percentile(50)), "latency_p99_us": String(r.percentile(99)),
            "latency_p999_us": String(r.percentile(99.9)),
            "errors": r.errors.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ","),
        ]
        try printResult(result, json: json)
    }
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
        try printResult(result, json: json)
    }
}

/// A flat result: one JSON object (`--json`), else `key: value` lines.
func printResult<V: Encodable & CustomStringConvertible>(_ result: [String: V], json: Bool) throws {
    if json {
        try printJSON(result, pretty: false)
    } else {
        for (k, v) in result.sorted(by: { $0.key < $1.key }) { print("\(k): \(v)") }
    }
}

func printJSON(_ value: some Encodable, pretty: Bool = true) throws {
    let e = JSONEncoder()
    e.outputFormatting = pretty ? [.prettyPrinted, .sortedKeys] : [.sortedKeys]
    print(String(decoding: try e.encode(value), as: UTF8.self))
}
