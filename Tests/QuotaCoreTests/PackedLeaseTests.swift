import Foundation
import QuotaCore
import Testing

@Suite struct PackedLeaseTests {
    /// The reference: parse as integers, then keep only what prints back the same.
    static func reference(_ id: String) -> Int64? {
        let parts = id.split(separator: ".", omittingEmptySubsequences: false)
        let s: Int64, n: Int64
        switch parts.count {
        case 1:
            guard let v = Int64(parts[0]) else { return nil }
            (s, n) = (0, v)
        case 2:
            guard let a = Int64(parts[0]), let b = Int64(parts[1]), a >= 1 else { return nil }
            (s, n) = (a, b)
        default: return nil
        }
        guard s < 128, n >= 0, n < 1 << 48 else { return nil }
        let v = s << 48 | n
        return PackedLease.id(v) == id ? v : nil
    }

    @Test func onlyIdsSpelledAsQuotadSpellsThemPackAndTheyComeBackTheSame() {
        var ids = ["0", "1", "42", "1.1", "127.5", "128.5", "0.5", "01", "1.01", "-1", "+1", "1.", ".1", "1..2", "1.2.3",
                   "", " 1", "1 ", "281474976710655", "281474976710656", "3.281474976710655", "99999999999999999999",
                   "１", "1.-3", "٣"]
        var rng = SystemRandomNumberGenerator()
        let alphabet = Array("0123456789.-+ a")
        for _ in 0..<20_000 {
            let len = Int.random(in: 0...8, using: &rng)
            ids.append(String((0..<len).map { _ in alphabet.randomElement(using: &rng)! }))
        }
        for id in ids {
            let packed = PackedLease.pack(id)
            #expect(packed == Self.reference(id), "\(id)")
            if let packed { #expect(PackedLease.id(packed) == id) }
        }
    }

    /// Integers in the Kafka JSON are written digit by digit: every magnitude and sign reads back.
    @Test func kafkaJSONIntegersReadBack() throws {
        for v in [0, 1, 9, 10, 99, 100, -1, -10, Int(Int32.max), 1_700_000_000_000, Int.max, Int.min + 1] {
            let e = ClaimEvent(claimID: "c", voucher: "v", user: "u", qty: v, region: "r", host: "h",
                               shares: [ClaimShare(leaseId: "1", tokens: v)], tsMs: Int64(v))
            let obj = try #require(try JSONSerialization.jsonObject(with: Data(e.kafkaValue)) as? [String: Any])
            #expect((obj["qty"] as? NSNumber)?.int64Value == Int64(v) && (obj["ts_ms"] as? NSNumber)?.int64Value == Int64(v),
                    "\(v): \(String(decoding: e.kafkaValue, as: UTF8.self))")
        }
    }
}
