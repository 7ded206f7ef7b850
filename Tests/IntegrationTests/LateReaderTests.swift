import Foundation
import Glibc
import NIOCore
import QuotaHarness
import Testing

/// helper-56 (review of 001ce32: the connection keeps the channel's writability from NIO's change events): a peer that
/// pipelines 60,000 commands without reading is paused by output back-pressure, and once it reads it gets every
/// reply; a writability that stayed false would stall the connection here.
@Suite("A peer that reads late gets every reply", .serialized, .timeLimit(.minutes(10)))
struct LateReaderTests {
    @Test(arguments: [4096, 65536])
    func claimFloodThenReadGetsEveryReply(_ maxOut: Int) async throws {
        let redis = try await RedisServer()
        _ = try await redis.store.createVoucher(id: "v1", limit: 10_000_000, perUser: 0, totalLimit: 10_000_000, region: "sg")
        let q = try await Quotad(redis: redis, dir: redis.dir, host: "host-a",
                                 extraYAML: "limits: { max_output_bytes: \(maxOut) }\n", durability: "none")
        let peer = try RawPeer(q.socket)
        peer.nonBlocking()
        var cmds: [UInt8] = []
        var expected = 0
        for i in 0..<60_000 {
            if i % 97 == 0 { cmds += Array("*1\r\n$4\r\nINFO\r\n".utf8); continue }
            if i % 3 == 0 { cmds += Array("CLAIM v1 u\(i % 7)\r\n".utf8) } else { cmds += Array("*3\r\n$5\r\nCLAIM\r\n$2\r\nv1\r\n$2\r\nu\(i % 7)\r\n".utf8) }
            expected += 1
        }
        cmds += Array("*2\r\n$4\r\nECHO\r\n$9\r\nENDMARKzz\r\n".utf8)
        // Phase A: send without reading until the server stops taking bytes for 1 s.
        var off = 0
        var last = ContinuousClock.now
        while off < cmds.count && ContinuousClock.now - last < .seconds(1) {
            let n = peer.send(ArraySlice(cmds[off..<min(cmds.count, off + 8192)]))
            if n > 0 { off += n; last = .now } else { usleep(5000) }
        }
        let info = try await q.info()
        print("late reader: maxOut \(maxOut): took \(off) of \(cmds.count) bytes unread; paused \(info["connections_paused"] ?? "?")")
        // Phase B: read and send the rest.
        var rx: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 1 << 16)
        let deadline = ContinuousClock.now + .seconds(120)
        var quiet = ContinuousClock.now
        while ContinuousClock.now < deadline && ContinuousClock.now - quiet < .seconds(10) {
            if off < cmds.count {
                let n = peer.send(ArraySlice(cmds[off..<min(cmds.count, off + 8192)]))
                if n > 0 { off += n; quiet = .now }
            }
            let g = peer.receive(&buf)
            if g < 0 { break }
            if g > 0 { rx += buf[0..<g]; quiet = .now } else { usleep(500) }
            if rx.count >= 11 && Array(rx.suffix(11)) == Array("ENDMARKzz\r\n".utf8) { break }
        }
        let text = String(decoding: rx, as: UTF8.self)
        let claims = text.components(separatedBy: "sg.host-a.").count - 1
        print("late reader: maxOut \(maxOut): \(claims) claim replies of \(expected), \(rx.count) bytes, sent \(off)/\(cmds.count)")
        #expect(off == cmds.count)
        #expect(claims == expected)
        #expect(text.hasSuffix("ENDMARKzz\r\n"))
        _ = try await q.stop()
        withExtendedLifetime(redis) {}
    }
}
