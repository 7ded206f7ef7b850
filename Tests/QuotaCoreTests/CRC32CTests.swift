import Foundation
@testable import QuotaCore
import Testing

/// The journal's record checksum: the CPU's CRC-32C instructions (when it has them) and the table version
/// must give the same values, the standard ones.
struct CRC32CTests {
    @Test func theChecksumIsCRC32CsStandardCheckValue() {
        #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
        #expect(CRC32C.checksum([UInt8]()) == 0)
        #expect(CRC32C.checksum([UInt8](repeating: 0, count: 32)) == 0x8A91_36AA)
    }

    @Test func theCPUsInstructionsAndTheTablesAgreeOnEveryLengthAndAlignment() {
        var rng = SystemRandomNumberGenerator()
        let bytes = (0..<600).map { _ in UInt8.random(in: 0...255, using: &rng) }
        bytes.withUnsafeBytes { all in
            for start in 0..<9 {
                for length in 0..<(all.count - start) where length < 80 || length % 37 == 0 {
                    let p = UnsafeRawBufferPointer(rebasing: all[start..<(start + length)])
                    let seed = UInt32.random(in: 0...UInt32.max, using: &rng)
                    #expect(CRC32C.update(seed, p) == CRC32C.updateTable(seed, p), "start \(start) length \(length)")
                }
            }
        }
    }

    @Test func thisMachineUsesTheCPUsInstructions() {
        // Not a requirement of the code (it falls back to the tables), but of the figures measured here.
        #expect(CRC32C.hardware)
    }
}

/// Claim records are written through a pointer into room made beforehand (``JournalCodec``): every field of
/// every shape must come back as it went in, records side by side in one buffer included.
struct ClaimRecordRoundTripTests {
    static func text(_ rng: inout some RandomNumberGenerator, max: Int) -> String {
        let pieces = ["a", "Z", "9", "-", ".", "é", "☃", "😀", "\"", "\\", " "]
        return String((0..<Int.random(in: 0...max, using: &rng)).map { _ in Character(pieces.randomElement(using: &rng)!) })
    }

    @Test func randomClaimRecordsComeBackFieldForField() {
        var rng = SystemRandomNumberGenerator()
        var records: [JournalRecord] = []
        for i in 0..<3_000 {
            let shares = (0..<Int.random(in: 1...(i % 50 == 0 ? 40 : 3), using: &rng)).map { _ in
                ClaimShare(leaseId: Self.text(&rng, max: 20), tokens: Int.random(in: 0...Int.max, using: &rng))
            }
            let kind: ClaimEvent.Kind = [.claimed, .unclaimed, .intent].randomElement(using: &rng)!
            records.append(.claim(ClaimEvent(
                kind: kind, claimID: Self.text(&rng, max: 40), voucher: Self.text(&rng, max: 64),
                user: Self.text(&rng, max: i % 100 == 0 ? 3_000 : 256), qty: Int.random(in: 0...Int.max, using: &rng),
                region: Self.text(&rng, max: 10), host: Self.text(&rng, max: 30), shares: ClaimShares(shares),
                tsMs: Int64.random(in: .min ... .max, using: &rng), req: Bool.random(using: &rng) ? Self.text(&rng, max: 128) : nil,
                toPool: UInt64.random(in: 0 ... .max, using: &rng))))
        }
        var buf: [UInt8] = [7, 7, 7]   // written after other bytes
        for r in records { JournalCodec.encode(r, into: &buf) }
        var off = 3
        for r in records {
            guard case .record(let got, let next) = JournalCodec.decode(buf, at: off) else {
                Issue.record("no record at \(off)")
                return
            }
            #expect(got == r)
            off = next
        }
        #expect(off == buf.count, "nothing written past the records")
    }
}

/// Kafka values are written into an array sized once from a bound (``JSONBytes``): the worst cases of every
/// field (every byte escaped, the widest integers, many shares) must fit, and read back as sent.
struct KafkaValueBoundTests {
    @Test func theWidestFieldsFitTheirBoundAndComeBackExactly() throws {
        let worst = String(repeating: "\u{1}", count: 300)   // each byte becomes \u0001: six bytes
        let shares = (0..<40).map { ClaimShare(leaseId: worst + String($0), tokens: Int.max - $0) }
        for (qty, ts) in [(Int.max, Int64.min), (0, Int64.max), (1, -1)] {
            for kind in [ClaimEvent.Kind.claimed, .unclaimed] {
                let e = ClaimEvent(kind: kind, claimID: worst, voucher: worst, user: worst, qty: qty, region: worst, host: worst,
                                   shares: ClaimShares(shares), tsMs: ts, toPool: 0x5555)
                let o = try #require(try JSONSerialization.jsonObject(with: Data(e.kafkaValue)) as? [String: Any])
                #expect(o["user"] as? String == worst && o["claim_id"] as? String == worst)
                #expect((o["qty"] as? NSNumber)?.int64Value == Int64(qty) && (o["ts_ms"] as? NSNumber)?.int64Value == ts)
                let leases = try #require(o["leases"] as? [[String: Any]])
                #expect(leases.count == 40 && leases[39]["id"] as? String == worst + "39")
                #expect((leases[0]["qty"] as? NSNumber)?.int64Value == Int64.max)
            }
        }
        let close = LeaseClose(voucher: worst, lease: worst, region: worst, host: worst, granted: Int.min + 1, served: Int.max,
                               returned: Int.min + 1, tsMs: .min, gone: true)
        let c = try #require(try JSONSerialization.jsonObject(with: Data(close.kafkaValue)) as? [String: Any])
        #expect(c["lease"] as? String == worst && (c["served"] as? NSNumber)?.int64Value == Int64.max && c["gone"] as? Bool == true)
        #expect(String(decoding: LeaseClose(voucher: "v", lease: "7", region: "sg", host: "h", granted: 10, served: 4, returned: 6,
                                            tsMs: 3).kafkaValue, as: UTF8.self)
                == #"{"type":"lease_closed","voucher":"v","region":"sg","host":"h","lease":"7","granted":10,"served":4,"returned":6,"ts_ms":3}"#)
    }
}

/// The Kafka JSON writer looks at eight bytes at a time for bytes to escape (``JSONBytes/anyNeedsEscape(_:)``).
struct JSONEscapeScanTests {
    @Test func theEightByteTestAgreesWithTheByteTestOnEveryByteInEveryPlace() {
        let needs: (UInt8) -> Bool = { $0 < 0x20 || $0 == 0x22 || $0 == 0x5C }
        var rng = SystemRandomNumberGenerator()
        for b in 0...255 {
            for place in 0..<8 {
                for _ in 0..<20 {
                    // The other seven bytes: ones that never need escaping, near the edges (0x20, 0x21, 0x23, 0x5B, 0x5D, 0x7F, 0x80, 0xFF).
                    var bytes = (0..<8).map { _ in [0x20, 0x21, 0x23, 0x5B, 0x5D, 0x7F, 0x80, 0xFF, 0x41].randomElement(using: &rng)! as UInt8 }
                    bytes[place] = UInt8(b)
                    let w = bytes.withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) }
                    #expect(JSONBytes.anyNeedsEscape(w) == needs(UInt8(b)), "byte \(b) at \(place): \(bytes)")
                }
            }
        }
        for _ in 0..<100_000 {
            let bytes = (0..<8).map { _ in UInt8.random(in: 0...255, using: &rng) }
            let w = bytes.withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) }
            #expect(JSONBytes.anyNeedsEscape(w) == bytes.contains(where: needs), "\(bytes)")
        }
    }

    @Test func anEscapeAtEveryOffsetOfLongStringsSurvives() throws {
        for length in 1..<40 {
            for at in 0..<length {
                for special in ["\"", "\\", "\n", "\u{1}", "é"] {
                    var chars = Array(repeating: "a", count: length)
                    chars[at] = special
                    let text = chars.joined()
                    let e = ClaimEvent(claimID: "c", voucher: "v", user: text, qty: 1, region: "sg", host: "h",
                                       shares: [ClaimShare(leaseId: "1", tokens: 1)], tsMs: 1)
                    let o = try #require(try JSONSerialization.jsonObject(with: Data(e.kafkaValue)) as? [String: Any])
                    #expect(o["user"] as? String == text, "\(length) \(at) \(special.debugDescription)")
                }
            }
        }
    }
}
