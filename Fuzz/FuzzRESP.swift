// libFuzzer target for quotad's RESP decoding and command parsing.
//
// Built by scripts/fuzz.sh: Sources/QuotaRESP/*.swift with `-sanitize=fuzzer,address` (coverage guides
// libFuzzer), this file with `-sanitize=address` only, linked against the NIOCore objects of
// `swift build -c release --scratch-path .build-fuzz --target QuotaRESP`.
//
// For every input:
//  1. The server-side decoder (`RESPCommandDecoder.parse`, what quotad's pipeline runs) decodes the
//     bytes as one buffer, under each of three sets of limits quotad's config accepts: the defaults, one
//     whose argument limit is larger than its frame limit, and the smallest. Each set is at most the one
//     before it in every limit, so each run must be a prefix of the run before it (limits refuse, they
//     never change what a frame means).
//  2. The same bytes again, delivered in reads the way `ByteToMessageHandler` delivers them, under ONE of
//     the three sets, chosen (like the read sizes) from a hash of the input: the commands and the final
//     outcome must be those of the one-buffer run under that set. Every input is decoded whole under all
//     three sets; over a run, each set gets the cut decoding for a third of the inputs.
//  3. Every decoded command goes through the pure command-parsing step: the name dispatch primitives
//     (`equalsUppercased`, `parsePositiveInt`, checked against plain-array references) and, for
//     CLAIM, `ClaimArguments.parse` (checked against an independent reference parse). These do not depend
//     on the limits, so they run once per command (on the loosest set's run, which holds the others').
//  4. Every decoded command is re-encoded (`writeRESPValue`) and must decode back to itself with both
//     decoders (the command decoder under every limit set that accepted it).
//  5. The client-side reply decoder (`RESPValueDecoder.parse`) decodes the bytes, whole and in the same
//     reads.
// Any broken invariant is a `fatalError`, which libFuzzer reports as a crash like any memory error.
//
// Cost: under ASan every allocation is expensive, so the harness allocates per input, not per command or
// argument: the input is copied into one buffer that all whole decodes share, the read-by-read decodes
// reuse one buffer and compare each command with the whole run as it comes (nothing keeps a slice of that
// buffer, so writing the next read never copies it), the references work on the argument's bytes in place.

import NIOCore
import QuotaRESP

// MARK: - Configuration

/// Limits as `SidecarServer.bind` builds them from `limits.*` (the inline limit is `max_argument_bytes`).
func serverLimits(arguments: Int, argumentBytes: Int, frameBytes: Int) -> RESPLimits {
    RESPLimits(maxArguments: arguments, maxArgumentBytes: argumentBytes, maxInlineBytes: argumentBytes,
               maxFrameBytes: frameBytes)
}

/// From the loosest to the tightest: every limit of a set is at most that of the set before it.
let limitSets: [RESPLimits] = [
    serverLimits(arguments: 32, argumentBytes: 4096, frameBytes: 65536),  // quotad's defaults
    serverLimits(arguments: 4, argumentBytes: 300, frameBytes: 256),  // argument limit above the frame limit
    serverLimits(arguments: 4, argumentBytes: 64, frameBytes: 256),  // the smallest the config accepts
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

/// Every word ConnectionHandler compares an argument with (`equalsUppercased`); the first 21 are commands.
let knownWords: [StaticString] = [
    "CLAIM", "UNCLAIM", "AVAIL", "PING", "INFO", "DRAIN", "CONFIG", "QUIT", "HELLO", "AUTH", "SELECT", "CLIENT",
    "ECHO", "DBSIZE", "SCAN", "COMMAND", "MULTI", "EXEC", "DISCARD", "WATCH", "UNWATCH",
    "QTY", "REQ", "GET", "SETNAME", "GETNAME", "SETINFO", "ID", "LIB-NAME", "LIB-VER", "COUNT", "DOCS",
]
let knownWordBytes: [[UInt8]] = knownWords.map { Array(UnsafeBufferPointer(start: $0.utf8Start, count: $0.utf8CodeUnitCount)) }
let commandWordCount = 21

// MARK: - Entry

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    let input = UnsafeRawBufferPointer(start: data, count: size)
    var plan = InputPlan(input)
    let reads = plan.readSizes()
    let cutSet = plan.cutLimitSet()

    // One copy of the input, shared (read only) by every whole-buffer decode; one buffer for the reads.
    let stream = ByteBuffer(bytes: input)
    var scratch = ByteBufferAllocator().buffer(capacity: max(size, 16))
    var encoded = ByteBufferAllocator().buffer(capacity: 64)

    // 1. Whole, under every limit set; each run a prefix of the looser set's.
    let runs = limitSets.map { decodeWhole(stream, limits: $0) }
    for i in 1..<runs.count {
        checkPrefix(tight: runs[i], loose: runs[i - 1], limits: limitSets[i])
    }
    // 3, 4. The loosest run holds every command any set accepted.
    for (k, command) in runs[0].commands.enumerated() {
        checkCommand(command, index: k, runs: runs, encoded: &encoded)
    }
    // 2. In reads, under the set the input picked.
    decodeInReads(input, limits: limitSets[cutSet], reads: reads, expected: runs[cutSet], buffer: &scratch)

    // 5. The client's reply decoder, whole and in the same reads.
    let values = decodeValuesWhole(stream, encoded: &encoded)
    decodeValuesInReads(input, reads: reads, expected: values, buffer: &scratch)
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

// MARK: - What an input is cut into

/// The read sizes and the limit set of the read-by-read decode, derived from the input (FNV-1a seeded PRNG):
/// the same input always gets the same, and libFuzzer's mutations spread inputs over all of them.
struct InputPlan {
    var h: UInt64 = 0xcbf2_9ce4_8422_2325
    let count: Int

    init(_ bytes: UnsafeRawBufferPointer) {
        for b in bytes { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
        count = bytes.count
    }

    mutating func next() -> Int {
        h = h &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
        return Int(truncatingIfNeeded: h >> 33)
    }

    /// A short input is cut into reads of 1-5 bytes (sometimes more), a long one at up to 32 random places
    /// (every read re-parses the pending frame, so more cuts would make long inputs quadratic).
    mutating func readSizes() -> [Int] {
        var sizes: [Int] = []
        guard count > 192 else {
            sizes.reserveCapacity(count)
            var left = count
            while left > 0 {
                let r = next()
                let n = min(left, r % 4 == 0 ? 1 + r % 97 : 1 + r % 5)
                sizes.append(n)
                left -= n
            }
            return sizes
        }
        sizes.reserveCapacity(34)
        for _ in 0..<32 { sizes.append(1 + next() % (count - 1)) }  // cut positions first
        sizes.sort()
        sizes.append(count)
        var last = 0
        var n = 0
        for c in sizes where c != last {  // equal cuts are one cut
            sizes[n] = c - last
            n += 1
            last = c
        }
        sizes.removeLast(sizes.count - n)
        return sizes
    }

    /// Which limit set the read-by-read decode runs under (after `readSizes`).
    mutating func cutLimitSet() -> Int { next() % limitSets.count }
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

enum Step {
    case command(RESPCommand)
    case needMore
    case error(String)
}

/// One `RESPCommandDecoder.parse` call as the server makes it, with the invariants of a single call: only
/// `RESPProtocolError` is thrown, with a one-line message; "need more bytes" leaves the reader index alone
/// and holds at most a frame at the limits; a command consumes bytes and respects every limit.
@inline(__always)
func parseStep(_ buffer: inout ByteBuffer, limits: RESPLimits) -> Step {
    let before = buffer.readerIndex
    let beforeBytes = buffer.readableBytes
    do {
        guard let command = try RESPCommandDecoder.parse(&buffer, limits: limits) else {
            check(buffer.readerIndex == before, "an incomplete frame moved the reader index")
            check(buffer.readableBytes <= maxPendingBytes(limits),
                  "decoder buffers \(buffer.readableBytes) bytes without deciding (limits \(limits))")
            return .needMore
        }
        check(buffer.readerIndex > before, "a decoded command consumed no bytes")
        check(beforeBytes - buffer.readableBytes == buffer.readerIndex - before, "reader index moved oddly")
        checkLimits(command, limits: limits)
        return .command(command)
    } catch let e as RESPProtocolError {
        check(!e.message.isEmpty, "empty protocol error message")
        check(!e.message.utf8.contains(13) && !e.message.utf8.contains(10), "CR/LF in an error message")
        return .error(e.message)
    } catch {
        invariantBroken("decoder threw a non-protocol error: \(error)")
    }
}

/// The stream in one read: decode until the decoder wants more bytes or throws (the connection is closed).
func decodeWhole(_ stream: ByteBuffer, limits: RESPLimits) -> CommandRun {
    var run = CommandRun()
    var buffer = stream  // shares the storage: parse only moves the reader index
    while true {
        switch parseStep(&buffer, limits: limits) {
        case .command(let c): run.commands.append(c)
        case .needMore:
            run.pendingBytes = buffer.readableBytes
            return run
        case .error(let m):
            run.error = m
            return run
        }
    }
}

/// The stream in reads of `reads` sizes, like ByteToMessageHandler: after each read, decode until the decoder
/// wants more bytes or throws. Each command, and the end, must be what the one-read run had.
func decodeInReads(_ input: UnsafeRawBufferPointer, limits: RESPLimits, reads: [Int], expected: CommandRun,
                   buffer: inout ByteBuffer) {
    buffer.clear()
    var offset = 0
    var k = 0
    for n in reads {
        buffer.writeBytes(UnsafeRawBufferPointer(rebasing: input[offset..<offset + n]))
        offset += n
        decoding: while true {
            switch parseStep(&buffer, limits: limits) {
            case .command(let c):
                check(k < expected.commands.count && expected.commands[k] == c,
                      "outcome depends on how the stream is cut: command \(k) in reads is \(c.arguments), whole run: \(expected)")
                k += 1
            case .needMore:
                break decoding
            case .error(let m):
                check(k == expected.commands.count && expected.error == m,
                      "outcome depends on how the stream is cut: error '\(m)' after \(k) commands in reads, whole run: \(expected)")
                return
            }
        }
    }
    check(k == expected.commands.count && expected.error == nil && buffer.readableBytes == expected.pendingBytes,
          "outcome depends on how the stream is cut: \(k) commands then waiting with \(buffer.readableBytes) bytes in reads, whole run: \(expected)")
}

/// Limits only refuse: what `tight` (at most `loose` in every limit) accepted, `loose` accepted the same way,
/// and if `tight` ended waiting for bytes, so did `loose`, identically.
func checkPrefix(tight: CommandRun, loose: CommandRun, limits: RESPLimits) {
    if tight.error == nil {
        check(tight == loose, "a looser limit set changes the outcome: \(tight) under \(limits), \(loose) looser")
    } else {
        check(tight.commands.count <= loose.commands.count
                && zip(tight.commands, loose.commands).allSatisfy { $0 == $1 },
              "a looser limit set changes the commands: \(tight) under \(limits), \(loose) looser")
    }
}

/// The most bytes the decoder may hold while it still says "need more": a full frame at the limits plus
/// its headers, or an inline line with its CRLF. More than that and a peer could grow a connection's memory.
func maxPendingBytes(_ l: RESPLimits) -> Int {
    let header = 1 + 19 + 2  // '*' or '$', a sign and 18 digits, CRLF
    return max(header * (l.maxArguments + 1) + l.maxFrameBytes + 2 * l.maxArguments, l.maxInlineBytes + 2)
}

/// A decoded command respects every limit (argument count, argument size, frame size).
@inline(__always)
func checkLimits(_ command: RESPCommand, limits: RESPLimits) {
    let args = command.arguments
    check(args.count <= limits.maxArguments, "\(args.count) arguments over the limit \(limits.maxArguments)")
    var total = 0
    for a in args {
        check(a.readableBytes <= limits.maxArgumentBytes, "argument of \(a.readableBytes) bytes over the limit")
        total += a.readableBytes
    }
    check(total <= limits.maxFrameBytes, "command of \(total) argument bytes over the frame limit \(limits.maxFrameBytes)")
}

// MARK: - Command parsing

/// Everything ConnectionHandler does with a command before any state is involved. `command` is command
/// `index` of `runs[0]`; each run that has that many commands accepted it too.
func checkCommand(_ command: RESPCommand, index: Int, runs: [CommandRun], encoded: inout ByteBuffer) {
    let args = command.arguments
    guard !args.isEmpty else { return }  // an empty inline line: ConnectionHandler skips it

    // Dispatch primitives, against references on the argument's bytes.
    for a in args {
        a.withUnsafeReadableBytes { bytes in
            check(a.parsePositiveInt() == referencePositiveInt(bytes), "parsePositiveInt disagrees on \(Array(bytes))")
            for (word, wordBytes) in zip(knownWords, knownWordBytes) {
                check(a.equalsUppercased(word) == referenceEqualsUppercased(bytes, wordBytes),
                      "equalsUppercased(\(word)) disagrees on \(Array(bytes))")
            }
        }
    }
    let name = args[0]
    var matches = 0
    for word in knownWords.prefix(commandWordCount) where name.equalsUppercased(word) { matches += 1 }
    check(matches <= 1, "command name matches \(matches) commands")

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

    // A command re-encoded as a RESP array of bulk strings decodes back to itself: with the server's decoder
    // under every limit set that accepted it, and with the client's.
    let asValue = RESPValue.array(args.map { .bulkString($0) })
    encoded.clear()
    encoded.writeRESPValue(asValue)
    do {
        for (s, run) in runs.enumerated() where index < run.commands.count {
            var again = encoded
            let back = try RESPCommandDecoder.parse(&again, limits: limitSets[s])
            check(back == command && again.readableBytes == 0,
                  "re-encoded command decodes as \(String(describing: back)) under \(limitSets[s])")
        }
        var again = encoded
        let value = try RESPValueDecoder.parse(&again)
        check(value == asValue && again.readableBytes == 0,
              "re-encoded command decodes as the reply \(String(describing: value))")
    } catch {
        check(false, "re-encoded command refused: \(error)")
    }
}

func referencePositiveInt(_ b: UnsafeRawBufferPointer) -> Int? {
    guard (1...18).contains(b.count), b.allSatisfy({ $0 >= 48 && $0 <= 57 }) else { return nil }
    return b.reduce(0) { $0 * 10 + Int($1 - 48) }
}

@inline(__always)
func referenceEqualsUppercased(_ b: UnsafeRawBufferPointer, _ upper: [UInt8]) -> Bool {
    b.count == upper.count && zip(b, upper).allSatisfy { ((97...122).contains($0) ? $0 - 32 : $0) == $1 }
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
            guard let n = value.withUnsafeBytes(referencePositiveInt), (1...maxQty).contains(n) else { return .syntax }
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

/// The stream in one read; every value re-encodes and decodes back to itself.
func decodeValuesWhole(_ stream: ByteBuffer, encoded: inout ByteBuffer) -> ValueRun {
    var run = ValueRun()
    var buffer = stream
    while true {
        let before = buffer.readerIndex
        do {
            guard let v = try RESPValueDecoder.parse(&buffer) else {
                check(buffer.readerIndex == before, "an incomplete reply moved the reader index")
                return run
            }
            check(buffer.readerIndex > before, "a decoded reply consumed no bytes")
            encoded.clear()
            encoded.writeRESPValue(v)
            do {
                var again = encoded
                let back = try RESPValueDecoder.parse(&again)
                check(back == v && again.readableBytes == 0, "reply \(v) re-decodes as \(String(describing: back))")
            } catch {
                check(false, "re-encoded reply \(v) refused: \(error)")
            }
            run.values.append(v)
        } catch let e as RESPProtocolError {
            run.error = e.message
            return run
        } catch {
            invariantBroken("reply decoder threw a non-protocol error: \(error)")
        }
    }
}

/// The stream in reads of `reads` sizes: the same values and the same end as in one read.
func decodeValuesInReads(_ input: UnsafeRawBufferPointer, reads: [Int], expected: ValueRun, buffer: inout ByteBuffer) {
    buffer.clear()
    var offset = 0
    var k = 0
    for n in reads {
        buffer.writeBytes(UnsafeRawBufferPointer(rebasing: input[offset..<offset + n]))
        offset += n
        while true {
            let before = buffer.readerIndex
            do {
                guard let v = try RESPValueDecoder.parse(&buffer) else {
                    check(buffer.readerIndex == before, "an incomplete reply moved the reader index")
                    break
                }
                check(buffer.readerIndex > before, "a decoded reply consumed no bytes")
                check(k < expected.values.count && expected.values[k] == v,
                      "reply decoding depends on how the stream is cut: value \(k) in reads is \(v), whole: \(expected)")
                k += 1
            } catch let e as RESPProtocolError {
                check(k == expected.values.count && expected.error == e.message,
                      "reply decoding depends on how the stream is cut: error '\(e.message)' after \(k) values, whole: \(expected)")
                return
            } catch {
                invariantBroken("reply decoder threw a non-protocol error: \(error)")
            }
        }
    }
    check(k == expected.values.count && expected.error == nil,
          "reply decoding depends on how the stream is cut: \(k) values then waiting, whole: \(expected)")
}
