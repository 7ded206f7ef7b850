import Foundation
import Glibc
import NIOCore
import QuotaClient
import QuotaHarness
import QuotaJournal
import QuotaRESP
import QuotaRedis
import Synchronization
import Testing

/// A small ext4 file system on a loop device (root only), so a test can freeze its journal's disk.
final class LoopDisk: @unchecked Sendable {
    let image: String
    let mountPoint: String
    private var frozen = false

    init(in dir: TempDir, megabytes: Int = 64) throws {
        image = dir.file("disk.img")
        mountPoint = dir.file("disk")
        try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
        try #require(truncate2(image, megabytes << 20), "cannot create \(image)")
        try #require(run("/usr/sbin/mkfs.ext4", ["-q", "-F", image]) == 0, "mkfs.ext4 failed")
        try #require(run("/bin/mount", ["-o", "loop", image, mountPoint]) == 0, "needs root and a loop device to mount ext4")
    }

    func freeze() { frozen = run("/usr/sbin/fsfreeze", ["-f", mountPoint]) == 0 }
    func thaw() {
        if frozen { _ = run("/usr/sbin/fsfreeze", ["-u", mountPoint]) }
        frozen = false
    }

    deinit {
        thaw()
        _ = run("/bin/umount", ["-l", mountPoint])
    }

    private func truncate2(_ path: String, _ bytes: Int) -> Bool {
        FileManager.default.createFile(atPath: path, contents: nil) && truncate(path, off_t(bytes)) == 0
    }
}

@discardableResult
func run(_ exe: String, _ args: [String]) -> Int32 {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: exe)
    p.arguments = args
    p.standardOutput = FileHandle.nullDevice
    p.standardError = FileHandle.nullDevice
    guard (try? p.run()) != nil else { return -1 }
    p.waitUntilExit()
    return p.terminationStatus
}

/// Send one command with a client-side deadline: nil when no reply came in time.
/// (A ``step(_:within:context:_:)``: a reply that never comes does not keep it waiting.)
func send(_ c: RESPClient, _ args: [String], within: Duration) async -> RESPValue? {
    try? await step(args.joined(separator: " "), within: within) { try await c.send(args) }
}

struct StepTimedOut: Error, CustomStringConvertible {
    let step: String
    let limit: Duration
    let context: String
    var description: String { "no result within \(limit): \(step)\n\(context)" }
}

/// Run one step of a test with a deadline: past it, the test fails naming the step (a hung reply would otherwise
/// only show as the suite's time limit). The step itself is left running; it is not cancellable.
func step<T: Sendable>(_ what: String, within limit: Duration = .seconds(30), context: @escaping @Sendable () async -> String = { "" },
                       _ body: @escaping @Sendable () async throws -> T) async throws -> T {
    let once = ResumeOnce<T>()
    return try await withCheckedThrowingContinuation { (cont: CheckedContinuation<T, any Error>) in
        once.set(cont)
        Task { do { once.finish(.success(try await body())) } catch { once.finish(.failure(error)) } }
        Task {
            try? await Task.sleep(for: limit)
            if once.isPending { once.finish(.failure(StepTimedOut(step: what, limit: limit, context: await context()))) }
        }
    }
}

/// What a hung sidecar is doing, for a step's failure: its process state, `INFO` through a new connection,
/// where each of its threads is (gdb, when installed; the whole dump is kept in a file), and its log's end.
/// The threads of process `pid` (gdb), Swift frames of quotad's own modules and NIO only; the full dump is kept
/// in a file it names. Empty without gdb.
func threadStacks(_ pid: Int32) -> String {
    guard FileManager.default.isExecutableFile(atPath: "/usr/bin/gdb") else { return "" }
    let file = "/tmp/quotad-hang-\(pid)-\(UInt32.random(in: 0...UInt32.max)).txt"
    _ = run("/bin/sh", ["-c", "timeout 60 /usr/bin/gdb -p \(pid) -batch -ex 'thread apply all bt 40' > \(file) 2>&1"])
    let dump = (try? String(contentsOfFile: file, encoding: .utf8)) ?? ""
    let frames = dump.split(separator: "\n").filter {
        $0.hasPrefix("Thread") || $0.contains(" in $s") && ($0.contains("Quota") || $0.contains("NIO")) || $0.contains("rd_kafka")
    }
    return "\nthreads (full dump: \(file)):\n" + frames.prefix(150).map { String($0.prefix(220)) }.joined(separator: "\n")
}

func diagnose(_ q: Quotad, clients: [RESPClient] = []) async -> String {
    let pid = q.child.pid
    var out = "quotad pid \(pid): " + ((try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8))?
        .split(separator: "\n").filter { $0.hasPrefix("State") || $0.hasPrefix("Threads") }.joined(separator: "; ") ?? "?")
    let info = try? await step("INFO for a diagnosis", within: .seconds(3)) { () -> String in
        let c = try await RESPClient.connect(q.socket)
        defer { c.close() }
        return "\(try await c.send("INFO"))"
    }
    out += "\nINFO: " + (info.map { String($0.prefix(3000)) } ?? "no answer within 3 s")
    // Each connection's own state: bytes left undecoded, replies not flushed, places waiting, paused reads.
    let list = try? await step("CLIENT LIST for a diagnosis", within: .seconds(3)) { () -> String in
        let c = try await RESPClient.connect(q.socket)
        defer { c.close() }
        return "\(try await c.send("CLIENT", "LIST"))"
    }
    out += "\nCLIENT LIST: " + (list.map { String($0.prefix(3000)) } ?? "no answer within 3 s")
    for c in clients { out += "\n" + (await c.state()) }
    out += threadStacks(pid)
    // Whose side the bytes wait on: quotad's send queue, or this process's receive queue (unread replies).
    let sockets = "/tmp/sockets-\(pid)-\(UInt32.random(in: 0...UInt32.max)).txt"
    _ = run("/bin/sh", ["-c", "ss -xpn | grep -E 'pid=(\(pid)|\(getpid())),' > \(sockets) 2>&1"])
    out += "\nunix sockets of quotad and of this process (Recv-Q, Send-Q):\n"
        + ((try? String(contentsOfFile: sockets, encoding: .utf8)) ?? "").split(separator: "\n").prefix(60).joined(separator: "\n")
    if FileManager.default.isExecutableFile(atPath: "/usr/bin/gdb") {
        let file = "/tmp/tests-hang-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).txt"
        _ = run("/bin/sh", ["-c", "timeout 60 /usr/bin/gdb -p \(getpid()) -batch -ex 'thread apply all bt 30' > \(file) 2>&1"])
        out += "\nthis test process's threads: \(file)"
    }
    return out + "\nlog:\n" + String(q.allLogs.suffix(3000))
}

/// A continuation resumed by whichever comes first.
final class ResumeOnce<T: Sendable>: Sendable {
    private let pending = Mutex<CheckedContinuation<T, any Error>?>(nil)
    func set(_ c: CheckedContinuation<T, any Error>) { pending.withLock { $0 = c } }
    var isPending: Bool { pending.withLock { $0 != nil } }
    func finish(_ r: Result<T, any Error>) {
        pending.withLock { c in
            c?.resume(with: r)
            c = nil
        }
    }
}

func writeConfig(_ path: String, _ yaml: String) throws {
    try yaml.write(toFile: path, atomically: true, encoding: .utf8)
}

/// The prefix of this boot's claim ids (`region.host.boot.`) and the sequence number of `id`.
func claimIDParts(_ id: String) -> (prefix: String, seq: Int) {
    let i = id.lastIndex(of: ".")!
    return (String(id[...i]), Int(id[id.index(after: i)...], radix: 36) ?? -1)
}

/// Every fault path of issue 8, black-box against real servers; each ends with the audit.
@Suite("Token accounting under faults", .serialized, .timeLimit(.minutes(5)))
struct AccountingFaultTests {
    @Test func aSecondQuotadOnTheSameJournalOrSocketIsRefusedAndTheFirstKeepsServing() async throws {
        let redis = try await RedisServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "two", limit: 20, perUser: 0, totalLimit: 20, region: "sg")
        let a = try await Quotad(redis: redis, dir: dir, host: "host-a", durability: "journal")
        let c = try await RESPClient.connect(a.socket)
        #expect(try await c.send("CLAIM", "two", "u0").errorCode == nil)
        let base = "host_id: host-a\nregion: sg\nregions: { sg: { redis: \"\(redis.url)\" } }\ndurability: journal\n"
        // The same journal directory, another socket.
        try writeConfig(dir.file("b.yaml"), base + "socket: { path: \(dir.file("b.sock")) }\njournal: { dir: \(a.journalDir) }\n")
        let (stB, outB) = try await Quotad.refusedStart(config: dir.file("b.yaml"), log: dir.file("b.log"))
        #expect(stB != 0 && outB.contains("in use by another quotad"), "\(outB)")
        // The same socket, another journal directory.
        try writeConfig(dir.file("c.yaml"), base + "socket: { path: \(a.socket) }\njournal: { dir: \(dir.file("journal-c")) }\n")
        let (stC, outC) = try await Quotad.refusedStart(config: dir.file("c.yaml"), log: dir.file("c.log"))
        #expect(stC != 0 && outC.contains("socket.path"), "\(outC)")
        // The first one still answers on its socket and sells exactly the limit.
        let r = try await claimUntilSoldOut(c, voucher: "two", user: "u")
        #expect(r.ids.count == 19, "\(r.ids.count) more sold, \(r.errors)")
        c.close()
        #expect(try await a.stop() == 0)
        #expect(try await redis.audit("two", journals: [("host-a", a.journalDir)], netClaimed: 20) == [])
    }

    @Test func cancellingAPreviousRunsClaimWhileItsLeaseIsOpenGivesTheTokenBackExactlyOnce() async throws {
        let redis = try await RedisServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "rs", limit: 20, perUser: 0, totalLimit: 20, region: "sg")
        let lease = "lease: { min: 10, max: 10 }\n"
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a", extraYAML: lease, durability: "journal")
        var c = try await RESPClient.connect(q.socket)
        let id = try #require(try await c.send("CLAIM", "rs", "u1").string)
        c.close()
        try await q.kill9()
        // The restarted sidecar cannot return the previous run's lease yet (Redis is stopped) when the
        // claim is cancelled; then it crashes again.
        redis.child?.signal(SIGSTOP)
        try await q.restart()
        c = try await RESPClient.connect(q.socket)
        #expect(try await c.send("UNCLAIM", id) == .simpleString("OK"))
        c.close()
        try await q.kill9()
        redis.child?.signal(SIGCONT)
        // The third run returns the lease and restocks the cancellation: each token leaves the lease once.
        try await q.restart()
        try await eventually("the previous runs' lease is returned") { try await redis.account("rs").leases == 0 }
        try await eventually("the cancelled token is back") { try await redis.account("rs").pool == 20 }
        #expect(try await q.stop() == 0)
        let a = try await redis.account("rs")
        #expect(a.pool == 20 && a.restocked == 1, "pool \(a.pool), restocked \(a.restocked): nothing created, nothing lost")
        #expect(try await redis.audit("rs", journals: [("host-a", q.journalDir)], netClaimed: 0) == [])
    }

    @Test func cancellingAClaimAfterItsLeaseClosedInTheSameRunRestocksIt() async throws {
        let redis = try await RedisServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "ur", limit: 20, perUser: 0, totalLimit: 20, region: "sg")
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a",
                                 extraYAML: "lease: { min: 10, max: 10, idle_return_seconds: 0.3 }\n", durability: "journal")
        let c = try await RESPClient.connect(q.socket)
        let id = try #require(try await c.send("CLAIM", "ur", "u1").string)
        // Idle: the lease goes back (and closes) with 9 unserved tokens.
        try await eventually("the idle lease is returned") { try await redis.account("ur").leases == 0 }
        #expect(try await c.send("UNCLAIM", id) == .simpleString("OK"))
        try await eventually("the cancelled token is restocked through its lease") { try await redis.account("ur").pool == 20 }
        c.close()
        #expect(try await q.stop() == 0)
        let a = try await redis.account("ur")
        #expect(a.pool == 20 && a.restocked == 1, "pool \(a.pool), restocked \(a.restocked)")
        #expect(try await redis.audit("ur", journals: [("host-a", q.journalDir)], netClaimed: 0) == [])
    }

    @Test func aRequestIDRetriedAfterARestartNeverGetsAClaimThatWasCancelled() async throws {
        let kafka = try await KafkaBroker()
        let redis = try await RedisServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "rr", limit: 100, perUser: 0, totalLimit: 100, region: "sg")
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a", extraYAML: "limits: { claim_timeout_ms: 500 }\n",
                                 kafka: kafka, topic: "t-rr", durability: "kafka")
        var c = try await RESPClient.connect(q.socket)
        // The first acknowledgement (the topic is created) may take longer than 500 ms on a loaded machine;
        // a claim that timed out is cancelled, so trying again is safe.
        try await eventually("a first claim acknowledged in time", timeout: .seconds(30)) {
            try await c.send("CLAIM", "rr", "warm").errorCode == nil
        }
        kafka.child.signal(SIGSTOP)
        // Journaled, never acknowledged in time: answered UNAVAILABLE and cancelled in the journal.
        #expect(try await c.send("CLAIM", "rr", "alice", "REQ", "order-7").errorCode == "UNAVAILABLE")
        try await Task.sleep(for: .milliseconds(300))
        c.close()
        try await q.kill9()
        kafka.child.signal(SIGCONT)
        try await q.restart()
        c = try await RESPClient.connect(q.socket)
        var answer: String?
        try await eventually("the retry is answered", timeout: .seconds(20)) {
            let r = try await c.send("CLAIM", "rr", "alice", "REQ", "order-7")
            answer = r.errorCode == nil ? r.string : nil
            return answer != nil
        }
        c.close()
        #expect(try await q.stop() == 0)
        let s = try await streamed(kafka, topic: "t-rr")
        let id = try #require(answer)
        #expect(s.claimed.keys.contains(id) && !s.unclaimed.contains(id), "the answered claim stands on Kafka")
        #expect(try await redis.audit("rr", journals: [("host-a", q.journalDir)], netClaimed: s.net) == [])
    }

    @Test func aLeaseWrittenUnderDurabilityNoneIsNotReturnedOnTheJournalsWordAfterARestartInJournalMode() async throws {
        let redis = try await RedisServer()
        let dir = TempDir()
        let disk = try LoopDisk(in: dir)
        _ = try await redis.store.createVoucher(id: "dm", limit: 100, perUser: 0, totalLimit: 100, region: "sg")
        let jdir = disk.mountPoint + "/journal"
        let common = "host_id: host-a\nregion: sg\nregions: { sg: { redis: \"\(redis.url)\" } }\n"
            + "socket: { path: \(dir.file("a.sock")) }\njournal: { dir: \(jdir) }\nlease: { min: 50, max: 50 }\n"
        try writeConfig(dir.file("none.yaml"), common + "durability: none\n")
        try writeConfig(dir.file("journal.yaml"), common + "durability: journal\n")
        var p = try ChildProcess(Bin.path("quotad"), ["--config", dir.file("none.yaml")], log: dir.file("1.log"))
        try await eventually("quotad answers") { (try? await RESPClient.connect(dir.file("a.sock"))) != nil }
        let c = try await RESPClient.connect(dir.file("a.sock"))
        var answered = 0
        if try await c.send("CLAIM", "dm", "first").errorCode == nil { answered += 1 }
        // durability: none answers before the journal writes: with the disk frozen, answered claims never reach it.
        disk.freeze()
        for i in 0..<20 where try await c.send("CLAIM", "dm", "u\(i)").errorCode == nil { answered += 1 }
        c.close()
        // The kill lands when the blocked write returns: the one batch it was writing reaches the disk, the
        // claims queued behind it in memory do not.
        p.signal(SIGKILL)
        disk.thaw()
        _ = try await p.wait()
        #expect(answered == 21)
        p = try ChildProcess(Bin.path("quotad"), ["--config", dir.file("journal.yaml")], log: dir.file("2.log"))
        try await eventually("quotad answers again") { (try? await RESPClient.connect(dir.file("a.sock"))) != nil }
        try await Task.sleep(for: .seconds(1))
        p.signal(SIGTERM)
        #expect(try await p.wait() == 0)
        let a = try await redis.account("dm")
        // Never created: the lease's served count in the journal is too low, so it must not be returned on it.
        #expect(a.pool + answered <= 100, "pool \(a.pool) + \(answered) answered claims > limit 100: quota created")
        #expect(p.output.contains("not returned on the journal's word"), "\(p.output)")
        #expect(try await redis.audit("dm") == [])
    }

    @Test func aKafkaModeClaimThatTimedOutIsNeverInTheUnclaimBook() async throws {
        let kafka = try await KafkaBroker()
        let redis = try await RedisServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "kt", limit: 100, perUser: 0, totalLimit: 100, region: "sg")
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a", extraYAML: "limits: { claim_timeout_ms: 500 }\n",
                                 kafka: kafka, topic: "t-kt", durability: "kafka")
        let c = try await RESPClient.connect(q.socket)
        var firstReply: RESPValue = .null
        try await eventually("a first claim acknowledged in time", timeout: .seconds(30)) {
            firstReply = try await c.send("CLAIM", "kt", "u1")
            return firstReply.errorCode == nil
        }
        let first = try #require(firstReply.string)
        kafka.child.signal(SIGSTOP)
        let t0 = ContinuousClock.now
        // Kafka stays stopped until after this answer: any answer shows the claim did not wait for it. The
        // deadline (20x the claim timeout) is for a loaded box: 2.2 s was seen with every suite running at once
        // here, 3.16 s in CI.
        let late = try await step("the claim past its timeout", within: .seconds(10)) { try await c.send("CLAIM", "kt", "u2") }
        #expect(late.errorCode == "UNAVAILABLE", "\(late)")
        #expect(ContinuousClock.now - t0 < .seconds(10))
        kafka.child.signal(SIGCONT)
        try await eventually("Kafka has everything", timeout: .seconds(30)) { try await q.stat("journal_unshipped_claims") == 0 }
        // The timed-out claim's id is guessable: it must not be cancellable (its token already went back).
        let (prefix, seq) = claimIDParts(first)
        let guessed = prefix + String(seq + 1, radix: 36)
        let u = try await c.send("UNCLAIM", guessed)
        #expect(u.errorCode == "ERR" && u.string?.contains("unknown claim id") == true, "\(u)")
        c.close()
        #expect(try await q.stop() == 0)
        let s = try await streamed(kafka, topic: "t-kt")
        #expect(s.claimed.keys.contains(guessed) && s.unclaimed.contains(guessed), "the stream nets the timed-out claim to zero")
        #expect(s.net == 1)
        let a = try await redis.account("kt")
        #expect(a.pool + s.net == 100, "pool \(a.pool) + net \(s.net)")
        #expect(try await redis.audit("kt", journals: [("host-a", q.journalDir)], netClaimed: s.net) == [])
    }

    @Test func aLeaseWhoseReplyWasLostIsLearnedByItsRequestIDNotLeftOutstanding() async throws {
        let redis = try await RedisServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "ll", limit: 50, perUser: 0, totalLimit: 50, region: "sg")
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a",
                                 extraYAML: "redis_timeout_ms: 200\nlease: { min: 1, max: 1 }\n", durability: "journal")
        let c = try await RESPClient.connect(q.socket)
        // Leases of one token: every claim asks Redis, so the stall below meets a lease request for sure.
        #expect(try await c.send("CLAIM", "ll", "warm").errorCode == nil, "scripts loaded, a lease held")
        // Redis sleeps while a claim needs a lease: the lease request times out, and Redis executes it
        // afterwards. Again (at most 5 times) until a lease request did time out: on a loaded machine the
        // first stall can pass before the claim reaches Redis.
        var early = 0
        for _ in 0..<5 where !q.allLogs.contains("Redis did not answer") {
            redis.stall(2.5)
            try await Task.sleep(for: .milliseconds(100))
            if try await c.send("CLAIM", "ll", "e\(early)").errorCode == nil { early += 1 }
            try await Task.sleep(for: .milliseconds(2500))
        }
        let r = try await claimUntilSoldOut(c, voucher: "ll", user: "u", maxUnavailable: 10_000)
        c.close()
        #expect(r.ids.count + early == 49, "sold \(r.ids.count) + \(early) + 1 of 50: \(r.errors)")
        #expect(try await q.stop() == 0)
        #expect(q.allLogs.contains("Redis did not answer"), "the stall did hit a lease request")
        let a = try await redis.account("ll")
        #expect(a.leases == 0 && a.pool == 0, "\(a.leases) lease(s) left open, pool \(a.pool)")
        #expect(try await redis.audit("ll", journals: [("host-a", q.journalDir)], netClaimed: 50) == [])
    }

    @Test func aPerUserCheckWhoseReplyWasLostIsAskedAgainNotLeaked() async throws {
        let redis = try await RedisServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "pl", limit: 100, perUser: 1, totalLimit: 100, region: "sg")
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a",
                                 extraYAML: "redis_timeout_ms: 200\nlimits: { claim_timeout_ms: 3000 }\n", durability: "journal")
        let c = try await RESPClient.connect(q.socket)
        #expect(try await c.send("CLAIM", "pl", "warm").errorCode == nil, "a lease is held: only the check needs Redis")
        redis.stall(0.8)
        try await Task.sleep(for: .milliseconds(100))
        let r = try await c.send("CLAIM", "pl", "bob")
        let bobHas = r.errorCode == nil ? 1 : 0
        // A claim given up releases its count in the background: give it a moment.
        try await eventually("Redis counts what bob holds (\(bobHas), \(r))") {
            try await redis.store.userCount(voucher: "pl", user: "bob", groups: 64) == bobHas
        }
        let again = try await c.send("CLAIM", "pl", "bob")
        #expect(bobHas == 1 ? again.errorCode == "USERLIMIT" : again.errorCode == nil, "\(again)")
        c.close()
        #expect(try await q.stop() == 0)
        #expect(try await redis.audit("pl", journals: [("host-a", q.journalDir)]) == [])
    }

    @Test func aStalledJournalDiskAnswersUnavailableWithinTheClaimTimeoutAndTheTokenIsNeverCountedTwice() async throws {
        let redis = try await RedisServer()
        let dir = TempDir()
        let disk = try LoopDisk(in: dir)
        _ = try await redis.store.createVoucher(id: "sd", limit: 100, perUser: 0, totalLimit: 100, region: "sg")
        let jdir = disk.mountPoint + "/journal"
        try writeConfig(dir.file("q.yaml"), "host_id: host-a\nregion: sg\nregions: { sg: { redis: \"\(redis.url)\" } }\n"
            + "socket: { path: \(dir.file("a.sock")) }\ndurability: journal\njournal: { dir: \(jdir) }\n"
            + "limits: { claim_timeout_ms: 500 }\n")
        let p = try ChildProcess(Bin.path("quotad"), ["--config", dir.file("q.yaml")], log: dir.file("q.log"))
        try await eventually("quotad answers") { (try? await RESPClient.connect(dir.file("a.sock"))) != nil }
        let c = try await RESPClient.connect(dir.file("a.sock"))
        var ok = 0
        if try await c.send("CLAIM", "sd", "warm").errorCode == nil { ok += 1 }
        disk.freeze()
        let t0 = ContinuousClock.now
        let stalled = await send(c, ["CLAIM", "sd", "during"], within: .seconds(3))
        let waited = ContinuousClock.now - t0
        disk.thaw()
        #expect(stalled?.errorCode == "UNAVAILABLE", "\(String(describing: stalled)) after \(waited)")
        #expect(waited < .milliseconds(1500), "answered within the claim timeout, not when the disk came back")
        try await eventually("claims are served again") { try await c.send("CLAIM", "sd", "after").errorCode == nil }
        ok += 1
        c.close()
        p.signal(SIGTERM)
        #expect(try await p.wait() == 0)
        // The stalled claim became durable once the disk thawed; it was cancelled in the journal, and its
        // token went back to its lease once, so the books balance with only the answered claims.
        let rec = JournalRecovery.read(dir: jdir)
        let net = rec.history.reduce(0) { $0 + ($1.kind == .claimed ? $1.qty : -$1.qty) }
        #expect(net == ok, "journal nets to \(net), \(ok) claims were answered")
        let a = try await redis.account("sd")
        #expect(a.pool + ok == 100 && a.leases == 0, "pool \(a.pool) + \(ok) answered")
        #expect(try await redis.audit("sd", journals: [("host-a", jdir)], netClaimed: ok) == [])
    }

    @Test func shutdownWaitsForClaimsInFlightAndLeavesNoCountOrTokenBehind() async throws {
        let redis = try await RedisServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "sh", limit: 1000, perUser: 1, totalLimit: 1000, region: "sg")
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a",
                                 extraYAML: "redis_timeout_ms: 300\nlimits: { claim_timeout_ms: 3000 }\n", durability: "journal")
        let c = try await RESPClient.connect(q.socket)
        #expect(try await c.send("CLAIM", "sh", "warm").errorCode == nil)
        redis.stall(1.0)
        try await Task.sleep(for: .milliseconds(100))
        let users = (0..<30).map { "user-\($0)" }
        let inFlight = Task { try await c.pipeline(users.map { ["CLAIM", "sh", $0] }) }
        try await Task.sleep(for: .milliseconds(200))
        q.child.signal(SIGTERM)
        #expect(try await q.child.wait() == 0)
        let replies = (try? await inFlight.value) ?? []
        c.close()
        var holders = Set<String>()
        for (u, r) in zip(users, replies) where r.errorCode == nil { holders.insert(u) }
        for u in users {
            let n = try await redis.store.userCount(voucher: "sh", user: u, groups: 64)
            #expect(n == (holders.contains(u) ? 1 : 0), "\(u): counted \(n), holds \(holders.contains(u) ? 1 : 0)")
        }
        let a = try await redis.account("sh")
        #expect(a.leases == 0 && a.pool + holders.count + 1 == 1000, "pool \(a.pool), \(holders.count) + 1 held")
        #expect(q.allLogs.contains("all unused tokens returned"), "the exit log says nothing was left")
        #expect(try await redis.audit("sh", journals: [("host-a", q.journalDir)], netClaimed: holders.count + 1) == [])
    }

    @Test func aRedisThatIsNotDurableIsRefusedAtStartNamingTheSetting() async throws {
        let redis = try await RedisServer(durable: false)
        let dir = TempDir()
        try writeConfig(dir.file("q.yaml"), "host_id: host-a\nregion: sg\nregions: { sg: { redis: \"\(redis.url)\" } }\n"
            + "socket: { path: \(dir.file("a.sock")) }\ndurability: none\n")
        let (st, out) = try await Quotad.refusedStart(config: dir.file("q.yaml"), log: dir.file("q.log"))
        #expect(st != 0)
        #expect(out.contains("redis.require_durable") && out.contains("appendonly"), "\(out)")
    }

    @Test func aRedisThatForgetsMakesEverySidecarFailClosedEvenAfterTheVoucherIsCreatedAgain() async throws {
        let redis = try await RedisServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "rf", limit: 1000, perUser: 0, totalLimit: 1000, region: "sg")
        let a = try await Quotad(redis: redis, dir: dir, host: "host-a", durability: "journal")
        let b = try await Quotad(redis: redis, dir: dir, host: "host-b", durability: "journal")
        let ca = try await RESPClient.connect(a.socket)
        let cb = try await RESPClient.connect(b.socket)
        for i in 0..<5 {
            #expect(try await ca.send("CLAIM", "rf", "a\(i)").errorCode == nil)
            #expect(try await cb.send("CLAIM", "rf", "b\(i)").errorCode == nil)
        }
        // A failover to an empty replica, or a restart without the AOF: Redis forgot the voucher and its leases.
        try await redis.restartEmpty()
        try await eventually("both sidecars see the region lost") {
            let la = try await a.stat("region_lost")
            let lb = try await b.stat("region_lost")
            return la == 1 && lb == 1
        }
        func codes(_ n: Int) async throws -> [String: Int] {
            var out: [String: Int] = [:]
            for i in 0..<n {
                for c in [ca, cb] { out[try await c.send("CLAIM", "rf", "x\(i)").errorCode ?? "OK", default: 0] += 1 }
            }
            return out
        }
        #expect(try await codes(20) == ["UNAVAILABLE": 40], "fail closed: never NOVOUCHER, never a claim")
        // An operator creates the voucher again: the sidecars still must not sell it on top of what they sold.
        let (st, out) = try await quotactl(["voucher", "create", "rf", "--limit", "1000", "--redis", redis.url])
        #expect(st == 0, "\(out)")
        try await Task.sleep(for: .seconds(2))
        #expect(try await codes(20) == ["UNAVAILABLE": 40])
        ca.close()
        cb.close()
        #expect(try await a.stop() == 0)
        #expect(try await b.stop() == 0)
        let acct = try await redis.account("rf")
        #expect(acct.pool == 1000 && acct.leased == 0, "nothing returned into, or taken from, the new generation")
        #expect(try await redis.audit("rf") == [])
    }

    @Test func kafkaModeResumesByItselfAfterTheBrokerRestartsWithoutItsState() async throws {
        let kafka = try await KafkaBroker()
        let redis = try await RedisServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "kb", limit: 10_000, perUser: 0, totalLimit: 10_000, region: "sg")
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a", extraYAML: "limits: { claim_timeout_ms: 1000 }\n",
                                 kafka: kafka, topic: "t-kb", durability: "kafka")
        let c = try await RESPClient.connect(q.socket)
        var answered = 0
        for i in 0..<10 where try await c.send("CLAIM", "kb", "u\(i)").errorCode == nil { answered += 1 }
        #expect(answered == 10)
        try await kafka.restartEmpty()
        var after: [String] = []
        try await eventually("kafka mode serves again", timeout: .seconds(60)) {
            if let id = try await c.send("CLAIM", "kb", "again").string, !id.hasPrefix("UNAVAILABLE") {
                after.append(id)
                return true
            }
            return false
        }
        for i in 0..<10 {
            if case .bulkString(let b?) = try await c.send("CLAIM", "kb", "v\(i)") { after.append(String(buffer: b)) }
        }
        c.close()
        #expect(try await q.stop() == 0)
        let s = try await streamed(kafka, topic: "t-kb")
        #expect(Set(after).isSubset(of: Set(s.claimed.keys)), "every claim answered after the restart is on the new broker")
        let a = try await redis.account("kb")
        #expect(a.pool + answered + after.count == 10_000)
        #expect(try await redis.audit("kb", journals: [("host-a", q.journalDir)], netClaimed: answered + after.count) == [])
    }

    @Test func aCleanStopRecordsWhatKafkaAcknowledgedSoARestartShipsNothingAgain() async throws {
        let kafka = try await KafkaBroker()
        let redis = try await RedisServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "cs", limit: 5000, perUser: 0, totalLimit: 5000, region: "sg")
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a", kafka: kafka, topic: "t-cs")
        let c = try await RESPClient.connect(q.socket)
        var ids: [String] = []
        for chunk in 0..<50 {
            let replies = try await c.pipeline((0..<20).map { ["CLAIM", "cs", "u\(chunk)-\($0)"] })
            ids += replies.compactMap(\.string)
        }
        c.close()
        #expect(ids.count == 1000)
        #expect(try await q.stop() == 0)
        try await q.restart()
        #expect(try await q.stop() == 0)
        let s = try await streamed(kafka, topic: "t-cs")
        #expect(s.claimed.count == 1000)
        let resent = s.claimed.values.filter { $0.count > 1 }.count
        #expect(resent == 0, "\(resent) claims shipped again after a clean stop")
        #expect(try await redis.audit("cs", journals: [("host-a", q.journalDir)], netClaimed: 1000) == [])
        let (st, out) = try await quotactl(["audit", "cs", "--redis", redis.url, "--journal", q.journalDir])
        #expect(st == 0 && out.contains("balanced"), "\(out)")
    }
}

@Suite("A test step's deadline")
struct StepDeadlineTests {
    @Test func aStepPastItsDeadlineFailsNamingItselfAndAQuickOneReturnsItsValue() async throws {
        await #expect(throws: StepTimedOut.self) {
            _ = try await step("a reply that never comes", within: .milliseconds(100), context: { "the log" }) {
                try await Task.sleep(for: .seconds(3))
                return 1
            }
        }
        #expect(try await step("a quick one") { 42 } == 42)
    }
}
