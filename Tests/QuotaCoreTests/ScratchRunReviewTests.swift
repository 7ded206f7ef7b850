import Foundation
import QuotaCore
import QuotaJournal
import Testing

/// Review of 0968746: a run of values written into ONE reused ScratchBytes with ONE cache (the pipeline's
/// path), against an encoder written independently of QuotaCore's.
@Suite("Scratch run review")
struct ScratchRunReviewTests {
    typealias Rand = ShippingCacheTests.Rand

    static func q(_ s: String) -> [UInt8] {
        var o: [UInt8] = [0x22]
        for b in s.utf8 {
            switch b {
            case 0x22: o += Array("\\\"".utf8)
            case 0x5C: o += Array("\\\\".utf8)
            case 0x0A: o += Array("\\n".utf8)
            case 0x0D: o += Array("\\r".utf8)
            case 0x09: o += Array("\\t".utf8)
            case 0..<0x20: o += Array(String(format: "\\u%04x", Int(b)).utf8)
            default: o.append(b)
            }
        }
        o.append(0x22)
        return o
    }

    static func reference(_ e: ClaimEvent) -> [UInt8] {
        var o: [UInt8] = Array("{\"type\":\"\(e.kind == .claimed ? "claimed" : "unclaimed")\",\"claim_id\":".utf8)
        o += q(e.claimID)
        o += Array(",\"voucher\":".utf8) + q(e.voucher)
        o += Array(",\"user\":".utf8) + q(e.user)
        o += Array(",\"qty\":\(e.qty)".utf8)
        o += Array(",\"region\":".utf8) + q(e.region) + Array(",\"host\":".utf8) + q(e.host)
        o += Array(",\"leases\":[".utf8)
        for (i, s) in e.shares.enumerated() {
            if i > 0 { o.append(UInt8(ascii: ",")) }
            o += Array("{\"id\":".utf8) + q(s.leaseId) + Array(",\"qty\":\(s.tokens)".utf8)
            if e.kind == .unclaimed { o += Array((e.sharesToPool(i) ? ",\"to\":\"pool\"" : ",\"to\":\"lease\"").utf8) }
            o.append(UInt8(ascii: "}"))
        }
        o += Array("],\"ts_ms\":\(e.tsMs)}".utf8)
        return o
    }

    func str(_ r: inout Rand) -> String {
        let pool: [String] = ["", "a", "v", "\"", "\\", "\u{0}", "\u{1f}", "\n", "ü", "u\u{308}", "K", "\u{212A}", "ホスト",
                              "sg:h:1", "x.y.", "\u{7f}", "\t", "\r", "😀"]
        switch r.next(6) {
        case 0: return String(repeating: pool[r.next(pool.count)], count: r.next(400))   // growth
        case 1: return String(repeating: "\u{1}", count: r.next(200))   // worst case escaping
        default: return (0..<r.next(5)).map { _ in pool[r.next(pool.count)] }.joined()
        }
    }

    @Test func aRunInOneScratchIsTheIndependentEncoding() throws {
        var bad = 0
        for seed in UInt64(1)...6 {
            var r = Rand(s: seed &* 977)
            var cache = KafkaValueCache()
            var shipped = KafkaValueCache()
            var scratch = ScratchBytes(capacity: [16, 64, 512][r.next(3)])
            var scratch2 = ScratchBytes(capacity: 16)
            let vouchers = (0..<3).map { _ in str(&r) }, prefixes = (0..<3).map { _ in str(&r) }
            let leases = (0..<4).map { _ in str(&r) }, hosts = (0..<2).map { _ in str(&r) }
            for n in 0..<800 {
                let k = r.next(10) == 0 ? 64 + r.next(4) : 1 + r.next(3)
                let shares = (0..<k).map { _ in ClaimShare(leaseId: leases[r.next(leases.count)], tokens: [0, 1, -1, .max, .min][r.next(5)]) }
                let qty = [0, -1, .max, .min, 7][r.next(5)]
                let ts: Int64 = [0, -1, .max, .min, 1_764_000_000_000][r.next(5)]
                let kind: ClaimEvent.Kind = r.next(2) == 0 ? .unclaimed : .claimed
                let toPool = UInt64.random(in: 0...UInt64.max)
                var e: ClaimEvent
                if r.next(3) == 0 {
                    e = ClaimEvent(kind: kind, claimID: str(&r), voucher: vouchers[r.next(3)], user: str(&r), qty: qty,
                                   region: hosts[r.next(2)], host: hosts[r.next(2)], shares: ClaimShares(shares), tsMs: ts, toPool: toPool)
                } else {
                    e = ClaimEvent(kind: kind, idPrefix: prefixes[r.next(3)], seq: [0, 35, 36, .max, r.next(1 << 30)][r.next(5)],
                                   voucher: vouchers[r.next(3)], user: str(&r), qty: qty, region: hosts[r.next(2)],
                                   host: hosts[r.next(2)], shares: ClaimShares(shares), tsMs: ts, toPool: toPool)
                    if r.next(5) == 0 { e = e.cancellation(tsMs: ts &+ 1, toPool: toPool >> 1) }
                }
                let want = Self.reference(e)
                let got = e.withKafkaValue(cache: &cache, scratch: &scratch) { Array($0) }
                let got2 = ShippedEvent.claim(e).withKafkaValue(cache: &shipped, scratch: &scratch2) { Array($0) }
                if got != want || got2 != want || e.kafkaValue != want {
                    bad += 1
                    if bad < 5 { Issue.record("seed \(seed) event \(n): \(String(decoding: got, as: UTF8.self)) != \(String(decoding: want, as: UTF8.self))") }
                }
            }
        }
        #expect(bad == 0)
    }
}
