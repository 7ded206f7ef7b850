import QuotaCore
import Testing

/// Issue 13: integers are written two digits at a time and counted from their bit length; every value must give
/// exactly the digits `String(v)` gives.
@Suite("Decimal digits")
struct DecimalDigitsTests {
    @Test func everyValueGivesTheDigitsOfItsDescription() {
        var values: [UInt64] = [0, 1, 9, 10, 11, 99, 100, 101, 999, 1000, UInt64.max, UInt64.max - 1, 1 << 63, (1 << 63) - 1]
        var p: UInt64 = 1
        for _ in 0..<19 {
            p *= 10
            values += [p - 1, p, p + 1]
        }
        for b in 0..<64 { values += [UInt64(1) << b, (UInt64(1) << b) - 1] }
        var s: UInt64 = 0x9E37_79B9_7F4A_7C15
        for _ in 0..<20_000 {
            s = s &* 6364136223846793005 &+ 1442695040888963407
            values.append(s >> (s % 64))
        }
        var buf = [UInt8](repeating: 0, count: 24)
        for v in values {
            let want = Array(String(v).utf8)
            #expect(DecimalDigits.count(v) == want.count, "\(v)")
            let n = buf.withUnsafeMutableBytes { DecimalDigits.write(v, at: $0.baseAddress!) }
            #expect(Array(buf[0..<n]) == want, "\(v)")
        }
    }
}
