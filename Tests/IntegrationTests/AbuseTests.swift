import Foundation
import Glibc
import NIOCore
import QuotaClient
import QuotaHarness
import QuotaRESP
import QuotaRedis
import Synchronization
import Testing

/// A raw Unix-socket peer that does exactly what a test says (and nothing a client library would do).
final class RawPeer: @unchecked Sendable {
    let fd: Int32

    init(_ path: String) throws {
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            let b = Array(path.utf8)
            p.copyBytes(from: b.prefix(p.count - 1))
            p[min(b.count, p.count - 1)] = 0
        }
        let ok = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard ok == 0 else {
            close(fd)
            throw TestError.failed("connect \(path): \(String(cString: strerror(errno)))")
        }
    }

    func nonBlocking() { _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) }

    /// Blocking reads give up after `seconds`.
    func receiveTimeout(_ seconds: Int) {
        var tv = timeval(tv_sec: seconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    /// Bytes taken by the socket (0 when it would block, -1 on error).
    func send(_ bytes: ArraySlice<UInt8>) -> Int {
        let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        if n < 0 { return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -1 }
        return n
    }

    func sendAll(_ s: String) {
        var b = ArraySlice(Array(s.utf8))
        while !b.isEmpty {
            let n = send(b)
            if n < 0 { return }
            b = b.dropFirst(n)
        }
    }

    /// Bytes read (0 when none are there, -1 at EOF or on error).
    func receive(_ buf: inout [UInt8]) -> Int {
        let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n < 0 { return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -1 }
        return n == 0 ? -1 : n
    }

    /// One reply line (blocking reads, up to `\r\n`).
    func line() -> String {
        var out: [UInt8] = []
        var c: UInt8 = 0
        while read(fd, &c, 1) == 1 {
            if c == 10 { break }
            if c != 13 { out.append(c) }
        }
        return String(decoding: out, as: UTF8.self)
    }

    deinit { close(fd) }
}

/// Resident memory of a process, bytes (VmRSS in /proc/PID/status).
func residentBytes(_ pid: Int32) -> Int {
    guard let text = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return 0 }
    for line in text.split(separator: "\n") where line.hasPrefix("VmRSS:") {
        return (Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0) * 1024
    }
    return 0
}

func percentile(_ xs: [Duration], _ p: Double) -> Duration {
    let s = xs.sorted()
    return s.isEmpty ? .zero : s[min(s.count - 1, Int(Double(s.count) * p))]
}

func ms(_ d: Duration) -> Double { Double(d.components.seconds) * 1000 + Double(d.components.attoseconds) / 1e15 }

/// One RESP frame of raw byte arguments.
func frame(_ args: [[UInt8]]) -> ByteBuffer {
    var b = ByteBuffer()
    b.writeString("*\(args.count)\r\n")
    for a in args {
        b.writeString("$\(a.count)\r\n")
        b.writeBytes(a)
        b.writeString("\r\n")
    }
    return b
}

@Suite("Bounded under abuse (issue 15)", .serialized, .timeLimit(.minutes(5)))
struct AbuseTests {
    /// A sidecar (durability none unless told) with a voucher that has stock (`v1`).
    func sidecar(_ extraYAML: String = "", durability: String? = nil, perUser: Int = 0) async throws -> (RedisServer, Quotad) {
        let redis = try await RedisServer()
        _ = try await redis.store.createVoucher(id: "v1", limit: 1_000_000, perUser: perUser, totalLimit: 1_000_000, region: "sg")
        let q = try await Quotad(redis: redis, dir: redis.dir, host: "host-a", extraYAML: extraYAML, durability: durability)
        return (redis, q)
    }

    /// `n` unpipelined claims on `c`: each one's latency.
    func claimLatencies(_ c: RESPClient, n: Int, tag: String) async throws -> [Duration] {
        var out: [Duration] = []
        out.reserveCapacity(n)
        for i in 0..<n {
            let t0 = ContinuousClock.now
            let r = try await c.send("CLAIM", "v1", "\(tag)-\(i)")
            out.append(ContinuousClock.now - t0)
            #expect(r.string?.hasPrefix("sg.host-a.") == true, "claim \(i) under \(tag): \(r)")
        }
        return out
    }

    // MARK: - 1. Output back-pressure

    @Test func aPeerPipeliningAMillionINFOWithoutReadingCannotGrowMemoryOrStallOthers() async throws {
        let (redis, q) = try await sidecar()
        let pid = q.child.pid
        let claimer = try await RESPClient.connect(q.socket)
        defer { claimer.close() }
        _ = try await claimLatencies(claimer, n: 200, tag: "warm")
        let idle = try await claimLatencies(claimer, n: 1000, tag: "idle")
        let rss0 = residentBytes(pid)

        // Phase A: pipeline 1,000,000 INFO and read nothing.
        let flooder = try RawPeer(q.socket)
        flooder.nonBlocking()
        let one = Array("*1\r\n$4\r\nINFO\r\n".utf8)
        var chunk: [UInt8] = []
        for _ in 0..<4096 { chunk += one }
        let total = 1_000_000 * one.count
        var offset = 0
        var lastProgress = ContinuousClock.now
        var peak = rss0
        let abortAt = rss0 + (512 << 20)
        while offset < total, ContinuousClock.now - lastProgress < .seconds(3), peak < abortAt {
            let from = offset % chunk.count
            let n = flooder.send(chunk[from..<min(chunk.count, from + (total - offset))])
            if n > 0 {
                offset += n
                lastProgress = .now
            } else {
                #expect(n == 0, "the flooder's connection failed")
                if n < 0 { break }
                try await Task.sleep(for: .milliseconds(20))
                peak = max(peak, residentBytes(pid))
            }
        }
        peak = max(peak, residentBytes(pid))
        let accepted = offset / one.count
        let info = try await q.info()
        print("abuse: quotad took \(accepted) of 1,000,000 INFO before it stopped reading; RSS \(rss0 >> 20) MiB -> peak "
              + "\(peak >> 20) MiB; connections_paused \(info["connections_paused"] ?? "?"), output_bytes_pending "
              + "\(info["output_bytes_pending"] ?? "?")")
        #expect(accepted < 1_000_000, "quotad stopped reading a peer that reads nothing")
        #expect(peak - rss0 < 64 << 20, "RSS grew by \((peak - rss0) >> 20) MiB (bound: 64 MiB)")
        #expect(info["connections_paused"] == "1", "\(info["connections_paused"] ?? "nil")")
        let pending = Int(info["output_bytes_pending"] ?? "") ?? -1
        #expect(pending >= 512 << 10 && pending <= 4 << 20, "output_bytes_pending \(pending)")
        #expect(info["max_output_bytes"] == "\(1 << 20)")

        // Meanwhile another peer is served as if nothing happened.
        let paused = try await claimLatencies(claimer, n: 1000, tag: "paused")

        // Phase B: the flooder reads as fast as it can and keeps sending the rest; quotad serves it flat out.
        final class Shared: Sendable {
            let stop = Atomic<Bool>(false)
            let received = Atomic<Int>(0)
            let sent = Atomic<Int>(0)
            let done = Atomic<Bool>(false)
        }
        let shared = Shared()
        shared.sent.store(offset, ordering: .relaxed)
        let thread = Thread { [chunk, shared] in
            var buf = [UInt8](repeating: 0, count: 1 << 16)
            var off = shared.sent.load(ordering: .relaxed)
            while !shared.stop.load(ordering: .relaxed) {
                var idle = true
                let r = flooder.receive(&buf)
                if r < 0 { break }
                if r > 0 {
                    shared.received.add(r, ordering: .relaxed)
                    idle = false
                }
                if off < total {
                    let from = off % chunk.count
                    let n = flooder.send(chunk[from..<min(chunk.count, from + (total - off))])
                    if n < 0 { break }
                    if n > 0 {
                        off += n
                        idle = false
                    }
                }
                if idle { usleep(200) }
            }
            shared.sent.store(off, ordering: .relaxed)
            shared.done.store(true, ordering: .relaxed)
        }
        thread.start()
        try await Task.sleep(for: .milliseconds(300))
        let loaded = try await claimLatencies(claimer, n: 1000, tag: "loaded")
        let rssB = residentBytes(pid)
        shared.stop.store(true, ordering: .relaxed)
        try await eventually("the flooder thread ends") { shared.done.load(ordering: .relaxed) }
        let served = shared.received.load(ordering: .relaxed)
        print("abuse: claim latency p50/p99/max ms: idle \(ms(percentile(idle, 0.5)))/\(ms(percentile(idle, 0.99)))/"
              + "\(ms(percentile(idle, 1))), flooder paused \(ms(percentile(paused, 0.5)))/\(ms(percentile(paused, 0.99)))/"
              + "\(ms(percentile(paused, 1))), flooder reading \(ms(percentile(loaded, 0.5)))/\(ms(percentile(loaded, 0.99)))/"
              + "\(ms(percentile(loaded, 1))); flooder got \(served >> 20) MiB of INFO replies; RSS \(rssB >> 20) MiB")
        #expect(served > 1 << 20, "the flooder's replies kept coming once it read")
        #expect(rssB - rss0 < 64 << 20, "RSS while serving the flooder grew by \((rssB - rss0) >> 20) MiB")
        // Latency: the contract is "bounded and serving" on this noisy 2-core box (debug build, the flooder,
        // quotad and this test share the cores); the figures are printed above.
        // A paused flooder costs quotad nothing, but a 1 ms scheduling hiccup on a shared CI core is 5x an idle
        // p99 here, so the unit test holds the same absolute bound as the loaded phase; the ratio is measured
        // in a release build and kept in the README (bounds under abuse), not asserted by a timed unit test.
        #expect(percentile(paused, 0.99) < .milliseconds(250),
                "p99 while a flooder is paused: \(percentile(paused, 0.99)) (idle \(percentile(idle, 0.99)))")
        #expect(percentile(loaded, 0.99) < .milliseconds(250), "p99 while the flooder is served: \(percentile(loaded, 0.99))")
        withExtendedLifetime(flooder) {}
        #expect(try await q.stop() == 0)
        withExtendedLifetime(redis) {}
    }

    @Test func pendingRepliesReadyAtOnceCountAgainstThePendingBound() async throws {
        // A tiny pending bound and a tiny output bound: a pipelined burst of PINGs and claims is answered in
        // full and in order (reading pauses and resumes), never dropped or reordered.
        let (redis, q) = try await sidecar("limits: { max_pending_per_connection: 4, max_output_bytes: 4096 }\n",
                                           durability: "journal")
        let c = try await RESPClient.connect(q.socket)
        defer { c.close() }
        var cmds: [[String]] = []
        for i in 0..<3000 {
            switch i % 3 {
            case 0: cmds.append(["PING", "p\(i)"])
            case 1: cmds.append(["CLAIM", "v1", "u\(i)"])
            default: cmds.append(["INFO", "server"])
            }
        }
        let r = try await c.pipeline(cmds)
        #expect(r.count == 3000)
        for i in stride(from: 0, to: 3000, by: 3) {
            #expect(r[i].string == "p\(i)", "reply \(i) in order: \(r[i])")
            #expect(r[i + 1].string?.hasPrefix("sg.host-a.") == true, "\(r[i + 1])")
            #expect(r[i + 2].string?.contains("quotad_version") == true)
        }
        let info = try await q.info()
        #expect((Int(info["backpressure_pauses"] ?? "") ?? 0) > 0, "reading paused on the way")
        #expect(info["connections_paused"] == "0")
        #expect(try await q.stop() == 0)
        #expect(try await redis.audit("v1", journals: [(q.host, q.journalDir)], netClaimed: 1000).isEmpty)
    }

    /// Claims read together are handled as a run (issue 13), and the run counts toward the pending bound:
    /// with Redis stalled under a per-user check, a client that pipelines 100 claims and reads nothing has
    /// at most `max_pending_per_connection` of them in flight (a run of 64 went past it; helper finding).
    @Test func aRunOfPipelinedClaimsStaysWithinThePendingBound() async throws {
        let (redis, q) = try await sidecar("limits: { max_pending_per_connection: 4 }\n", durability: "journal", perUser: 5)
        let c = try await RESPClient.connect(q.socket)
        defer { c.close() }
        #expect(try await c.send("CLAIM", "v1", "warm").errorCode == nil, "loaded, scripts in place")
        let peer = try RawPeer(q.socket)
        defer { close(peer.fd) }
        redis.stall(3)
        try await Task.sleep(for: .milliseconds(200))
        peer.sendAll((0..<100).map { "*3\r\n$5\r\nCLAIM\r\n$2\r\nv1\r\n$\("u\($0)".utf8.count)\r\nu\($0)\r\n" }.joined())
        var most = 0
        for _ in 0..<10 {
            try await Task.sleep(for: .milliseconds(150))
            let line = try await c.send("INFO", "vouchers").string ?? ""
            let field = { (k: String) in Int(line.components(separatedBy: k + "=").dropFirst().first?.prefix { $0.isNumber } ?? "") ?? 0 }
            most = max(most, field("inflight") + field("parked"))
        }
        #expect(most > 0, "the claims were read")
        #expect(most <= 4, "claims in flight for one connection: \(most), bound 4")
        #expect(try await q.stop() == 0)
    }

    // MARK: - 2. Unknown vouchers and idle runtimes

    @Test func aHundredThousandUnknownVouchersTakeNoSlotAndARealClaimIsServed() async throws {
        let (redis, q) = try await sidecar("limits: { max_vouchers: 1000 }\n")
        let c = try await RESPClient.connect(q.socket)
        defer { c.close() }
        var novoucher = 0
        var other: [String] = []
        for batch in stride(from: 0, to: 100_000, by: 500) {
            let cmds = (batch..<batch + 500).map { i in i % 2 == 0 ? ["AVAIL", "nope-\(i)"] : ["CLAIM", "nope-\(i)", "u", "REQ", "r\(i)"] }
            for r in try await c.pipeline(cmds) {
                if r.errorCode == "NOVOUCHER" { novoucher += 1 } else if other.count < 5 { other.append("\(r)") }
            }
        }
        #expect(novoucher == 100_000, "every unknown voucher answered NOVOUCHER: \(other)")
        let r = try await c.send("CLAIM", "v1", "real-user")
        #expect(r.string?.hasPrefix("sg.host-a.") == true, "a real voucher is served after the flood: \(r)")
        let info = try await q.info()
        let tracked = Int(info["vouchers_tracked"] ?? "") ?? -1
        print("abuse: after 100,000 unknown vouchers: vouchers_tracked \(tracked), evicted \(info["vouchers_evicted"] ?? "?"), "
              + "unknown cached \(info["unknown_vouchers_cached"] ?? "?"), dedupe_entries \(info["dedupe_entries"] ?? "?")")
        #expect(tracked >= 1 && tracked <= 5, "tracked vouchers stay few: \(tracked)")
        #expect(info["dedupe_entries"] == "0", "a NOVOUCHER answer keeps no REQ entry")
        let cached = Int(info["unknown_vouchers_cached"] ?? "") ?? -1
        #expect(cached >= 0 && cached <= 10_000)
        // Asked again within a second: answered from memory, without Redis.
        let before = Int(info["redis_commands"] ?? "") ?? 0
        let again = try await c.pipeline((0..<200).map { ["AVAIL", "repeat-\($0 % 20)"] })
        #expect(again.allSatisfy { $0.errorCode == "NOVOUCHER" })
        let after = try await q.stat("redis_commands")
        #expect(after - before < 60, "20 unknown ids asked 10 times each: \(after - before) Redis commands")
        #expect(try await q.stop() == 0)
        withExtendedLifetime(redis) {}
    }

    @Test func anIdleVoucherIsDroppedAfterItsStockWentBackAndComesBackOnDemand() async throws {
        let (redis, q) = try await sidecar("lease: { idle_return_seconds: 0.5 }\nclaims: { dedupe_window_seconds: 1 }\n",
                                           durability: "journal")
        let c = try await RESPClient.connect(q.socket)
        defer { c.close() }
        let id = try #require(try await c.send("CLAIM", "v1", "u1", "REQ", "first").string)
        #expect(try await q.stat("vouchers_tracked") == 1)
        try await eventually("the idle voucher is dropped", timeout: .seconds(15)) {
            try await q.stat("vouchers_tracked") == 0
        }
        #expect(try await q.stat("vouchers_evicted") >= 1)
        #expect(try await q.stat("claims_ok") == 1, "counters of a dropped voucher are kept")
        let a = try await redis.account("v1")
        #expect(a.leases == 0 && a.pool == 1_000_000 - 1, "its stock went back first: \(a)")
        // It comes back on demand: a cancellation of its claim, then claims again.
        #expect(try await c.send("UNCLAIM", id) == .simpleString("OK"))
        let again = try await c.send("CLAIM", "v1", "u2", "REQ", "first")
        #expect(again.string?.hasPrefix("sg.host-a.") == true && again.string != id,
                "the window of 'first' has passed: answered as new")
        try await eventually("the cancellation's restock lands") { try await q.stat("background_jobs") == 0 }
        // Its tokens went back through the (closed) lease; the restock marker set expires by itself.
        let ttl = try await redis.command("PTTL", "quota:{v1}:restocked").int ?? -3
        #expect(ttl > 0 && ttl <= 86_400_000, "quota:{v1}:restocked PTTL \(ttl)")
        #expect(try await q.stop() == 0)
        #expect(try await redis.audit("v1", journals: [(q.host, q.journalDir)], netClaimed: 1).isEmpty)
    }

    // MARK: - 3. Connections

    @Test func aThousandIdleConnectionsFromOnePeerCannotLockOthersOut() async throws {
        let (redis, q) = try await sidecar("limits: { max_connections: 100 }\n")
        let pid = q.child.pid
        let rss0 = residentBytes(pid)
        var peers: [RawPeer] = []
        for _ in 0..<1000 { peers.append(try RawPeer(q.socket)) }
        var ok: [RawPeer] = []
        var busy = 0
        for p in peers {
            p.receiveTimeout(10)
            p.sendAll("PING\r\n")
            let l = p.line()
            if l == "+PONG" { ok.append(p) } else if l.hasPrefix("-BUSY") { busy += 1 }
        }
        #expect(ok.count == 100 && busy == 900, "\(ok.count) served, \(busy) told BUSY")
        let rss1 = residentBytes(pid)
        // A new peer is told BUSY; the held connections keep working.
        let late = try await RESPClient.connect(q.socket)
        let r = try await late.send("CLAIM", "v1", "late")
        #expect(r.errorCode == "BUSY" && r.errorMessage?.contains("max_connections") == true, "\(r)")
        late.close()
        for (i, p) in ok.enumerated() where i % 10 == 0 {
            p.sendAll("*3\r\n$5\r\nCLAIM\r\n$2\r\nv1\r\n$\(String(i).count + 1)\r\nh\(i)\r\n")
            #expect(p.line().hasPrefix("$"), "held connection \(i) claims")
            _ = p.line()
        }
        // Refused connections are closed by quotad; the held ones stay (and keep others out).
        try await eventually("refused connections are closed", timeout: .seconds(20)) {
            ok[0].sendAll("INFO limits\r\n")
            var text = ""
            let head = ok[0].line()
            guard head.hasPrefix("$"), let n = Int(head.dropFirst()) else { return false }
            var buf = [UInt8](repeating: 0, count: n + 2)
            var got = 0
            while got < n + 2 {
                let k = buf[got...].withUnsafeMutableBytes { read(ok[0].fd, $0.baseAddress, $0.count) }
                if k <= 0 { break }
                got += k
            }
            text = String(decoding: buf.prefix(n), as: UTF8.self)
            return text.contains("\r\nconnections:100\r\n")
        }
        print("abuse: 1,000 connections against max_connections 100: RSS \(rss0 >> 20) -> \(rss1 >> 20) MiB")
        #expect(rss1 - rss0 < 64 << 20, "RSS grew by \((rss1 - rss0) >> 20) MiB for 1,000 connections")
        peers.removeAll()
        ok.removeAll()
        #expect(try await q.stop() == 0)
        withExtendedLifetime(redis) {}
    }

    // MARK: - 4. Ids

    @Test func userAndRequestIdsAreBytesAndCannotCollideWithClaimMarkers() async throws {
        let (redis, q) = try await sidecar(durability: "journal", perUser: 1)
        let c = try await RESPClient.connect(q.socket)
        defer { c.close() }
        let x = try #require(try await c.send("CLAIM", "v1", "alice").string)
        // A user id that spells a marker of a real claim is just another user.
        let hashX = try #require(try await c.send("CLAIM", "v1", "#" + x).string, "a user '#<claim id>' is a user")
        #expect(hashX != x)
        #expect(try await c.send("CLAIM", "v1", "#" + x).errorCode == "USERLIMIT")
        #expect(try await c.send("CLAIM", "v1", "alice").errorCode == "USERLIMIT")
        #expect(try await c.send("CLAIM", "v1", x).string != nil, "a user id equal to a claim id, too")
        let groups = 64
        #expect(try await redis.store.userCount(voucher: "v1", user: "alice", groups: groups) == 1)
        #expect(try await redis.store.userCount(voucher: "v1", user: "#" + x, groups: groups) == 1)
        let g = QuotaStore.userGroup(user: "alice", groups: groups)
        let marker = try await redis.command("HGET", QuotaStore.userMarkersKey(voucher: "v1", group: g), x)
        #expect(marker.string == "1", "alice's claim is counted once, in the markers key: \(marker)")
        let markersTTL = try await redis.command("PTTL", QuotaStore.userMarkersKey(voucher: "v1", group: g)).int ?? -3
        #expect(markersTTL > 0, "claim markers expire (a week after their last write): \(markersTTL)")
        // Cancel alice's claim: her marker becomes a tombstone; the '#' user keeps its count.
        #expect(try await c.send("UNCLAIM", x) == .simpleString("OK"))
        try await eventually("alice's count is released") {
            try await redis.store.userCount(voucher: "v1", user: "alice", groups: groups) == 0
        }
        #expect(try await redis.store.userCount(voucher: "v1", user: "#" + x, groups: groups) == 1)
        #expect(try await c.send("CLAIM", "v1", "#" + x).errorCode == "USERLIMIT")

        // Not UTF-8: refused with the argument named; nothing decided.
        for bad: [UInt8] in [[0xff], [0xfe], [0x61, 0xc3], [0xed, 0xa0, 0x80]] {
            let r = try await c.sendRaw(frame([Array("CLAIM".utf8), Array("v1".utf8), bad]), replies: 1)[0]
            #expect(r.errorMessage == "ERR user id must be valid UTF-8", "\(bad): \(r)")
            let r2 = try await c.sendRaw(frame([Array("CLAIM".utf8), Array("v1".utf8), Array("bob".utf8),
                                                 Array("REQ".utf8), bad]), replies: 1)[0]
            #expect(r2.errorMessage == "ERR REQ request id must be valid UTF-8", "\(bad): \(r2)")
        }
        // Canonically equivalent but different bytes: two users, two request ids.
        let pre = "jos\u{e9}", dec = "jose\u{301}"
        let p1 = try await c.send("CLAIM", "v1", pre)
        let p2 = try await c.send("CLAIM", "v1", dec)
        #expect(p1.string != nil && p2.string != nil, "two users, each within the limit of 1: \(p1) \(p2)")
        #expect(try await c.send("CLAIM", "v1", pre).errorCode == "USERLIMIT")
        #expect(try await c.send("CLAIM", "v1", dec).errorCode == "USERLIMIT")
        let r1 = try await c.send("CLAIM", "v1", "carol", "REQ", "order-\(pre)")
        let r2 = try await c.send("CLAIM", "v1", "dave", "REQ", "order-\(dec)")
        #expect(r1.string != nil && r2.string != nil && r1.string != r2.string, "two request ids: \(r1) \(r2)")
        #expect(try await c.send("CLAIM", "v1", "carol", "REQ", "order-\(pre)") == r1)
        #expect(try await c.send("CLAIM", "v1", "dave", "REQ", "order-\(dec)") == r2)
        #expect(try await q.stop() == 0)
        #expect(try await redis.audit("v1", journals: [(q.host, q.journalDir)], netClaimed: 6).isEmpty)
    }

    // MARK: - 5. The REQ table

    @Test func aFullREQTableRefusesNewRequestIDsUntilTheirWindowPasses() async throws {
        let (redis, q) = try await sidecar("claims: { max_dedupe_entries: 100, dedupe_window_seconds: 2 }\n",
                                           durability: "journal")
        let c = try await RESPClient.connect(q.socket)
        defer { c.close() }
        let first = try await c.pipeline((0..<100).map { ["CLAIM", "v1", "u\($0)", "REQ", "r\($0)"] })
        #expect(first.allSatisfy { $0.string?.hasPrefix("sg.host-a.") == true })
        let t0 = ContinuousClock.now
        let full = try await c.send("CLAIM", "v1", "u100", "REQ", "r100")
        #expect(full.errorCode == "BUSY" && full.errorMessage?.contains("claims.max_dedupe_entries = 100") == true, "\(full)")
        // Known request ids are still answered with their claims.
        #expect(try await c.send("CLAIM", "v1", "u5", "REQ", "r5") == first[5])
        #expect(try await c.send("CLAIM", "v1", "u5") .string != nil, "a claim without REQ needs no entry")
        var info = try await q.info()
        #expect(info["dedupe_entries"] == "100" && info["max_dedupe_entries"] == "100")
        #expect(info["dedupe_refused"] == "1")
        // Retried with the same REQ, it is served once the oldest answers' window has passed, not before.
        var served: RESPValue = full
        while served.errorCode == "BUSY" && ContinuousClock.now - t0 < .seconds(10) {
            try await Task.sleep(for: .milliseconds(100))
            served = try await c.send("CLAIM", "v1", "u100", "REQ", "r100")
        }
        #expect(served.string?.hasPrefix("sg.host-a.") == true, "\(served)")
        #expect(ContinuousClock.now - t0 >= .seconds(1), "only after the first answers' 2 s window")
        // r5's window has passed: answered as new.
        let r5 = try await c.send("CLAIM", "v1", "u5", "REQ", "r5")
        #expect(r5.string != nil && r5 != first[5])
        info = try await q.info()
        #expect((Int(info["dedupe_entries"] ?? "") ?? 999) <= 100)
        #expect(try await q.stop() == 0)
        #expect(try await redis.audit("v1", journals: [(q.host, q.journalDir)], netClaimed: 103).isEmpty)
    }

    // Found by review (the reply path without promises): a flush that finds the peer gone closes the channel
    // at once, inside the decoding loop, which went on decoding what was already read: the claims were decided
    // (tokens sold to nobody) and the run made a reply box after the close, never detached (~14 KB leaked per
    // connection). A peer that stops reading and leaves mid-pipeline now gets nothing decided after it is gone.
    @Test func aPeerThatLeavesMidPipelineHasNoClaimDecidedAfterItIsGone() async throws {
        // max_output_bytes 4096: replies are handed to the channel every 1,024 bytes while decoding.
        let (redis, q) = try await sidecar("limits: { max_output_bytes: 4096 }\n")
        let c = try await RESPClient.connect(q.socket)
        #expect(try await c.send("CLAIM", "v1", "warm").string?.hasPrefix("sg.host-a.") == true)
        let before = Int(try await q.info()["claims_ok"] ?? "") ?? -1
        // An ECHO whose reply passes the flush size, then claims, all in the first read (2,048 bytes).
        var burst = "*2\r\n$4\r\nECHO\r\n$1500\r\n" + String(repeating: "x", count: 1500) + "\r\n"
        for i in 0..<15 { burst += "*3\r\n$5\r\nCLAIM\r\n$2\r\nv1\r\n$3\r\nu\(i % 10)\(i / 10)\r\n" }
        for _ in 0..<50 {
            let p = try RawPeer(q.socket)
            _ = shutdown(p.fd, Int32(SHUT_RD))   // quotad's first write to it fails (EPIPE)
            p.sendAll(burst)
            try await Task.sleep(for: .milliseconds(5))
            close(p.fd)
        }
        try await Task.sleep(for: .milliseconds(500))
        let after = Int(try await q.info()["claims_ok"] ?? "") ?? -1
        #expect(after == before, "claims decided for peers that were gone: \(after - before)")
        #expect(try await c.send("CLAIM", "v1", "after").string?.hasPrefix("sg.host-a.") == true, "still serving")
        c.close()
        #expect(try await q.stop() == 0)
        #expect(try await redis.audit("v1", journals: [(q.host, q.journalDir)], netClaimed: before + 1).isEmpty)
    }
}
