import NIOCore
import NIOTestUtils
import QuotaRESP
import Testing

@Suite("RESP command decoder")
struct RESPDecoderTests {
    func parse(_ s: String, limits: RESPLimits = RESPLimits()) throws -> (RESPCommand?, Int) {
        var b = ByteBuffer(string: s)
        let c = try RESPCommandDecoder.parse(&b, limits: limits)
        return (c, b.readableBytes)
    }

    @Test func decodesAMultibulkCommand() throws {
        let (c, left) = try parse("*3\r\n$5\r\nCLAIM\r\n$2\r\nv1\r\n$1\r\nu\r\n")
        #expect(c == RESPCommand(["CLAIM", "v1", "u"]))
        #expect(left == 0)
    }

    @Test func decodesInlineCommands() throws {
        #expect(try parse("PING\r\n").0 == RESPCommand(["PING"]))
        #expect(try parse("claim  v1\tu QTY 2\n").0 == RESPCommand(["claim", "v1", "u", "QTY", "2"]))
    }

    @Test func incompleteFramesAreNotConsumed() throws {
        let full = "*3\r\n$5\r\nCLAIM\r\n$2\r\nv1\r\n$1\r\nu\r\n"
        for cut in 1..<full.utf8.count {
            let (c, left) = try parse(String(decoding: full.utf8.prefix(cut), as: UTF8.self))
            #expect(c == nil)
            #expect(left == cut)
        }
    }

    @Test func pipelinedFramesDecodeOneAtATimeInOrder() throws {
        var b = ByteBuffer(string: "*1\r\n$4\r\nPING\r\n*2\r\n$5\r\nAVAIL\r\n$1\r\nv\r\nPING\r\n")
        let l = RESPLimits()
        #expect(try RESPCommandDecoder.parse(&b, limits: l) == RESPCommand(["PING"]))
        #expect(try RESPCommandDecoder.parse(&b, limits: l) == RESPCommand(["AVAIL", "v"]))
        #expect(try RESPCommandDecoder.parse(&b, limits: l) == RESPCommand(["PING"]))
        #expect(b.readableBytes == 0)
    }

    @Test func malformedFramesAreProtocolErrors() {
        for bad in ["*abc\r\n", "*2\r\n+OK\r\n", "*1\r\n$x\r\n", "*1\r\n$3\r\nabcd\r\n", "*-5\r\n", "*1\r\n$-3\r\n"] {
            #expect(throws: RESPProtocolError.self) { try parse(bad) }
        }
    }

    @Test func limitsAreEnforcedFromTheHeaderBeforeTheBodyArrives() {
        let l = RESPLimits(maxArguments: 4, maxArgumentBytes: 16, maxInlineBytes: 32, maxFrameBytes: 40)
        // Only the header is here: the declared size alone is refused.
        #expect(throws: RESPProtocolError.self) { try parse("*5\r\n", limits: l) }
        #expect(throws: RESPProtocolError.self) { try parse("*1\r\n$999999999\r\n", limits: l) }
        #expect(throws: RESPProtocolError.self) {
            try parse("*3\r\n$16\r\naaaaaaaaaaaaaaaa\r\n$16\r\naaaaaaaaaaaaaaaa\r\n$16\r\n", limits: l)
        }
        #expect(throws: RESPProtocolError.self) { try parse(String(repeating: "x", count: 33), limits: l) }
        #expect(throws: RESPProtocolError.self) { try parse("*99999999999999999999999\r\n", limits: l) }
    }

    @Test func decoderVerifierAcceptsByteByByteInput() throws {
        let input = ByteBuffer(string: "*2\r\n$4\r\nPING\r\n$2\r\nhi\r\nPING\r\n")
        try ByteToMessageDecoderVerifier.verifyDecoder(
            inputOutputPairs: [(input, [RESPCommand(["PING", "hi"]), RESPCommand(["PING"])])],
            decoderFactory: { RESPCommandDecoder() })
    }

    @Test func caseInsensitiveCommandNames() {
        #expect(ByteBuffer(string: "cLaIm").equalsUppercased("CLAIM"))
        #expect(!ByteBuffer(string: "CLAIMS").equalsUppercased("CLAIM"))
        #expect(ByteBuffer(string: "42").parsePositiveInt() == 42)
        #expect(ByteBuffer(string: "-1").parsePositiveInt() == nil)
        #expect(ByteBuffer(string: "1e3").parsePositiveInt() == nil)
    }
}

@Suite("RESP values")
struct RESPValueTests {
    @Test func repliesRoundTrip() throws {
        let values: [RESPValue] = [
            .simpleString("OK"), .error("SOLDOUT sold out"), .integer(-7), .bulk("id-1"), .null,
            .array([.integer(1), .bulk("x"), .array([])]),
        ]
        var b = ByteBuffer()
        for v in values { b.writeRESPValue(v) }
        for v in values { #expect(try RESPValueDecoder.parse(&b) == v) }
        #expect(b.readableBytes == 0)
    }

    @Test func errorCodeIsTheFirstWord() {
        #expect(RESPValue.error("USERLIMIT user holds 1").errorCode == "USERLIMIT")
    }
}
