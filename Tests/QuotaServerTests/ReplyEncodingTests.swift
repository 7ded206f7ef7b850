import NIOCore
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
        fast.writeReply(.claimID(id))
        #expect(String(buffer: fast) == "+prefix\r\n$\(length)\r\n\(id)\r\n")
    }

    @Test func aNonASCIIClaimIDCountsBytesNotCharacters() {
        var b = ByteBuffer()
        b.writeClaimID("é-1")
        #expect(String(buffer: b) == "$4\r\né-1\r\n")
    }
}
