import Foundation
import NIOCore
import QuotaRESP
import Testing

/// The multibulk decoder as it was before it read raw bytes (issue 13), kept as the reference: the new one
/// must answer every input exactly as this did (the same commands, the same "need more bytes", the same
/// protocol error and message). Inline commands are not part of the change: the reference hands them on.
enum ReferenceDecoder {
    static func parse(_ buffer: inout ByteBuffer, limits: RESPLimits) throws -> RESPCommand? {
        guard let first = buffer.getInteger(at: buffer.readerIndex, as: UInt8.self) else { return nil }
        if first != UInt8(ascii: "*") { return try RESPCommandDecoder.parse(&buffer, limits: limits) }

        var index = buffer.readerIndex + 1
        guard let count = try readNumber(buffer, at: &index, maxLineBytes: 24, what: "multibulk length")
        else { return nil }
        guard count <= limits.maxArguments else {
            throw RESPProtocolError("too many arguments (\(count), limit \(limits.maxArguments))")
        }
        guard count >= 0 else {
            throw RESPProtocolError("invalid multibulk length")
        }
        var args: [ByteBuffer] = []
        args.reserveCapacity(count)
        var frameBytes = 0
        for _ in 0..<count {
            guard let marker = buffer.getInteger(at: index, as: UInt8.self) else { return nil }
            guard marker == UInt8(ascii: "$") else {
                throw RESPProtocolError("expected '$', got '\(printable(marker))'")
            }
            index += 1
            guard let len = try readNumber(buffer, at: &index, maxLineBytes: 24, what: "bulk length") else {
                return nil
            }
            guard len >= 0 else { throw RESPProtocolError("invalid bulk length") }
            guard len <= limits.maxArgumentBytes else {
                throw RESPProtocolError("argument too long (\(len) bytes, limit \(limits.maxArgumentBytes))")
            }
            frameBytes += len
            guard frameBytes <= limits.maxFrameBytes else {
                throw RESPProtocolError("command too large (limit \(limits.maxFrameBytes) bytes)")
            }
            guard buffer.writerIndex - index >= len + 2 else { return nil }
            guard buffer.getInteger(at: index + len, as: UInt8.self) == 13,
                buffer.getInteger(at: index + len + 1, as: UInt8.self) == 10
            else { throw RESPProtocolError("bulk argument not terminated by CRLF") }
            args.append(buffer.getSlice(at: index, length: len)!)
            index += len + 2
        }
        buffer.moveReaderIndex(to: index)
        return RESPCommand(arguments: args)
    }

    /// Read a signed decimal terminated by CRLF at `index`; nil when the line is incomplete.
    static func readNumber(_ buffer: ByteBuffer, at index: inout Int, maxLineBytes: Int, what: String) throws -> Int? {
        var i = index
        var value = 0
        var negative = false
        var digits = 0
        while true {
            guard let c = buffer.getInteger(at: i, as: UInt8.self) else {
                if i - index > maxLineBytes { throw RESPProtocolError("invalid \(what)") }
                return nil
            }
            if c == 13 {
                guard let lf = buffer.getInteger(at: i + 1, as: UInt8.self) else { return nil }
                guard lf == 10, digits > 0 else { throw RESPProtocolError("invalid \(what)") }
                index = i + 2
                return negative ? -value : value
            }
            if c == UInt8(ascii: "-") && i == index {
                negative = true
            } else if c >= 48 && c <= 57 && digits < 18 {
                value = value * 10 + Int(c - 48)
                digits += 1
            } else {
                throw RESPProtocolError("invalid \(what)")
            }
            i += 1
        }
    }

    static func printable(_ c: UInt8) -> String {
        c >= 32 && c < 127 ? String(UnicodeScalar(c)) : "\\x" + String(c, radix: 16)
    }
}

@Suite("RESP decoder against its reference")
struct DecoderReferenceTests {
    enum Outcome: Equatable {
        case command([String], consumed: Int)
        case needMore
        case error(String)
    }

    static func outcome(_ bytes: [UInt8], limits: RESPLimits, reference: Bool) -> Outcome {
        var b = ByteBuffer(bytes: bytes)
        do {
            let c: RESPCommand?
            if reference {
                c = try ReferenceDecoder.parse(&b, limits: limits)
            } else {
                var args: [ByteBuffer] = [ByteBuffer(string: "stale")]   // a reused array's old contents never leak
                c = try RESPCommandDecoder.parse(&b, limits: limits, into: &args) ? RESPCommand(arguments: args) : nil
                if c == nil { #expect(args.isEmpty) }
            }
            guard let c else {
                #expect(b.readerIndex == 0, "an incomplete frame moves nothing")
                return .needMore
            }
            return .command(c.arguments.map { String(decoding: $0.readableBytesView, as: UTF8.self) }, consumed: b.readerIndex)
        } catch let e as RESPProtocolError {
            return .error(e.message)
        } catch {
            return .error("other: \(error)")
        }
    }

    /// Frames built from pieces that are valid, nearly valid and broken, then cut and mutated.
    static func randomFrame(_ rng: inout some RandomNumberGenerator) -> [UInt8] {
        var s = ""
        let n = Int.random(in: -2...6, using: &rng)
        s += Bool.random(using: &rng) ? "*\(n)\r\n" : ["*", "*x\r\n", "*-1\r\n", "*99999999999999999999\r\n", "*3\r", "*3\n"].randomElement(using: &rng)!
        for _ in 0..<max(0, n + Int.random(in: -1...1, using: &rng)) {
            let arg = String(repeating: ["a", "b", "\r", "\n", "$", "*", "é"].randomElement(using: &rng)!, count: Int.random(in: 0...70, using: &rng))
            let len = arg.utf8.count + [0, 0, 0, 0, 1, -1].randomElement(using: &rng)!
            s += ["$\(len)\r\n\(arg)\r\n", "$\(len)\r\n\(arg)", ":\(len)\r\n", "$-\(len)\r\n", "$\r\n", "$\(len)\n\(arg)\r\n"]
                .randomElement(using: &rng)!
        }
        var bytes = Array(s.utf8)
        if !bytes.isEmpty && Int.random(in: 0..<4, using: &rng) == 0 {
            bytes.removeLast(Int.random(in: 0...bytes.count, using: &rng))   // cut short
        }
        if !bytes.isEmpty && Int.random(in: 0..<4, using: &rng) == 0 {
            bytes[Int.random(in: 0..<bytes.count, using: &rng)] = UInt8.random(in: 0...255, using: &rng)   // one byte flipped
        }
        if Bool.random(using: &rng) { bytes += Array("*1\r\n$4\r\nPING\r\n".utf8) }   // a next command behind it
        return bytes
    }

    @Test func theDecoderAnswersEveryFrameAsItsReferenceDid() {
        var rng = SystemRandomNumberGenerator()
        let limits = [
            RESPLimits(),
            RESPLimits(maxArguments: 4, maxArgumentBytes: 64, maxInlineBytes: 64, maxFrameBytes: 100),
        ]
        var commands = 0, errors = 0, needMore = 0
        for _ in 0..<60_000 {
            let bytes = Self.randomFrame(&rng)
            for l in limits {
                let want = Self.outcome(bytes, limits: l, reference: true)
                let got = Self.outcome(bytes, limits: l, reference: false)
                #expect(got == want, "\(String(decoding: bytes, as: UTF8.self).debugDescription)")
                switch want {
                case .command: commands += 1
                case .needMore: needMore += 1
                case .error: errors += 1
                }
            }
        }
        // The generator reaches every kind of outcome, or the comparison proves little.
        #expect(commands > 5_000 && errors > 5_000 && needMore > 5_000, "\(commands) \(errors) \(needMore)")
    }

    @Test func theArgumentsOfAReusedArrayAreOnlyTheLastCommands() throws {
        var b = ByteBuffer(string: "*3\r\n$5\r\nCLAIM\r\n$1\r\nv\r\n$1\r\nu\r\n*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET")
        var args: [ByteBuffer] = []
        #expect(try RESPCommandDecoder.parse(&b, limits: RESPLimits(), into: &args))
        #expect(args.map { String(buffer: $0) } == ["CLAIM", "v", "u"])
        #expect(try RESPCommandDecoder.parse(&b, limits: RESPLimits(), into: &args))
        #expect(args.map { String(buffer: $0) } == ["PING"])
        #expect(try !RESPCommandDecoder.parse(&b, limits: RESPLimits(), into: &args))
        #expect(args.isEmpty && b.readableBytes == 11)
    }
}
