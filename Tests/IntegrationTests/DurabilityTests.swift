import Foundation
import Glibc
import NIOCore
import QuotaClient
import QuotaHarness
import QuotaKafka
import QuotaRESP
import QuotaRedis
import Testing

/// Claim ids answered with success, shared by load tasks.
final class Answered: @unchecked Sendable {
    private let lock = NSLock()
    private var ids: [String] = []
    private var codes: [String: Int] = [:]
    func add(_ id: String) { lock.lock(); ids.append(id); lock.unlock() }
    func error(_ c: String) { lock.lock(); codes[c, default: 0] += 1; lock.unlock() }
    var all: [String] { lock.lock(); defer { lock.unlock() }; return ids }
    var errors: [String: Int] { lock.lock(); defer { lock.unlock() }; return codes }
}

/// `n` connections claiming `voucher` on `socket()` until `stop` is set; reconnects after a crash.
func load(_ n: Int, voucher: String, socket: @escaping @Sendable () -> String, into answered: Answered,
          stop: Flag) async {
    await withTaskGroup(of: Void.self) { g in
        for i in 0..<n {
            g.addTask {
                var c: RESPClient?
                var k = 0
                while !stop.isSet {
                    if c == nil || c?.isActive == false {
                        c = try? await RESPClient.connect(socket())
                        if c == nil {
                            try? await Task.sleep(for: .milliseconds(20))
                            continue
                        }
                    }
                    k += 1
                    guard let r = try? await c!.send("CLAIM", voucher, "u\(i)-\(k)") else { continue }
                    if case .bulkString(let b?) = r { answered.add(String(buffer: b)) } else if let code = r.errorCode {
                        answered.error(code)
                        if code == "SOLDOUT" { return }
                        try? await Task.sleep(for: .milliseconds(5))
                    }
                }
                c?.close()
            }
        }
    }
}

final class Flag: @unchecked Sendable {
    private let lock = NSLock()
    private var v = false
    func set() { lock.lock(); v = true; lock.unlock() }
    var isSet: Bool { lock.lock(); defer { lock.unlock() }; return v }
}

/// The claims on the topic: claim id → every message body with that id, and the net tokens claimed.
func streamed(_ kafka: KafkaBroker, topic: String) async throws -> (claimed: [String: [[UInt8]]], unclaimed: Set<String>, net: Int) {
    var claimed: [String: [[UInt8]]] = [:]
    var unclaimed = Set<String>()
    for m in try await kafka.consume(topic) {
        guard let c = StreamedClaim(m) else { continue }
        if c.type == "claimed" { claimed[c.claimID, default: []].append(c.raw) } else { unclaimed.insert(c.claimID) }
    }
    return (claimed, unclaimed, claimed.count - unclaimed.count)
}

@Suite("Durable claims: journal, Kafka, crash recovery", .serialized, .timeLimit(.minutes(5)))
struct DurabilityTests {
    @Test func producerDeliversEveryMessageOnceToTansu() async throws {
        let kafka = try await KafkaBroker()
        let acked = Answered()
        let p = try KafkaProducer(brokers: kafka.brokers, topic: "probe", logger: .init(label: "t"),
                                  onDelivery: { rs in for r in rs where r.error == nil { acked.add(String(r.sequence)) } })
        for i in 1...5000 { try p.produce(key: "k\(i % 7)", value: Array("m\(i)".utf8), sequence: UInt64(i)) }
        #expect(try await offThePool { p.flush(timeout: .seconds(30)) } == 0)
        p.close()
        #expect(Set(acked.all).count == 5000)
        let got = try await kafka.consume("probe").map { String(decoding: $0.value, as: UTF8.self) }
        #expect(got.count == 5000 && Set(got).count == 5000, "each message exactly once")
    }

    @Test func mockClusterFaultsAreRetriedWithoutLossOrDuplicates() async throws {
        let mock = try KafkaMockCluster(brokers: 3)
        mock.createTopic("faults", partitions: 3)
        let acked = Answered()
        let p = try KafkaProducer(brokers: mock.bootstrapServers, topic: "faults", logger: .init(label: "t"),
                                  onDelivery: { rs in for r in rs where r.error == nil { acked.add(String(r.sequence)) } })
        mock.failNextProduces(10)
        for i in 1...1000 { try p.produce(key: "k\(i % 5)", value: Array("m\(i)".utf8), sequence: UInt64(i)) }
        mock.setBroker(1, up: false)
        try await Task.sleep(for: .seconds(2))
        for i in 1001...2000 { try p.produce(key: "k\(i % 5)", value: Array("m\(i)".utf8), sequence: UInt64(i)) }
        mock.setBroker(1, up: true)
        #expect(try await offThePool { p.flush(timeout: .seconds(60)) } == 0)
        p.close()
        #expect(Set(acked.all).count == 2000)
        let bootstrap = mock.bootstrapServers
        let got = try await offThePool {
            let c = try KafkaConsumer(brokers: bootstrap, topic: "faults", group: "g-faults")
            defer { c.close() }
            return c.drain(idle: .seconds(3)).map { String(decoding: $0.value, as: UTF8.self) }
        }
        #expect(got.count == 2000 && Set(got).count == 2000, "\(got.count) read, \(Set(got).count) distinct")
    }

    @Test func journalModeStreamsEveryAnsweredClaimAsContractJSON() async throws {
        let kafka = try await KafkaBroker()
        let redis = try await RedisServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "js", limit: 1000, perUser: 0, totalLimit: 1000, region: "sg")
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a", kafka: kafka, topic: "t-js")
        let c = try await RESPClient.connect(q.socket)
        var ids: [String] = []
        for i in 0..<300 { ids.append(try #require(try await c.send("CLAIM", "js", "user-\(i)").string)) }
        c.close()
        #expect(try await q.stop() == 0)
        let all = try await kafka.consume("t-js")
        #expect(Set(all.map(\.key)) == ["js"], "keyed by voucher")
        let objects = all.compactMap { try? JSONSerialization.jsonObject(with: Data($0.value)) as? [String: Any] }
        let msgs = all.filter { (try? JSONSerialization.jsonObject(with: Data($0.value)) as? [String: Any])?["type"] as? String == "claimed" }
        #expect(msgs.count == 300)
        // Every lease the host closed is on the stream, once, and together they account for every claim.
        let closes = objects.filter { $0["type"] as? String == "lease_closed" }
        #expect(!closes.isEmpty && Set(closes.compactMap { $0["lease"] as? String }).count == closes.count)
        #expect(closes.reduce(0) { $0 + ($1["served"] as? Int ?? 0) } == 300, "lease_closed served counts sum to the claims")
        for c in closes {
            #expect((c["granted"] as? Int ?? 0) == (c["served"] as? Int ?? -1) + (c["returned"] as? Int ?? -1))
        }
        let s = try await streamed(kafka, topic: "t-js")
        #expect(Set(s.claimed.keys) == Set(ids), "\(Set(ids).subtracting(s.claimed.keys).count) answered claims missing")
        let o = try JSONSerialization.jsonObject(with: Data(msgs[0].value)) as! [String: Any]
        #expect(o["type"] as? String == "claimed" && o["region"] as? String == "sg" && o["host"] as? String == "host-a")
        #expect((o["user"] as? String)?.hasPrefix("user-") == true && o["qty"] as? Int == 1)
        let shares = o["leases"] as? [[String: Any]] ?? []
        #expect(shares.reduce(0) { $0 + ($1["qty"] as? Int ?? 0) } == 1 && shares.allSatisfy { $0["id"] is String })
        #expect(o["ts_ms"] is Int)
        let a = try await redis.account("js")
        #expect(a.pool == 700 && a.leases == 0)
    }

    @Test func killNineFiveTimesUnderLoadLosesNoAnsweredClaimAndNeverOversells() async throws {
        let kafka = try await KafkaBroker()
        let redis = try await RedisServer()
        let dir = TempDir()
        let limit = 30_000
        _ = try await redis.store.createVoucher(id: "k9", limit: limit, perUser: 0, totalLimit: limit, region: "sg")
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a", kafka: kafka, topic: "t-k9")
        let answered = Answered()
        let stop = Flag()
        let socket = q.socket
        let loader = Task { await load(20, voucher: "k9", socket: { socket }, into: answered, stop: stop) }
        for round in 1...5 {
            try await Task.sleep(for: .milliseconds(800))
            let before = answered.all.count
            q.child.signal(SIGKILL)
            _ = try await q.child.wait()
            try await q.restart()
            #expect(answered.all.count >= before, "round \(round)")
        }
        // The load goes on after the last restart until it has made progress (a loaded box is slow).
        try await eventually("1,000 claims answered", timeout: .seconds(60)) { answered.all.count > 1000 }
        stop.set()
        await loader.value
        #expect(try await q.stop() == 0)
        let ids = answered.all
        #expect(ids.count > 1000, "the load made progress: \(ids.count) claims answered")
        #expect(Set(ids).count == ids.count, "claim ids unique across restarts")

        let s = try await streamed(kafka, topic: "t-k9")
        let missing = Set(ids).subtracting(s.claimed.keys)
        #expect(missing.isEmpty, "\(missing.count) answered claims are not on the topic")
        for (id, bodies) in s.claimed where bodies.count > 1 {
            #expect(Set(bodies.map { Data($0) }).count == 1, "\(id) appears \(bodies.count) times with different contents")
        }
        #expect(s.net <= limit, "oversold")
        let a = try await redis.account("k9")
        // Claims on the topic that were never answered (journaled just before a kill) still consumed their token.
        #expect(a.pool + a.outstanding + s.net == limit,
                "pool \(a.pool) + outstanding \(a.outstanding) + claimed \(s.net) != \(limit)")
        #expect(q.allLogs.contains("returned a lease on the journal's word"), "recovery gave back unserved tokens")
    }

    @Test func brokerDownThirtySecondsJournalModeServesWithinItsBoundKafkaModeFailsClosedThenAllShips() async throws {
        let kafka = try await KafkaBroker()
        let redis = try await RedisServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "bd", limit: 100_000, perUser: 0, totalLimit: 100_000, region: "sg")
        // host-j's unshipped backlog is bounded small enough to be reached within the outage.
        let jq = try await Quotad(redis: redis, dir: dir, host: "host-j", kafka: kafka, topic: "t-bd",
                                  durability: "journal", journalMaxBytes: 100_000)
        let kq = try await Quotad(redis: redis, dir: dir, host: "host-k",
                                  extraYAML: "limits: { claim_timeout_ms: 5000 }\n",
                                  kafka: kafka, topic: "t-bd", durability: "kafka")
        let jc = try await RESPClient.connect(jq.socket)
        let kc = try await RESPClient.connect(kq.socket)
        var answered: [String] = []
        for i in 0..<50 {
            answered.append(try #require(try await jc.send("CLAIM", "bd", "j\(i)").string))
            answered.append(try #require(try await kc.send("CLAIM", "bd", "k\(i)").string))
        }

        kafka.child.signal(SIGSTOP)
        let outageStart = ContinuousClock.now
        // kafka mode: once Kafka counts as down (no progress for 2 s), claims fail at once.
        try await eventually("kafka counts as down", timeout: .seconds(30)) { try await kq.stat("kafka_down") == 1 }
        let t0 = ContinuousClock.now
        let kr = try await kc.send("CLAIM", "bd", "k-down")
        #expect(kr.errorCode == "UNAVAILABLE", "\(kr)")
        #expect(ContinuousClock.now - t0 < .seconds(2), "answered at once, not after the 5 s claim timeout")
        // journal mode: keeps serving from the journal while its backlog is under journal.max_bytes.
        var journalOK = 0
        var journalUnavailable = 0
        var sent = 0
        while ContinuousClock.now - outageStart < .seconds(30) {
            // Pipelined (one group commit for many): the bound is reached even where fsync is slow.
            let replies = try await jc.pipeline((0..<20).map { _ in
                sent += 1
                return ["CLAIM", "bd", "j-down-\(sent)"]
            })
            var refused = false
            for r in replies {
                if let id = r.string, !r.isError {
                    answered.append(id)
                    journalOK += 1
                } else if r.errorCode == "UNAVAILABLE" {
                    journalUnavailable += 1
                    refused = true
                } else {
                    Issue.record("unexpected \(r)")
                }
            }
            if refused { try await Task.sleep(for: .milliseconds(20)) }
        }
        #expect(journalOK > 100, "journal mode served while the broker was down")
        #expect(journalUnavailable > 0, "then failed closed at journal.max_bytes")
        let backlog = try await jq.stat("journal_backlog_bytes")
        #expect(backlog > 0)

        kafka.child.signal(SIGCONT)
        try await eventually("the backlog ships", timeout: .seconds(90)) {
            let j = try await jq.stat("journal_unshipped_claims")
            let k = try await kq.stat("journal_unshipped_claims")
            return j == 0 && k == 0
        }
        try await eventually("kafka mode serves again", timeout: .seconds(30)) {
            try await kc.send("CLAIM", "bd", "k-after").errorCode == nil
        }
        try await eventually("journal mode serves again", timeout: .seconds(30)) {
            try await jc.send("CLAIM", "bd", "j-after").errorCode == nil
        }
        jc.close()
        kc.close()
        #expect(try await jq.stop() == 0)
        #expect(try await kq.stop() == 0)
        let s = try await streamed(kafka, topic: "t-bd")
        let missing = Set(answered).subtracting(s.claimed.keys)
        #expect(missing.isEmpty, "\(missing.count) answered claims missing from the topic")
        let a = try await redis.account("bd")
        #expect(a.leases == 0)
        #expect(a.pool + s.net == 100_000, "pool \(a.pool) + net claimed \(s.net)")
    }

    @Test func corruptJournalIsReportedAtStartWithFileAndOffsetAndNothingCrashes() async throws {
        let kafka = try await KafkaBroker()
        let redis = try await RedisServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "cj", limit: 1000, perUser: 0, totalLimit: 1000, region: "sg")
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a", kafka: kafka, topic: "t-cj")
        let c = try await RESPClient.connect(q.socket)
        for i in 0..<20 { _ = try await c.send("CLAIM", "cj", "u\(i)") }
        // One more just before the kill: the newest segment then holds its snapshot and a record after it, even
        // when it was rolled (every 2 s) during a slow run.
        _ = try await c.send("CLAIM", "cj", "last")
        c.close()
        q.child.signal(SIGKILL)
        _ = try await q.child.wait()
        let jdir = dir.file("journal-host-a")
        let seg = try #require(try FileManager.default.contentsOfDirectory(atPath: jdir).filter { $0.hasSuffix(".qj") }.sorted().last)
        let path = "\(jdir)/\(seg)"
        var bytes = [UInt8](FileManager.default.contents(atPath: path)!)
        try #require(bytes.count > 100)
        // Inside the first record (the segment's snapshot), with records after it: corruption, not a torn tail
        // (a flipped last record is read as a write cut short by the crash).
        bytes[12] ^= 0xff
        try Data(bytes).write(to: URL(fileURLWithPath: path))

        try await q.restart()
        let c2 = try await RESPClient.connect(q.socket)
        #expect(try await c2.send("CLAIM", "cj", "after").errorCode == nil, "serves after a corrupt journal")
        c2.close()
        #expect(try await q.stop() == 0)
        #expect(q.allLogs.contains("journal corruption: \(path) at offset"), "reported with file and offset")
        #expect(q.allLogs.contains("lease state not trusted"))
        // Leases of the corrupt run were not returned on the journal's word: still outstanding, never oversold.
        let a = try await redis.account("cj")
        #expect(a.outstanding > 0)
        #expect(a.pool + a.outstanding + 1 <= 1000)
    }

    @Test func diskFullJournalAnswersUnavailableAndKeepsRunning() async throws {
        let kafka = try await KafkaBroker()
        let redis = try await RedisServer()
        let dir = TempDir()
        let jdir = dir.file("journal-host-a")
        try FileManager.default.createDirectory(atPath: jdir, withIntermediateDirectories: true)
        try #require(mount("tmpfs", jdir, "tmpfs", 0, "size=128k") == 0, "needs root to mount a tmpfs")
        defer { umount2(jdir, Int32(MNT_DETACH)) }
        _ = try await redis.store.createVoucher(id: "df", limit: 1_000_000, perUser: 0, totalLimit: 1_000_000, region: "sg")
        kafka.child.signal(SIGSTOP)  // nothing ships, so the journal only grows
        defer { kafka.child.signal(SIGCONT) }
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a", kafka: kafka, topic: "t-df")
        let c = try await RESPClient.connect(q.socket)
        var ok = 0
        var unavailable = 0
        for i in 0..<20_000 {
            let r = try await c.send("CLAIM", "df", "u\(i)")
            if r.errorCode == nil { ok += 1 } else if r.errorCode == "UNAVAILABLE" {
                unavailable += 1
                if unavailable > 20 { break }
            } else { Issue.record("unexpected \(r)") }
        }
        #expect(ok > 0)
        #expect(unavailable > 20, "a full disk fails closed")
        #expect(try await c.send("PING") == .simpleString("PONG"))
        #expect(try await q.stat("journal_healthy") == 0)
        #expect(q.child.isRunning)
        c.close()
        q.child.signal(SIGKILL)
        _ = try await q.child.wait()
    }
}
