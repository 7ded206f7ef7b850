import ArgumentParser
import Foundation
import Glibc
import NIOConcurrencyHelpers
import NIOCore
import QuotaChaos
import QuotaClient
import QuotaCore
import QuotaHarness
import QuotaJournal
import QuotaKafka
import QuotaRESP
import QuotaRedis


struct Chaos: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Randomized faults against real servers, every request recorded, every invariant checked.",
        discussion: """
            Per run: a durable redis-server, a Tansu broker and 2-5 quotad sidecars (journal or kafka mode,
            journals on their own tmpfs when root), clients claiming three vouchers (plain, per-user limit 2,
            QTY 1-3) with REQ retries, UNCLAIMs and dropped pipelines, and faults from a seeded schedule:
            kill -9 / SIGSTOP past lease expiry / SIGTERM / DRAIN of sidecars, SIGSTOP / kill -9 / DEBUG SLEEP
            of Redis, SIGSTOP or state loss of the broker, a full journal disk. At the end everything is
            stopped gracefully, each sidecar restarted once on its journal and stopped, and the history is
            checked (QuotaChaos.ChaosChecker). A failing run's history, logs and seed are kept; the exit
            status is 1 if any run failed. --seed replays a run's schedule.
            """)

    @Option(name: .long, help: "Runs: seeds seed, seed+1, ...") var runs = 1
    @Option(name: .long, help: "Seed of the first run (default: random).") var seed: UInt64?
    @Option(name: .long, help: "Seconds of load and faults per run.") var duration: Double = 15
    @Option(name: .long, help: "Sidecars per run, 2-5 (default: drawn from the seed).") var sidecars: Int?
    @Option(name: .long, help: "Client connections.") var clients = 24
    @Option(name: .long, help: "Fault kinds to draw from, comma separated (default: all that can run here).")
    var faults: String?
    @Option(name: .long, help: "Where failing runs are kept.") var keep = "chaos-failures"
    @Option(name: .long, help: "A deliberate sidecar bug, for the checker's self-test: skip-user-check, no-timeout-cancel, double-return.")
    var bug: String?
    @Flag(name: .long, help: "One JSON object per run and a summary, instead of text.") var json = false
    @Flag(name: .long, help: "No progress lines.") var quiet = false

    struct Summary: Codable {
        var runs = 0
        var failed = 0
        var seeds: [UInt64] = []
        var failedSeeds: [UInt64] = []
        var faults: [String: Int] = [:]
        var claimsChecked = 0
        var requests = 0
        var violations: [String: Int] = [:]
    }

    func run() async throws {
        guard (1...1000).contains(runs) else { throw ValidationError("--runs must be 1...1000") }
        if let sidecars, !(2...5).contains(sidecars) { throw ValidationError("--sidecars must be 2...5") }
        guard duration >= 5 else { throw ValidationError("--duration must be at least 5 seconds") }
        var kinds = FaultEvent.Kind.allCases.filter { $0 != .clientDisconnect }
        if getuid() != 0 { kinds.removeAll { $0 == .diskFull } }
        if let faults {
            let asked = faults.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
            kinds = try asked.map { s in
                guard let k = FaultEvent.Kind(rawValue: s), k != .clientDisconnect else {
                    throw ValidationError("--faults: unknown kind '\(s)'; kinds: "
                        + FaultEvent.Kind.allCases.filter { $0 != .clientDisconnect }.map(\.rawValue).joined(separator: ", "))
                }
                return k
            }
        }
        let first = seed ?? UInt64.random(in: 1...UInt64(UInt32.max))
        var summary = Summary()
        for i in 0..<runs {
            let s = first &+ UInt64(i)
            let run = ChaosRun(seed: s, duration: duration, sidecars: sidecars, clients: clients, kinds: kinds, bug: bug,
                               keep: keep, quiet: quiet || json)
            let r = try await run.execute()
            summary.runs += 1
            summary.seeds.append(s)
            summary.requests += r.requests
            summary.claimsChecked += r.claims
            for (k, n) in r.faults { summary.faults[k, default: 0] += n }
            for v in r.violations { summary.violations[v.invariant, default: 0] += 1 }
            if !r.violations.isEmpty {
                summary.failed += 1
                summary.failedSeeds.append(s)
            }
            if json {
                try printJSON(r.report, pretty: false)
            } else {
                let faultText = r.faults.sorted { $0.key < $1.key }.map { "\($0.key)×\($0.value)" }.joined(separator: " ")
                print("seed \(s): \(r.violations.isEmpty ? "ok" : "FAIL (\(r.violations.count) violations, kept in \(r.keptAt ?? "?"))")"
                    + " — \(r.sidecars) sidecars, \(r.requests) requests, \(r.claims) claims checked; faults: \(faultText)")
                for v in r.violations.prefix(20) { print("    \(v)") }
            }
            fflush(nil)
        }
        if json {
            try printJSON(summary, pretty: false)
        } else {
            print("\n| runs | failed | requests | claims checked | faults injected | violations |")
            print("|---:|---:|---:|---:|---|---|")
            let f = summary.faults.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
            let v = summary.violations.isEmpty ? "0" : summary.violations.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
            print("| \(summary.runs) | \(summary.failed) | \(summary.requests) | \(summary.claimsChecked) | \(f) | \(v) |")
            if !summary.failedSeeds.isEmpty { print("failed seeds: \(summary.failedSeeds.map(String.init).joined(separator: " "))") }
        }
        if summary.failed > 0 { throw ExitCode(1) }
    }
}

/// One chaos run: servers, workload, faults, history, checks.
final class ChaosRun: @unchecked Sendable {
    struct Result {
        var violations: [Violation]
        var faults: [String: Int]
        var requests: Int
        var claims: Int
        var sidecars: Int
        var keptAt: String?
        var report: Report
    }

    struct Report: Codable {
        var seed: UInt64
        var verdict: String
        var sidecars: Int
        var requests: Int
        var claims: Int
        var faults: [String: Int]
        var violations: [String]
        var kept: String?
    }

    let seed: UInt64
    let duration: Double
    let clients: Int
    let kinds: [FaultEvent.Kind]
    let bug: String?
    let keep: String
    let quiet: Bool
    let n: Int
    let ttl = 3.0
    let claimTimeoutMs = 1500
    /// A reply later than this (seconds) is a hang unless a fault explains it.
    var replyBound: Double { Double(claimTimeoutMs) / 1000 + 3 }
    let dir = TempDir()
    let start = ContinuousClock.now
    private let lock = NIOLock()
    private var ops: [Op] = []
    private var faultLog: [FaultEvent] = []
    private var busy = Set<String>()
    private var sidecars: [Quotad] = []
    private var durability: [String] = []
    private var fillers: [Int: String] = [:]
    private var mounted: [String] = []
    let vouchers: [VoucherSpec]
    let topic = "chaos"

    init(seed: UInt64, duration: Double, sidecars: Int?, clients: Int, kinds: [FaultEvent.Kind], bug: String?, keep: String,
         quiet: Bool) {
        self.seed = seed
        self.duration = duration
        self.clients = clients
        self.kinds = kinds
        self.bug = bug
        self.keep = keep
        self.quiet = quiet
        var rng = SplitMix(seed)
        n = sidecars ?? (2 + rng.below(3))
        let limit = Int(duration * 100)
        vouchers = [
            VoucherSpec(id: "plain", limit: limit, perUser: 0, maxQty: 1),
            VoucherSpec(id: "peruser", limit: limit, perUser: 2, maxQty: 1),
            VoucherSpec(id: "multi", limit: limit * 2, perUser: 0, maxQty: 3),
        ]
    }

    func t() -> Double { secs(ContinuousClock.now - start) }

    private func say(_ s: String) {
        if !quiet { FileHandle.standardError.write(Data("  [seed \(seed) \(String(format: "%5.1f", t()))s] \(s)\n".utf8)) }
    }

    private func record(_ op: Op) { lock.withLock { ops.append(op) } }
    private func record(_ f: FaultEvent) { lock.withLock { faultLog.append(f) } }

    // MARK: - Run

    func execute() async throws -> Result {
        let redis = try await RedisServer()
        let kafka = try await KafkaBroker()
        var rng = SplitMix(seed ^ 0x5EED)
        for v in vouchers {
            _ = try await redis.store.createVoucher(id: v.id, limit: v.limit, perUser: v.perUser, totalLimit: v.limit, region: "sg")
        }
        for i in 0..<n {
            let mode = rng.below(10) < 7 ? "journal" : "kafka"
            durability.append(mode)
            sidecars.append(try await startSidecar(i, mode: mode, redis: redis, kafka: kafka))
        }
        say("\(n) sidecars (\(durability.joined(separator: ", "))), faults: \(kinds.map(\.rawValue).joined(separator: ","))")

        // Load and faults, side by side, for `duration` seconds.
        let scheduler = Task { await self.faults(redis: redis, kafka: kafka) }
        await withTaskGroup(of: Void.self) { g in
            for c in 0..<clients { g.addTask { await self.client(c) } }
        }
        await scheduler.value

        // Heal everything, stop gracefully, restart each sidecar once on its journal, stop again.
        say("healing and stopping")
        redis.child?.signal(SIGCONT)
        kafka.child.signal(SIGCONT)
        if redis.child?.isRunning != true { try await redis.start() }
        for (i, f) in fillers { try? FileManager.default.removeItem(atPath: f); _ = i }
        var stopProblems: [String] = []
        for q in sidecars {
            q.child.signal(SIGCONT)
            if !q.child.isRunning { try await q.restart() }
        }
        // A stop may take the drain bound (10 s) plus Kafka's flush bound (10 s); past 40 s it is a problem.
        for q in sidecars {
            switch await q.stopOrKill(timeout: .seconds(40)) {
            case 0?: break
            case let st?: stopProblems.append("\(q.host) exited \(st) on SIGTERM")
            case nil: stopProblems.append("\(q.host) did not exit within 40 s of SIGTERM (killed)")
            }
        }
        for q in sidecars {
            try await q.restart()
            try await Task.sleep(for: .milliseconds(500))
            switch await q.stopOrKill(timeout: .seconds(40)) {
            case 0?: break
            case let st?: stopProblems.append("\(q.host) exited \(st) on SIGTERM after its recovery run")
            case nil: stopProblems.append("\(q.host) did not exit within 40 s of SIGTERM after its recovery run (killed)")
            }
        }

        // Read back: Redis's books, each journal, the topic.
        var books: [String: VoucherAudit] = [:]
        for v in vouchers { books[v.id] = try await redis.books(v.id) }
        var journalProblems: [String] = stopProblems
        var journalEvents: [StreamEvent] = []
        for q in sidecars {
            let rec = JournalRecovery.read(dir: q.journalDir)
            journalProblems += rec.issues.map { "\(q.host) journal: \($0)" }
            for b in books.values { journalProblems += b.journalProblems(host: q.host, ledger: rec.ledger, hostStopped: true) }
            for e in rec.history {
                journalEvents.append(StreamEvent(kind: e.kind == .claimed ? .claimed : .unclaimed, claimID: e.claimID,
                                                 voucher: e.voucher, user: e.user, qty: e.qty, raw: e.kafkaValue,
                                                 shares: e.shares.map { ($0.leaseId, $0.tokens) }))
            }
        }
        let stream = try await kafka.consume(topic, idle: .seconds(4)).compactMap { StreamEvent(json: $0.value) }
        let (allOps, allFaults) = lock.withLock { (ops, faultLog) }
        let runRecord = RunRecord(vouchers: vouchers, ops: allOps, faults: allFaults, stream: stream, journals: journalEvents,
                                  books: books, journalProblems: journalProblems, replyBound: replyBound)
        let violations = ChaosChecker.check(runRecord)
        var faultsByKind: [String: Int] = [:]
        for f in allFaults { faultsByKind[f.kind.rawValue, default: 0] += 1 }
        let claims = Set((stream + journalEvents).filter { $0.kind == .claimed }.map(\.claimID)).count
        var kept: String?
        if !violations.isEmpty { kept = try keepRun(allOps, allFaults, violations) }
        for m in mounted { umount2(m, Int32(MNT_DETACH)) }
        let report = Report(seed: seed, verdict: violations.isEmpty ? "ok" : "fail", sidecars: n, requests: allOps.count,
                            claims: claims, faults: faultsByKind, violations: violations.map(\.description), kept: kept)
        return Result(violations: violations, faults: faultsByKind, requests: allOps.count, claims: claims, sidecars: n,
                      keptAt: kept, report: report)
    }

    private func startSidecar(_ i: Int, mode: String, redis: RedisServer, kafka: KafkaBroker) async throws -> Quotad {
        let host = "host-\(i)"
        let jdir = dir.file("journal-\(host)")
        try FileManager.default.createDirectory(atPath: jdir, withIntermediateDirectories: true)
        if getuid() == 0, mount("tmpfs", jdir, "tmpfs", 0, "size=16m") == 0 { mounted.append(jdir) }
        let socket = dir.file("\(host).sock")
        let config = dir.file("\(host).yaml")
        try """
            host_id: \(host)
            region: sg
            regions: { sg: { redis: "\(redis.url)" } }
            socket: { path: \(socket) }
            durability: \(mode)
            journal: { dir: \(jdir), segment_bytes: 65536 }
            kafka: { brokers: "\(kafka.brokers)", topic: \(topic) }
            lease: { ttl: \(Int(ttl)), safety_margin: 1, min: 5, max: 50 }
            limits: { claim_timeout_ms: \(claimTimeoutMs) }
            redis_timeout_ms: 300
            claims: { dedupe_window_seconds: 600 }
            """.write(toFile: config, atomically: true, encoding: .utf8)
        var env: [String: String] = [:]
        if let bug { env["QUOTAD_INJECT_BUG"] = bug }
        return try await Quotad(config: config, socket: socket, host: host, log: dir.file("\(host).log"), environment: env)
    }

    // MARK: - Clients

    /// One client: claims (with REQ, retried on UNAVAILABLE, BUSY or no reply), UNCLAIMs of its own claims,
    /// and now and then a pipeline it drops mid-way.
    private func client(_ index: Int) async {
        var rng = SplitMix(seed &* 31 &+ UInt64(index) &* 0x9E37_79B9)
        let host = index % n
        let socket = dir.file("host-\(host).sock")
        var conn: RESPClient?
        var mine: [(id: String, voucher: String)] = []
        var count = 0
        while t() < duration {
            let roll = rng.below(1000)
            if roll < 5 {
                await dropPipeline(&conn, socket: socket, host: host, client: index, rng: &rng, count: &count)
            } else if roll < 65, !mine.isEmpty {
                let k = rng.below(mine.count)
                let target = mine[k]
                let t0 = t()
                let (v, why) = await send(&conn, socket: socket, ["UNCLAIM", target.id])
                let outcome = Self.outcome(v, why)
                record(Op(kind: .unclaim, client: index, host: host, voucher: target.voucher, user: "", qty: 0, req: nil,
                          claimID: target.id, t0: t0, t1: v == nil ? nil : t(), outcome: outcome))
                if outcome == .ok { mine.remove(at: k) }
            } else {
                count += 1
                let spec = vouchers[rng.below(vouchers.count)]
                let user = spec.perUser > 0 ? "u\(rng.below(spec.limit / 2 + 100))" : "c\(index)-\(count)"
                let qty = spec.maxQty > 1 ? 1 + rng.below(spec.maxQty) : 1
                let req = "r\(seed)-\(index)-\(count)"
                for attempt in 0..<4 {
                    let t0 = t()
                    let (v, why) = await send(&conn, socket: socket, ["CLAIM", spec.id, user, "QTY", String(qty), "REQ", req])
                    let outcome = Self.outcome(v, why)
                    var id: String?
                    if outcome == .ok, case .bulkString(let b?) = v { id = String(buffer: b) }
                    record(Op(kind: .claim, client: index, host: host, voucher: spec.id, user: user, qty: qty, req: req,
                              claimID: id, t0: t0, t1: v == nil ? nil : t(), outcome: outcome))
                    if let id {
                        if !mine.contains(where: { $0.id == id }) { mine.append((id, spec.id)) }
                        break
                    }
                    guard attempt < 3, t() < duration else { break }
                    switch outcome {
                    case .error("UNAVAILABLE"), .error("BUSY"), .noReply:
                        try? await Task.sleep(for: .milliseconds(100 + rng.below(200)))
                        continue
                    default:
                        break
                    }
                    break
                }
            }
            try? await Task.sleep(for: .milliseconds(10 + rng.below(40)))
        }
        conn?.close()
    }

    static func outcome(_ v: RESPValue?, _ why: String?) -> Op.Outcome {
        guard let v else { return .noReply(why ?? "none") }
        if let code = v.errorCode { return .error(code) }
        return .ok
    }

    /// Send one command; on no reply within the bound, the connection is closed (its late reply must not
    /// answer the next command).
    private func send(_ conn: inout RESPClient?, socket: String, _ args: [String]) async -> (RESPValue?, String?) {
        if conn == nil || conn?.isActive == false {
            conn = try? await RESPClient.connect(socket)
            guard conn != nil else { return (nil, "connect") }
        }
        let c = conn!
        let bound = replyBound + 1
        let v: RESPValue?? = await withTaskGroup(of: RESPValue??.self) { g in
            g.addTask { try? await c.send(args) }
            g.addTask {
                try? await Task.sleep(for: .milliseconds(Int64(bound * 1000)))
                return .some(nil)
            }
            let first = await g.next()!
            g.cancelAll()
            return first
        }
        switch v {
        case .some(.some(let r)): return (r, nil)
        case .some(.none):
            c.close()
            conn = nil
            return (nil, "timeout")
        case .none:
            conn = nil
            return (nil, "disconnect")
        }
    }

    /// Pipeline three claims and close the connection without reading the replies.
    private func dropPipeline(_ conn: inout RESPClient?, socket: String, host: Int, client: Int, rng: inout SplitMix,
                              count: inout Int) async {
        if conn == nil || conn?.isActive == false { conn = try? await RESPClient.connect(socket) }
        guard let c = conn else { return }
        let t0 = t()
        var buf = c.channel.allocator.buffer(capacity: 256)
        for _ in 0..<3 {
            count += 1
            let spec = vouchers[0]
            let user = "c\(client)-\(count)"
            let req = "r\(seed)-\(client)-\(count)"
            buf.writeRESPCommand(["CLAIM", spec.id, user, "REQ", req])
            record(Op(kind: .claim, client: client, host: host, voucher: spec.id, user: user, qty: 1, req: req, claimID: nil,
                      t0: t0, t1: nil, outcome: .noReply("dropped")))
        }
        let promises = (0..<3).map { _ in c.channel.eventLoop.makePromise(of: RESPValue.self) }
        for p in promises { p.futureResult.whenComplete { _ in } }
        c.channel.writeAndFlush((buf, promises), promise: nil)
        c.close()
        conn = nil
        record(FaultEvent(kind: .clientDisconnect, target: host, start: t0, end: t()))
    }

    // MARK: - Faults

    /// The seeded schedule: a fault every 0.8-3 s, on a target that is not already under one.
    private func faults(redis: RedisServer, kafka: KafkaBroker) async {
        guard !kinds.isEmpty else { return }
        var rng = SplitMix(seed ^ 0xFA17)
        var at = 1.5 + rng.uniform(0, 1)
        var tasks: [Task<Void, Never>] = []
        while at < duration - 2 {
            let kind = kinds[rng.below(kinds.count)]
            let target = rng.below(n)
            let p = rng.uniform(0, 1)
            let wait = at - t()
            if wait > 0 { try? await Task.sleep(for: .milliseconds(Int64(wait * 1000))) }
            let key: String
            switch kind {
            case .redisStop, .redisKill, .redisSlow: key = "redis"
            case .brokerStop, .brokerWipe: key = "broker"
            default: key = "sidecar-\(target)"
            }
            let free = lock.withLock { busy.insert(key).inserted }
            if free {
                tasks.append(Task {
                    await self.inject(kind, target: target, p: p, redis: redis, kafka: kafka)
                    _ = self.lock.withLock { self.busy.remove(key) }
                })
            }
            at += 0.8 + rng.uniform(0, 2.2)
        }
        for task in tasks { await task.value }
    }

    private func inject(_ kind: FaultEvent.Kind, target: Int, p: Double, redis: RedisServer, kafka: KafkaBroker) async {
        let t0 = t()
        let q = sidecars[target]
        let tgt: Int
        switch kind {
        case .sidecarKill:
            tgt = target
            say("kill -9 \(q.host)")
            try? await q.kill9()
            try? await Task.sleep(for: .milliseconds(200 + Int64(p * 600)))
            try? await q.restart()
        case .sidecarStopPastExpiry:
            tgt = target
            say("SIGSTOP \(q.host) past its leases' expiry")
            q.child.signal(SIGSTOP)
            try? await Task.sleep(for: .milliseconds(Int64((ttl + 1.5) * 1000)))
            q.child.signal(SIGCONT)
        case .sidecarTerm:
            tgt = target
            say("SIGTERM \(q.host)")
            _ = try? await q.stop()
            try? await Task.sleep(for: .milliseconds(300))
            try? await q.restart()
        case .sidecarDrain:
            tgt = target
            say("DRAIN \(q.host)")
            if let c = try? await RESPClient.connect(q.socket) {
                _ = try? await c.send("DRAIN")
                c.close()
            }
            _ = try? await q.stop()
            try? await q.restart()
        case .redisStop:
            tgt = -1
            say("SIGSTOP redis")
            redis.child?.signal(SIGSTOP)
            try? await Task.sleep(for: .milliseconds(500 + Int64(p * 1500)))
            redis.child?.signal(SIGCONT)
        case .redisKill:
            tgt = -1
            say("kill -9 redis (AOF)")
            try? await redis.kill9()
            try? await Task.sleep(for: .milliseconds(200 + Int64(p * 400)))
            try? await redis.start()
        case .redisSlow:
            tgt = -1
            let secs = 0.3 + p * 0.9
            say("DEBUG SLEEP \(String(format: "%.1f", secs)) on redis")
            redis.stall(secs)
            try? await Task.sleep(for: .milliseconds(Int64(secs * 1000)))
        case .brokerStop:
            tgt = -1
            say("SIGSTOP broker")
            kafka.child.signal(SIGSTOP)
            try? await Task.sleep(for: .milliseconds(1000 + Int64(p * 2000)))
            kafka.child.signal(SIGCONT)
        case .brokerWipe:
            tgt = -1
            say("broker restarted without its state")
            try? await kafka.restartEmpty()
        case .diskFull:
            tgt = target
            say("journal disk of \(q.host) full")
            let filler = q.journalDir + "/filler"
            lock.withLock { fillers[target] = filler }
            fill(filler)
            try? await Task.sleep(for: .milliseconds(1000 + Int64(p * 1000)))
            try? FileManager.default.removeItem(atPath: filler)
            _ = lock.withLock { fillers.removeValue(forKey: target) }
        case .clientDisconnect:
            return
        }
        record(FaultEvent(kind: kind, target: tgt, start: t0, end: t()))
    }

    /// Write zeros until the file system is full.
    private func fill(_ path: String) {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        guard fd >= 0 else { return }
        defer { close(fd) }
        let chunk = [UInt8](repeating: 0, count: 1 << 16)
        while chunk.withUnsafeBytes({ write(fd, $0.baseAddress, $0.count) }) > 0 {}
    }

    // MARK: - Keeping a failing run

    private func keepRun(_ ops: [Op], _ faults: [FaultEvent], _ violations: [Violation]) throws -> String {
        let out = "\(keep)/seed-\(seed)"
        try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
        try (ops.map(\.line).joined(separator: "\n") + "\n").write(toFile: "\(out)/history.tsv", atomically: true, encoding: .utf8)
        let e = JSONEncoder()
        e.outputFormatting = [.prettyPrinted, .sortedKeys]
        try e.encode(faults).write(to: URL(fileURLWithPath: "\(out)/faults.json"))
        try (violations.map(\.description).joined(separator: "\n") + "\n").write(toFile: "\(out)/violations.txt", atomically: true, encoding: .utf8)
        try "quota-bench chaos --seed \(seed) --duration \(duration) --sidecars \(n) --clients \(clients)\(bug.map { " --bug \($0)" } ?? "")\n"
            .write(toFile: "\(out)/replay.sh", atomically: true, encoding: .utf8)
        for f in (try? FileManager.default.contentsOfDirectory(atPath: dir.path)) ?? [] where f.hasSuffix(".log") || f.contains(".log.") {
            try? FileManager.default.copyItem(atPath: dir.file(f), toPath: "\(out)/\(f)")
        }
        for q in sidecars {
            try? FileManager.default.copyItem(atPath: q.journalDir, toPath: "\(out)/journal-\(q.host)")
        }
        return out
    }
}
