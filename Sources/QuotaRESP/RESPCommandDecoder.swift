import NIOCore

/// Decodes RESP2 command frames (`*N\r\n$len\r\narg\r\n…`) and inline commands
/// (`PING\r\n`). A frame is committed only when it is complete: the reader index
/// moves only then. Declared sizes are checked against ``RESPLimits`` as soon as
/// their header arrives, so a peer cannot make the server buffer an oversized frame.
public struct RESPCommandDecoder: ByteToMessageDecoder, Sendable {
    public typealias InboundOut = RESPCommand

    public let limits: RESPLimits

    public init(limits: RESPLimits = RESPLimits()) { self.limits = limits }

    public mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let command = try Self.parse(&buffer, limits: limits) else { return .needMoreData }
        context.fireChannelRead(Self.wrapInboundOut(command))
        return .continue
    }

    public mutating func decodeLast(
        context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool
    ) throws -> DecodingState {
        while try decode(context: context, buffer: &buffer) == .continue {}
        return .needMoreData
    }

    /// Parse one command from the front of `buffer`. Returns nil (and leaves `buffer`
    /// untouched) when the frame is incomplete; throws on a frame that breaks the protocol or a limit.
    /// An empty inline line yields a command with no arguments, which callers skip.
    public static func parse(_ buffer: inout ByteBuffer, limits: RESPLimits) throws -> RESPCommand? {
        var args: [ByteBuffer] = []
        guard try parse(&buffer, limits: limits, into: &args) else { return nil }
        return RESPCommand(arguments: args)
    }

    /// ``parse(_:limits:)`` into `args` (emptied first, its capacity kept): true when a command was parsed
    /// (its arguments are then in `args`). A caller that keeps one array for its commands allocates none
    /// per command.
    public static func parse(_ buffer: inout ByteBuffer, limits: RESPLimits, into args: inout [ByteBuffer]) throws -> Bool {
        args.removeAll(keepingCapacity: true)
        var spans: [RESPSpan] = []
        let whole = buffer   // (a slice is made where the reader index was: below it, `getSlice` gives nil)
        guard try parse(&buffer, limits: limits, spans: &spans) else { return false }
        for s in spans { args.append(whole.getSlice(at: s.start, length: s.count)!) }
        return true
    }

    /// ``parse(_:limits:into:)`` giving each argument as its place in `buffer` (``RESPSpan``: indices below
    /// the reader index once the command is parsed), not as a slice of it: a slice retains the buffer's
    /// storage, and releases it when dropped (issue 13: ~20 atomic reference-count operations a `CLAIM`). The
    /// arguments are read where they are with `withVeryUnsafeBytes` until the bytes are discarded or written
    /// over. The multibulk frame is read from the raw bytes, not byte by byte through the buffer.
    public static func parse(_ buffer: inout ByteBuffer, limits: RESPLimits, spans args: inout [RESPSpan]) throws -> Bool {
        args.removeAll(keepingCapacity: true)
        guard let first = buffer.getInteger(at: buffer.readerIndex, as: UInt8.self) else { return false }
        if first != UInt8(ascii: "*") {
            return try parseInline(&buffer, limits: limits, into: &args)
        }
        let base = buffer.readerIndex
        // The frame's length when it is complete, nil when more bytes are needed.
        let used: Int? = try buffer.withUnsafeReadableBytes { raw in
            var index = 1
            guard let count = try readNumber(raw, at: &index, maxLineBytes: 24, what: "multibulk length") else { return nil }
            guard count <= limits.maxArguments else {
                throw RESPProtocolError("too many arguments (\(count), limit \(limits.maxArguments))")
            }
            guard count >= 0 else {
                throw RESPProtocolError("invalid multibulk length")
            }
            args.reserveCapacity(count)
            var frameBytes = 0
            for _ in 0..<count {
                guard index < raw.count else { return nil }
                let marker = raw[index]
                guard marker == UInt8(ascii: "$") else {
                    throw RESPProtocolError("expected '$', got '\(printable(marker))'")
                }
                index += 1
                guard let len = try readNumber(raw, at: &index, maxLineBytes: 24, what: "bulk length") else { return nil }
                guard len >= 0 else { throw RESPProtocolError("invalid bulk length") }
                guard len <= limits.maxArgumentBytes else {
                    throw RESPProtocolError("argument too long (\(len) bytes, limit \(limits.maxArgumentBytes))")
                }
                frameBytes += len
                guard frameBytes <= limits.maxFrameBytes else {
                    throw RESPProtocolError("command too large (limit \(limits.maxFrameBytes) bytes)")
                }
                guard raw.count - index >= len + 2 else { return nil }
                guard raw[index + len] == 13, raw[index + len + 1] == 10 else {
                    throw RESPProtocolError("bulk argument not terminated by CRLF")
                }
                args.append(RESPSpan(start: base + index, count: len))
                index += len + 2
            }
            return index
        }
        guard let used else {
            args.removeAll(keepingCapacity: true)
            return false
        }
        buffer.moveReaderIndex(forwardBy: used)
        return true
    }

    /// An inline command into `args` (empty on entry); false when its line is incomplete (nothing added).
    private static func parseInline(_ buffer: inout ByteBuffer, limits: RESPLimits, into args: inout [RESPSpan]) throws -> Bool {
        let view = buffer.readableBytesView
        guard let nl = view.firstIndex(of: 10) else {
            // A line of exactly the limit may have its CR here and its LF still to come.
            if view.count > limits.maxInlineBytes + (view.last == 13 ? 1 : 0) {
                throw RESPProtocolError("too big inline request (limit \(limits.maxInlineBytes) bytes)")
            }
            return false
        }
        var end = nl
        if end > view.startIndex && view[end - 1] == 13 { end -= 1 }
        guard end - view.startIndex <= limits.maxInlineBytes else {
            throw RESPProtocolError("too big inline request (limit \(limits.maxInlineBytes) bytes)")
        }
        var frameBytes = 0
        var i = view.startIndex
        while i < end {
            while i < end && (view[i] == 32 || view[i] == 9) { i += 1 }
            guard i < end else { break }
            let start = i
            while i < end && view[i] != 32 && view[i] != 9 { i += 1 }
            guard args.count < limits.maxArguments else {
                throw RESPProtocolError("too many arguments (limit \(limits.maxArguments))")
            }
            guard i - start <= limits.maxArgumentBytes else {
                throw RESPProtocolError("argument too long (limit \(limits.maxArgumentBytes) bytes)")
            }
            // The frame limit holds for inline commands too (the inline limit may be set above it).
            frameBytes += i - start
            guard frameBytes <= limits.maxFrameBytes else {
                throw RESPProtocolError("command too large (limit \(limits.maxFrameBytes) bytes)")
            }
            args.append(RESPSpan(start: start, count: i - start))
        }
        buffer.moveReaderIndex(to: nl + 1)
        return true
    }

    /// Read a signed decimal terminated by CRLF at `index`; nil when the line is incomplete.
    @inline(__always)
    static func readNumber(_ raw: UnsafeRawBufferPointer, at index: inout Int, maxLineBytes: Int, what: String) throws -> Int? {
        var i = index
        var value = 0
        var negative = false
        var digits = 0
        while true {
            guard i < raw.count else {
                if i - index > maxLineBytes { throw RESPProtocolError("invalid \(what)") }
                return nil
            }
            let c = raw[i]
            if c == 13 {
                guard i + 1 < raw.count else { return nil }
                guard raw[i + 1] == 10, digits > 0 else { throw RESPProtocolError("invalid \(what)") }
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

/// One argument of a decoded command: where its bytes are in the buffer it was decoded from (``ByteBuffer``
/// indices).
public struct RESPSpan: Sendable, Equatable {
    public var start: Int
    public var count: Int

    public init(start: Int, count: Int) {
        self.start = start
        self.count = count
    }
}
