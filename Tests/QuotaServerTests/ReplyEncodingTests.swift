import NIOCore
import QuotaCore
@testable import QuotaServer
import Testing

/// The claim path writes a claim id's reply in one access to the buffer (``ByteBuffer/writeClaimID(_:)``):
/// it must be byte for byte the RESP bulk string the general writer makes.
struct ReplyEncodingTests {
    @Test(arguments: [1, 9, 10, 11, 99, 100, 101, 999, 1000, 4096])
    func aClaimIDReplyIsTheBulkStringOfItsBytes(length: Int) {
        let id = String((0..<length).map { i in Character(UnicodeScalar(UInt8(97 + i % 26))) })
        var fast = ByteBuffer()
        fast.writeString("+prefix\r\n")   // written after other replies, not only at the start
        fast.writeReply(.claimID(id), claimPrefix: "unused.")
        #expect(String(buffer: fast) == "+prefix\r\n$\(length)\r\n\(id)\r\n")
    }

    /// A claim answered as its number (no `String` made) reads exactly as the id the book keeps it under.
    @Test(arguments: ["", "sg.host-a.k3x9.", String(repeating: "p", count: 200), "é."])
    func aClaimNumberReplyIsTheBulkStringOfItsID(prefix: String) {
        var seqs = [0, 1, 9, 10, 35, 36, 37, 1295, 1296, 46_655, 46_656, Int.max, Int.max - 1]
        var x: UInt64 = 0x9E37_79B9_7F4A_7C15
        for _ in 0..<500 {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17
            seqs.append(Int(x >> UInt64(1 + x % 62)))
        }
        for seq in seqs {
            let id = ClaimEvent.claimID(prefix: prefix, seq: seq)
            #expect(id == prefix + String(seq, radix: 36))
            var fast = ByteBuffer()
            fast.writeString(":1\r\n")
            fast.writeReply(.claimNumber(seq: seq), claimPrefix: prefix)
            #expect(String(buffer: fast) == ":1\r\n$\(id.utf8.count)\r\n\(id)\r\n", "seq \(seq)")
            // Inside a transaction's replies (EXEC) too.
            var nested = ByteBuffer()
            nested.writeReply(.replies([.claimNumber(seq: seq), .value(.ok)]), claimPrefix: prefix)
            #expect(String(buffer: nested) == "*2\r\n$\(id.utf8.count)\r\n\(id)\r\n+OK\r\n", "seq \(seq)")
        }
    }

    @Test func aNonASCIIClaimIDCountsBytesNotCharacters() {
        var b = ByteBuffer()
        b.writeClaimID("é-1")
        #expect(String(buffer: b) == "$4\r\né-1\r\n")
    }
}
