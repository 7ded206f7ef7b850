// libFuzzer target for quotad's RESP decoding and command parsing.
//
// Built by scripts/fuzz.sh: Sources/QuotaRESP/*.swift with `-sanitize=fuzzer,address` (coverage guides
// libFuzzer), this file with `-sanitize=address` only, linked against the NIOCore objects of
// `swift build -c release --scratch-path .build-fuzz --target QuotaRESP`.
//
// For every input:
//  1. The server-side decoder (`RESPCommandDecoder.parse`, what quotad's pipeline runs) decodes the
//     bytes as one buffer, under three sets of limits quotad's config accepts: the defaults, the
//     smallest, and one whose argument limit is larger than its frame limit.
//  2. The same bytes again, delivered in chunks the way `ByteToMessageHandler` delivers reads: the
//     commands and the final outcome must not depend on how the stream was cut.
//  3. Every decoded command goes through the pure command-parsing step: the name dispatch primitives
//     (`equalsUppercased`, `parsePositiveInt`, checked against plain-array references) and, for
//     CLAIM, `ClaimArguments.parse` (checked against an independent reference parse).
//  4. Every decoded command is re-encoded (`writeRESPValue`) and must decode back to itself with both
//     decoders.
//  5. The client-side reply decoder (`RESPValueDecoder.parse`) decodes the bytes, whole and chunked.
// Any broken invariant is a `fatalError`, which libFuzzer reports as a crash like any memory error.

import NIOCore
import QuotaRESP

// MARK: - Configuration

/// Limits as `SidecarServer.bind` builds them from `limits.*` (the inline limit is `max_argument_bytes`).
func serverLimits(arguments: Int, argumentBytes: Int, frameBytes: Int) -> RESPLimits {
    RESPLimits(maxArguments: arguments, maxArgumentBytes: argumentBytes, maxInlineBytes: argumentBytes,
               maxFrameBytes: frameBytes)
}

let limitSets: [RESPLimits] = [
    serverLimits(arguments: 32, argumentBytes: 4096, frameBytes: 65536),  // quotad's defaults
    serverLimits(arguments: 4, argumentBytes: 64, frameBytes: 256),  // the smallest the config accepts
    serverLimits(arguments: 4, argumentBytes: 300, frameBytes: 256),  // argument limit above the frame limit
]

/// `limits.max_qty` default.
let maxQty = 1000

/// Copy of `QuotaStore.isValidVoucherID` (QuotaRedis, which links hiredis, is not part of this build).
func isValidVoucherID(_ id: String) -> Bool {
    guard !id.isEmpty, id.utf8.count <= 64 else { return false }
    return id.utf8.allSatisfy { c in
        (c >= 48 && c <= 57) || (c >= 65 && c <= 90) || (c >= 97 && c <= 122) || c == 95 || c == 46 || c == 58
            || c == 45
    }
}

/// Every word ConnectionHandler compares an argument with (`equalsUppercased`).
let knownWords: [StaticString] = [
    "CLAIM", "UNCLAIM", "AVAIL", "PING", "INFO", "DRAIN", "CONFIG", "QUIT", "HELLO", "AUTH", "SELECT", "CLIENT",
    "ECHO", "DBSIZE", "SCAN", "COMMAND", "MULTI", "EXEC", "DISCARD", "WATCH", "UNWATCH",
    "QTY", "REQ", "GET", "SETNAME", "GETNAME", "SETINFO", "ID", "LIB-NAME", "LIB-VER", "COUNT", "DOCS",
]
let knownWordBytes: [[UInt8]] = knownWords.map { Array(UnsafeBufferPointer(start: $0.utf8Start, count: $0.utf8CodeUnitCount)) }

// MARK: - Entry

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    let bytes = size > 0 ? Array(UnsafeBufferPointer(start: data, count: size)) : []
    for limits in limitSets {
        let whole = decodeCommands(bytes, limits: limits, chunks: [bytes.count], inspect: true)
        let chunked = decodeCommands(bytes, limits: limits, chunks: chunkSizes(bytes), inspect: false)
        check(whole == chunked, "outcome depends on how the stream is cut: whole \(whole) vs chunked \(chunked)")
    }
    let values = decodeValues(bytes, chunks: [bytes.count])
    let valuesChunked = decodeValues(bytes, chunks: chunkSizes(bytes))
    check(values == valuesChunked, "reply decoding depends on how the stream is cut: \(values) vs \(valuesChunked)")
    return 0
}

@inline(__always)
func check(_ ok: Bool, _ what: @autoclosure () -> String) {
    if !ok { invariantBroken(what()) }
}

@inline(never)
func invariantBroken(_ what: String) -> Never {
    fatalError("FUZZ INVARIANT: \(what)")
}

// MARK: - Server-side decoder

/// What the server does with a byte stream: the commands it runs, then how the stream ended.
struct CommandRun: Equatable, CustomStringConvertible {
    var commands: [RESPCommand] = []
    /// nil: waiting for more bytes; otherwise the protocol error the peer is told.
    var error: String?
    var pendingBytes = 0

    var description: String {
        "\(commands.count) commands, " + (error.map { "error '\($0)'" } ?? "waiting with \(pendingBytes) bytes")
    }
}

/// Decode `bytes` delivered in reads of `chunks` sizes, like ByteToMessageHandler: after each read,
/// decode until the decoder wants more bytes or throws (then the connection is closed). With `inspect`,
/// every command also goes through `checkCommand`.
func decodeCommands(_ bytes: [UInt8], limits: RESPLimits, chunks: [Int], inspect: Bool) -> CommandRun {
    var run = CommandRun()
    var buffer = ByteBuffer()
    var offset = 0
    for n in chunks {
        buffer.writeBytes(bytes[offset..<offset + n])
        offset += n
        while true {
            let before = buffer.readerIndex
            let beforeBytes = buffer.readableBytes
            do {
                guard let command = try RESPCommandDecoder.parse(&buffer, limits: limits) else {
                    check(buffer.readerIndex == before, "an incomplete frame moved the reader index")
                    check(buffer.readableBytes <= maxPendingBytes(limits),
                          "decoder buffers \(buffer.readableBytes) bytes without deciding (limits \(limits))")
                    break
                }
                check(buffer.readerIndex > before, "a decoded command consumed no bytes")
                check(beforeBytes - buffer.readableBytes == buffer.readerIndex - before, "reader index moved oddly")
                if inspect { checkCommand(command, limits: limits) }
                run.commands.append(command)
            } catch let e as RESPProtocolError {
                check(!e.message.isEmpty, "empty protocol error message")
                check(!e.message.utf8.contains(13) && !e.message.utf8.contains(10), "CR/LF in an error message")
                run.error = e.message
                return run
            } catch {
                check(false, "decoder threw a non-protocol error: \(error)")
            }
        }
    }
    run.pendingBytes = buffer.readableBytes
    return run
}

/// The most bytes the decoder may hold while it still says "need more": a full frame at the limits plus
/// its headers, or an inline line with its CRLF. More than that and a peer could grow a connection's memory.
func maxPendingBytes(_ l: RESPLimits) -> Int {
    let header = 1 + 19 + 2  // '*' or '$', a sign and 18 digits, CRLF
    return max(header * (l.maxArguments + 1) + l.maxFrameBytes + 2 * l.maxArguments, l.maxInlineBytes + 2)
}

/// Read sizes derived from the input (FNV-1a seeded PRNG): a short input is cut into reads of 1-5 bytes
/// (sometimes more), a long one at up to 32 random places (every read re-parses the pending frame, so
/// more cuts would make long inputs quadratic).
func chunkSizes(_ bytes: [UInt8]) -> [Int] {
    var h: UInt64 = 0xcbf2_9ce4_8422_2325
    for b in bytes { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
    func next() -> Int {
        h = h &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
        return Int(truncatingIfNeeded: h >> 33)
    }
    guard bytes.count > 192 else {
        var sizes: [Int] = []
        var left = bytes.count
        while left > 0 {
            let r = next()
            let n = min(left, r % 4 == 0 ? 1 + r % 97 : 1 + r % 5)
            sizes.append(n)
            left -= n
        }
        return sizes
    }
    var cuts = Set<Int>()
    for _ in 0..<32 { cuts.insert(1 + next() % (bytes.count - 1)) }
    var sizes: [Int] = []
    var last = 0
    for c in cuts.sorted() + [bytes.count] {
        sizes.append(c - last)
        last = c
    }
    return sizes
}

// MARK: - Command parsing

/// Everything ConnectionHandler does with a command before any state is involved.
func checkCommand(_ command: RESPCommand, limits: RESPLimits) {
    let args = command.arguments
    check(args.count <= limits.maxArguments, "\(args.count) arguments over the limit \(limits.maxArguments)")
    var total = 0
    for a in args {
        check(a.readableBytes <= limits.maxArgumentBytes, "argument of \(a.readableBytes) bytes over the limit")
        total += a.readableBytes
    }
    check(total <= limits.maxFrameBytes, "command of \(total) argument bytes over the frame limit \(limits.maxFrameBytes)")
    guard !args.isEmpty else { return }  // an empty inline line: ConnectionHandler skips it

    // Dispatch primitives, against plain-array references.
    for a in args {
        let bytes = Array(a.readableBytesView)
        check(a.parsePositiveInt() == referencePositiveInt(bytes), "parsePositiveInt disagrees on \(bytes)")
        let upper = bytes.map { (97...122).contains($0) ? $0 - 32 : $0 }
        for (word, wordBytes) in zip(knownWords, knownWordBytes) {
            check(a.equalsUppercased(word) == (upper == wordBytes), "equalsUppercased(\(word)) disagrees on \(bytes)")
        }
    }
    let name = args[0]
    let matches = knownWords.prefix(21).filter { name.equalsUppercased($0) }
    check(matches.count <= 1, "command name matches \(matches.count) commands")

    if name.equalsUppercased("CLAIM") {
        let result = ClaimArguments.parse(args, maxQty: maxQty, isValidVoucher: isValidVoucherID)
        let reference = referenceClaim(args.map { Array($0.readableBytesView) })
        switch result {
        case .success(let c):
            check(c.qty >= 1 && c.qty <= maxQty, "qty \(c.qty) out of range")
            check(isValidVoucherID(c.voucher), "invalid voucher accepted")
            check((1...256).contains(c.user.readableBytes), "user id of \(c.user.readableBytes) bytes accepted")
            check(c.req.map { (1...128).contains($0.readableBytes) } ?? true, "bad REQ id accepted")
            check(reference == .ok(qty: c.qty, user: Array(c.user.readableBytesView),
                                   req: c.req.map { Array($0.readableBytesView) }),
                  "CLAIM accepted as \(c), reference says \(reference)")
        case .failure(.arity):
            check(reference == .arity, "CLAIM arity error, reference says \(reference)")
        case .failure(.badVoucher(let v)):
            check(!isValidVoucherID(v), "valid voucher refused")
            check(reference == .badVoucher, "CLAIM bad voucher, reference says \(reference)")
        case .failure(.syntax(let m)):
            check(!m.isEmpty, "empty syntax message")
            check(reference == .syntax, "CLAIM syntax error '\(m)', reference says \(reference)")
        }
    }

    // A command re-encoded as a RESP array of bulk strings decodes back to itself, with both decoders.
    var encoded = ByteBuffer()
    encoded.writeRESPValue(.array(args.map { .bulkString($0) }))
    var again = encoded
    do {
        let back = try RESPCommandDecoder.parse(&again, limits: limits)
        check(back == command && again.readableBytes == 0, "re-encoded command decodes as \(String(describing: back))")
        again = encoded
        let value = try RESPValueDecoder.parse(&again)
        check(value == .array(args.map { .bulkString($0) }) && again.readableBytes == 0,
              "re-encoded command decodes as the reply \(String(describing: value))")
    } catch {
        check(false, "re-encoded command refused: \(error)")
    }
}

func referencePositiveInt(_ b: [UInt8]) -> Int? {
    guard (1...18).contains(b.count), b.allSatisfy({ $0 >= 48 && $0 <= 57 }) else { return nil }
    return b.reduce(0) { $0 * 10 + Int($1 - 48) }
}

enum ReferenceClaim: Equatable {
    case ok(qty: Int, user: [UInt8], req: [UInt8]?)
    case arity, syntax, badVoucher
}

/// CLAIM's grammar written independently on byte arrays: `CLAIM voucher user (QTY n | REQ id)*`.
func referenceClaim(_ a: [[UInt8]]) -> ReferenceClaim {
    guard a.count >= 3 else { return .arity }
    var qty = 1
    var req: [UInt8]?
    var options = a[3...]
    while let option = options.first {
        options = options.dropFirst()
        let upper = option.map { (97...122).contains($0) ? $0 - 32 : $0 }
        guard upper == Array("QTY".utf8) || upper == Array("REQ".utf8) else { return .syntax }
        guard let value = options.first else { return .syntax }
        options = options.dropFirst()
        if upper == Array("QTY".utf8) {
            guard let n = referencePositiveInt(value), (1...maxQty).contains(n) else { return .syntax }
            qty = n
        } else {
            guard (1...128).contains(value.count) else { return .syntax }
            req = value
        }
    }
    let voucherOK = (1...64).contains(a[1].count) && a[1].allSatisfy { c in
        (48...57).contains(c) || (65...90).contains(c) || (97...122).contains(c) || c == 95 || c == 46 || c == 58 || c == 45
    }
    guard voucherOK else { return .badVoucher }
    guard (1...256).contains(a[2].count) else { return .syntax }
    return .ok(qty: qty, user: a[2], req: req)
}

// MARK: - Client-side reply decoder

struct ValueRun: Equatable, CustomStringConvertible {
    var values: [RESPValue] = []
    var error: String?
    var description: String { "\(values.count) values, error \(error ?? "none")" }
}

func decodeValues(_ bytes: [UInt8], chunks: [Int]) -> ValueRun {
    var run = ValueRun()
    var buffer = ByteBuffer()
    var offset = 0
    for n in chunks {
        buffer.writeBytes(bytes[offset..<offset + n])
        offset += n
        while true {
            let before = buffer.readerIndex
            do {
                guard let v = try RESPValueDecoder.parse(&buffer) else {
                    check(buffer.readerIndex == before, "an incomplete reply moved the reader index")
                    break
                }
                check(buffer.readerIndex > before, "a decoded reply consumed no bytes")
                // Encoding the value and decoding it again gives the same value.
                var encoded = ByteBuffer()
                encoded.writeRESPValue(v)
                do {
                    let back = try RESPValueDecoder.parse(&encoded)
                    check(back == v && encoded.readableBytes == 0, "reply \(v) re-decodes as \(String(describing: back))")
                } catch {
                    check(false, "re-encoded reply \(v) refused: \(error)")
                }
                run.values.append(v)
            } catch let e as RESPProtocolError {
                run.error = e.message
                return run
            } catch {
                check(false, "reply decoder threw a non-protocol error: \(error)")
            }
        }
    }
    return run
}
