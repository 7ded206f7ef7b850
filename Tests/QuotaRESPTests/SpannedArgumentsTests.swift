import NIOCore
import QuotaRESP
import Testing

/// The claim path reads a `CLAIM` where it was decoded (``RESPSpan``s into the read buffer) instead of as slices
/// (issue 13). Both ways must see the same commands: the spans name the slices' bytes, and `CLAIM`'s checks give
/// the same answer on either.
@Suite("Arguments read in place (spans) agree with slices")
struct SpannedArgumentsTests {
    /// A small deterministic generator (SplitMix64).
    struct Rng {
        var s: UInt64
        mutating func next() -> UInt64 {
            s &+= 0x9E37_79B9_7F4A_7C15
            var z = s
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
        mutating func below(_ n: Int) -> Int { Int(next() % UInt64(n)) }
    }

    static func isValidVoucherID(_ id: String) -> Bool {
        guard !id.isEmpty, id.utf8.count <= 64 else { return false }
        return id.utf8.allSatisfy { c in (c >= 48 && c <= 57) || (c >= 97 && c <= 122) || c == 46 || c == 45 }
    }

    /// A random argument: often a word `CLAIM` options use, else random bytes (any byte, empty, long).
    static func argument(_ r: inout Rng) -> [UInt8] {
        let words = ["CLAIM", "claim", "v1", "bench", "u", "QTY", "qty", "REQ", "req", "3", "0", "1001", "99999999999999999999",
                     "Qty", "r-1", "v 1", "ü", "x"]
        switch r.below(4) {
        case 0, 1: return Array(words[r.below(words.count)].utf8)
        case 2: return (0..<r.below(4)).map { _ in UInt8(r.below(256)) }
        default: return (0..<r.below(300)).map { _ in UInt8(48 + r.below(75)) }
        }
    }

    /// A command: usually a `CLAIM` with a few more arguments, as multibulk (or inline when every argument allows it).
    static func frame(_ r: inout Rng) -> (bytes: [UInt8], inline: Bool) {
        var args: [[UInt8]] = r.below(8) == 0 ? [] : [Array((r.below(5) == 0 ? "claim" : "CLAIM").utf8)]
        for _ in 0..<r.below(9) { args.append(argument(&r)) }
        let inlineable = !args.isEmpty && args.allSatisfy { a in !a.isEmpty && !a.contains(where: { $0 == 32 || $0 == 9 || $0 == 10 || $0 == 13 }) }
        if inlineable && r.below(3) == 0 {
            var out: [UInt8] = []
            for (i, a) in args.enumerated() {
                if i > 0 { out += Array(String(repeating: " ", count: 1 + r.below(2)).utf8) }
                out += a
            }
            return (out + [13, 10], true)
        }
        var out = Array("*\(args.count)\r\n".utf8)
        for a in args { out += Array("$\(a.count)\r\n".utf8) + a + [13, 10] }
        return (out, false)
    }

    @Test func randomCommandsDecodeToTheSameArgumentsAndTheSameClaimAnswerEitherWay() throws {
        let limits = RESPLimits()
        var r = Rng(s: 13)
        var claims = 0
        for _ in 0..<4000 {
            // Some bytes before the command (already read), and the command at a random place of a bigger buffer.
            var buffer = ByteBuffer()
            let skipped = r.below(40)
            buffer.writeBytes([UInt8](repeating: 42, count: skipped))
            buffer.moveReaderIndex(forwardBy: skipped)
            let (bytes, _) = Self.frame(&r)
            buffer.writeBytes(bytes)
            buffer.writeBytes(Array("*1\r\n$4\r\nPING\r\n".utf8))

            // The slices from the decoder as it was before spans (``ReferenceDecoder``: it reads multibulk frames on
            // its own, and hands inline commands to the decoder).
            var forSlices = buffer
            let reference = try ReferenceDecoder.parse(&forSlices, limits: limits)
            let parsedSlices = reference != nil
            let slices = reference?.arguments ?? []
            var forSpans = buffer
            var spans: [RESPSpan] = []
            let parsedSpans = try RESPCommandDecoder.parse(&forSpans, limits: limits, spans: &spans)
            #expect(parsedSlices == parsedSpans)
            #expect(forSlices.readerIndex == forSpans.readerIndex)
            guard parsedSpans else { continue }
            #expect(spans.count == slices.count)
            // Every span lies below the reader index (its command is consumed) and names the slice's bytes.
            for (s, slice) in zip(spans, slices) {
                #expect(s.start + s.count <= forSpans.readerIndex)
                let spanBytes = forSpans.withVeryUnsafeBytes { Array($0[s.start..<s.start + s.count]) }
                #expect(spanBytes == Array(slice.readableBytesView))
            }
            let fromSlices = ClaimArguments.parseFields(slices, maxQty: 1000) { b in
                let v = String(decoding: b, as: UTF8.self)
                return Self.isValidVoucherID(v) ? v : nil
            }
            let fromSpans = forSpans.withVeryUnsafeBytes { storage in
                spans.withUnsafeBufferPointer { sp in
                    ClaimArguments.parseFields(RESPSpannedArguments(storage: storage, spans: sp), maxQty: 1000) { b in
                        let v = String(decoding: b, as: UTF8.self)
                        return Self.isValidVoucherID(v) ? v : nil
                    }
                }
            }
            #expect(fromSlices == fromSpans)
            // The slices' own API (what the fuzz target checks) agrees too.
            let whole = ClaimArguments.parse(slices, maxQty: 1000, isValidVoucher: Self.isValidVoucherID)
            switch (whole, fromSpans) {
            case (.success(let a), .success(let f)):
                claims += 1
                #expect(a.voucher == f.voucher && a.qty == f.qty && a.user == slices[2] && a.req == f.reqIndex.map { slices[$0] })
            case (.failure(let a), .failure(let b)):
                #expect(a == b)
            default:
                Issue.record("slices \(whole), spans \(fromSpans)")
            }
        }
        #expect(claims > 50, "the generator made too few valid claims to compare (\(claims))")
    }
}
