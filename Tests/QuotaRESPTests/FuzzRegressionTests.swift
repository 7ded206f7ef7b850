import Foundation
import NIOCore
import QuotaRESP
import Testing

/// Every file of `Fuzz/corpus/` (the fuzz target's seeds, including each input that once broke an
/// invariant) replayed through the server's decoder and the command parser, as `Fuzz/FuzzRESP.swift`
/// does: the outcome is well formed (commands within the limits, then "need more bytes" or a protocol
/// error), the same whether the bytes arrive at once or in small reads, and every CLAIM parses to a valid
/// claim or a refusal.
@Suite("Fuzz corpus regressions")
struct FuzzRegressionTests {
    static let corpus = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fuzz/corpus")
    static let seeds: [String] = ((try? FileManager.default.contentsOfDirectory(atPath: corpus.path)) ?? [])
        .filter { !$0.hasPrefix(".") }.sorted()

    /// The limit sets the fuzz target uses, from the loosest to the tightest: quotad's defaults, an argument
    /// limit above the frame limit, and the smallest config (inline limit = `max_argument_bytes`, as
    /// `SidecarServer` sets it). Each is at most the one before it in every limit.
    static let limitSets = [
        RESPLimits(maxArguments: 32, maxArgumentBytes: 4096, maxInlineBytes: 4096, maxFrameBytes: 65536),
        RESPLimits(maxArguments: 4, maxArgumentBytes: 300, maxInlineBytes: 300, maxFrameBytes: 256),
        RESPLimits(maxArguments: 4, maxArgumentBytes: 64, maxInlineBytes: 64, maxFrameBytes: 256),
    ]

    @Test func theCorpusIsThere() {
        #expect(Self.seeds.count >= 30, "no seeds found in \(Self.corpus.path)")
    }

    @Test(arguments: FuzzRegressionTests.seeds)
    func seedHasAWellFormedOutcome(_ name: String) throws {
        let bytes = [UInt8](try Data(contentsOf: Self.corpus.appendingPathComponent(name)))
        var runs: [Run] = []
        for limits in Self.limitSets {
            let whole = Self.decode(bytes, limits: limits, reads: [bytes.count])
            let split = Self.decode(bytes, limits: limits, reads: Self.smallReads(bytes))
            #expect(whole == split, "\(name): outcome depends on how the stream is cut")
            for command in whole.commands { Self.checkCommand(command, limits: limits, seed: name) }
            runs.append(whole)
        }
        // Limits only refuse: a tighter set accepts a prefix of what the looser one accepts, and the same
        // whole outcome when it refuses nothing (as the fuzz target checks).
        for (loose, tight) in zip(runs, runs.dropFirst()) {
            if tight.error == nil {
                #expect(tight == loose, "\(name): a looser limit set changes the outcome")
            } else {
                #expect(Array(loose.commands.prefix(tight.commands.count)) == tight.commands,
                        "\(name): a looser limit set changes the commands")
            }
        }
        // The client-side reply decoder: a value, "need more bytes" or a protocol error, never anything else.
        var buffer = ByteBuffer(bytes: bytes)
        do {
            while let value = try RESPValueDecoder.parse(&buffer) {
                var encoded = ByteBuffer()
                encoded.writeRESPValue(value)
                #expect(try RESPValueDecoder.parse(&encoded) == value, "\(name): reply does not round-trip")
            }
        } catch is RESPProtocolError {}
    }

    // MARK: - The decoder bugs the fuzz target found

    /// An inline line of exactly `maxInlineBytes` whose CR arrived in one read and its LF in the next was
    /// refused as too big (Fuzz/corpus/regress-inline-cr-before-lf-at-limit).
    @Test func inlineLineAtTheLimitMayHaveItsCRBeforeItsLF() throws {
        let limits = RESPLimits(maxArguments: 4, maxArgumentBytes: 64, maxInlineBytes: 64, maxFrameBytes: 256)
        var buffer = ByteBuffer(string: String(repeating: "A", count: 64) + "\r")
        #expect(try RESPCommandDecoder.parse(&buffer, limits: limits) == nil)
        buffer.writeString("\n")
        #expect(try RESPCommandDecoder.parse(&buffer, limits: limits) == RESPCommand([String(repeating: "A", count: 64)]))
        var over = ByteBuffer(string: String(repeating: "A", count: 65))
        #expect(throws: RESPProtocolError.self) { try RESPCommandDecoder.parse(&over, limits: limits) }
    }

    /// With `max_argument_bytes` above `max_frame_bytes` (the config allows it), an inline command was not
    /// held to the frame limit (Fuzz/corpus/regress-inline-over-frame-limit).
    @Test func inlineCommandsAreHeldToTheFrameLimit() {
        let limits = RESPLimits(maxArguments: 4, maxArgumentBytes: 300, maxInlineBytes: 300, maxFrameBytes: 256)
        var buffer = ByteBuffer(string: "PING " + String(repeating: "x", count: 260) + "\r\n")
        #expect(throws: RESPProtocolError("command too large (limit 256 bytes)")) {
            try RESPCommandDecoder.parse(&buffer, limits: limits)
        }
    }

    @Test func claimArgumentsParse() {
        func parse(_ s: [String]) -> Result<ClaimArguments, ClaimArguments.Failure> {
            ClaimArguments.parse(s.map { ByteBuffer(string: $0) }, maxQty: 1000, isValidVoucher: Self.isValidVoucherID)
        }
        #expect(parse(["CLAIM", "v1", "u", "qty", "3", "REQ", "r", "QTY", "4"])
            == .success(ClaimArguments(voucher: "v1", user: ByteBuffer(string: "u"), qty: 4, req: ByteBuffer(string: "r"))))
        #expect(parse(["CLAIM", "v1"]) == .failure(.arity))
        #expect(parse(["CLAIM", "v1", "u", "QTY"]) == .failure(.syntax("QTY needs a value")))
        #expect(parse(["CLAIM", "v1", "u", "QTY", "1001"]) == .failure(.syntax("QTY must be an integer from 1 to 1000")))
        #expect(parse(["CLAIM", "v1", "u", "REQ", ""]) == .failure(.syntax("REQ request id must be 1-128 bytes")))
        #expect(parse(["CLAIM", "v 1", ""]) == .failure(.badVoucher("v 1")))  // the voucher is checked before the user
        #expect(parse(["CLAIM", "v1", ""]) == .failure(.syntax("user id must be 1-256 bytes")))
    }

    // MARK: - Helpers

    struct Run: Equatable {
        var commands: [RESPCommand] = []
        /// nil: waiting for more bytes.
        var error: RESPProtocolError?
        var pending = 0
    }

    /// What the server's pipeline (ByteToMessageHandler + RESPCommandDecoder) makes of `bytes` arriving in `reads`.
    static func decode(_ bytes: [UInt8], limits: RESPLimits, reads: [Int]) -> Run {
        var run = Run()
        var buffer = ByteBuffer()
        var offset = 0
        for n in reads {
            buffer.writeBytes(bytes[offset..<offset + n])
            offset += n
            while true {
                let before = buffer.readerIndex
                do {
                    guard let command = try RESPCommandDecoder.parse(&buffer, limits: limits) else {
                        #expect(buffer.readerIndex == before, "an incomplete frame moved the reader index")
                        break
                    }
                    #expect(buffer.readerIndex > before, "a command consumed no bytes")
                    run.commands.append(command)
                } catch {
                    #expect(error is RESPProtocolError, "not a protocol error: \(error)")
                    run.error = error as? RESPProtocolError
                    return run
                }
            }
        }
        run.pending = buffer.readableBytes
        return run
    }

    /// Reads of one byte for a short seed; for a long one, a cut after every CR and LF and every 61 bytes.
    static func smallReads(_ bytes: [UInt8]) -> [Int] {
        var reads: [Int] = []
        var last = 0
        for i in bytes.indices where bytes.count <= 512 || bytes[i] == 13 || bytes[i] == 10 || i - last >= 60 {
            reads.append(i + 1 - last)
            last = i + 1
        }
        if last < bytes.count { reads.append(bytes.count - last) }
        return reads
    }

    static func checkCommand(_ command: RESPCommand, limits: RESPLimits, seed: String) {
        let a = command.arguments
        #expect(a.count <= limits.maxArguments, "\(seed): too many arguments")
        #expect(a.allSatisfy { $0.readableBytes <= limits.maxArgumentBytes }, "\(seed): argument over the limit")
        #expect(a.reduce(0) { $0 + $1.readableBytes } <= limits.maxFrameBytes, "\(seed): command over the frame limit")
        guard let name = a.first, name.equalsUppercased("CLAIM") else { return }
        switch ClaimArguments.parse(a, maxQty: 1000, isValidVoucher: isValidVoucherID) {
        case .success(let c):
            #expect((1...1000).contains(c.qty) && isValidVoucherID(c.voucher), "\(seed): bad claim accepted")
            #expect((1...256).contains(c.user.readableBytes), "\(seed): bad user id accepted")
            #expect(c.req.map { (1...128).contains($0.readableBytes) } ?? true, "\(seed): bad REQ id accepted")
        case .failure(.arity):
            #expect(a.count < 3)
        case .failure(.badVoucher(let v)):
            #expect(!isValidVoucherID(v))
        case .failure(.syntax(let message)):
            #expect(!message.isEmpty)
        }
    }

    /// Copy of `QuotaStore.isValidVoucherID` (QuotaRedis is not a dependency of this test target).
    static func isValidVoucherID(_ id: String) -> Bool {
        guard !id.isEmpty, id.utf8.count <= 64 else { return false }
        return id.utf8.allSatisfy { c in
            (c >= 48 && c <= 57) || (c >= 65 && c <= 90) || (c >= 97 && c <= 122) || c == 95 || c == 46 || c == 58
                || c == 45
        }
    }
}
