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
        guard let first = buffer.getInteger(at: buffer.readerIndex, as: UInt8.self) else { return nil }
        if first != UInt8(ascii: "*") { return try parseInline(&buffer, limits: limits) }

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

    private static func parseInline(_ buffer: inout ByteBuffer, limits: RESPLimits) throws -> RESPCommand? {
        let view = buffer.readableBytesView
        guard let nl = view.firstIndex(of: 10) else {
            // A line of exactly the limit may have its CR here and its LF still to come.
            if view.count > limits.maxInlineBytes + (view.last == 13 ? 1 : 0) {
                throw RESPProtocolError("too big inline request (limit \(limits.maxInlineBytes) bytes)")
            }
            return nil
        }
        var end = nl
        if end > view.startIndex && view[end - 1] == 13 { end -= 1 }
        guard end - view.startIndex <= limits.maxInlineBytes else {
            throw RESPProtocolError("too big inline request (limit \(limits.maxInlineBytes) bytes)")
        }
        var args: [ByteBuffer] = []
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
            args.append(buffer.getSlice(at: start, length: i - start)!)
        }
        buffer.moveReaderIndex(to: nl + 1)
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
