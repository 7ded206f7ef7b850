import NIOCore

/// A RESP2 value: what the server replies, and what a client reads.
public enum RESPValue: Sendable, Equatable, CustomStringConvertible {
    case simpleString(String)
    case error(String)
    case integer(Int)
    case bulkString(ByteBuffer?)
    case array([RESPValue]?)

    public static func bulk(_ s: String) -> RESPValue { .bulkString(ByteBuffer(string: s)) }
    public static let ok = RESPValue.simpleString("OK")
    public static let null = RESPValue.bulkString(nil)

    /// The value as text: simple and bulk strings, the message of an error, integers.
    public var string: String? {
        switch self {
        case .simpleString(let s), .error(let s): return s
        case .bulkString(let b?): return String(buffer: b)
        case .integer(let i): return String(i)
        default: return nil
        }
    }

    public var isError: Bool { if case .error = self { return true } else { return false } }

    /// The first word of an error reply (`SOLDOUT`, `ERR`, …), or nil.
    public var errorCode: String? {
        guard case .error(let s) = self else { return nil }
        return String(s.prefix { $0 != " " })
    }

    /// The whole text of an error reply, or nil.
    public var errorMessage: String? {
        guard case .error(let s) = self else { return nil }
        return s
    }

    public var description: String {
        switch self {
        case .simpleString(let s): return "+\(s)"
        case .error(let s): return "-\(s)"
        case .integer(let i): return ":\(i)"
        case .bulkString(let b): return b.map { "\"\(String(buffer: $0))\"" } ?? "(nil)"
        case .array(let a): return a.map { "[" + $0.map(\.description).joined(separator: ", ") + "]" } ?? "(nil array)"
        }
    }
}

extension ByteBuffer {
    /// Append `value` in RESP2 encoding.
    public mutating func writeRESPValue(_ value: RESPValue) {
        switch value {
        case .simpleString(let s):
            writeInteger(UInt8(ascii: "+"))
            writeString(s)
            writeStaticString("\r\n")
        case .error(let s):
            writeInteger(UInt8(ascii: "-"))
            writeString(s)
            writeStaticString("\r\n")
        case .integer(let i):
            writeInteger(UInt8(ascii: ":"))
            writeString(String(i))
            writeStaticString("\r\n")
        case .bulkString(nil):
            writeStaticString("$-1\r\n")
        case .bulkString(var b?):
            writeInteger(UInt8(ascii: "$"))
            writeString(String(b.readableBytes))
            writeStaticString("\r\n")
            writeBuffer(&b)
            writeStaticString("\r\n")
        case .array(nil):
            writeStaticString("*-1\r\n")
        case .array(let items?):
            writeInteger(UInt8(ascii: "*"))
            writeString(String(items.count))
            writeStaticString("\r\n")
            for item in items { writeRESPValue(item) }
        }
    }

    /// Append `command` as a RESP2 array of bulk strings.
    public mutating func writeRESPCommand(_ args: [String]) {
        writeRESPValue(.array(args.map { .bulk($0) }))
    }
}

/// Decodes RESP2 replies (client side: tests, `quotactl status`, `quota-bench`).
public struct RESPValueDecoder: ByteToMessageDecoder, Sendable {
    public typealias InboundOut = RESPValue
    public var maxBulkBytes: Int
    public var maxDepth = 8

    public init(maxBulkBytes: Int = 64 << 20) { self.maxBulkBytes = maxBulkBytes }

    public mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let v = try Self.parse(&buffer, maxBulkBytes: maxBulkBytes) else { return .needMoreData }
        context.fireChannelRead(Self.wrapInboundOut(v))
        return .continue
    }

    /// Parse one value from the front of `buffer`; nil (buffer untouched) when incomplete.
    public static func parse(_ buffer: inout ByteBuffer, maxBulkBytes: Int = 64 << 20) throws -> RESPValue? {
        var index = buffer.readerIndex
        guard let v = try parseValue(buffer, at: &index, maxBulkBytes: maxBulkBytes, depth: 0) else { return nil }
        buffer.moveReaderIndex(to: index)
        return v
    }

    private static func line(_ buffer: ByteBuffer, at index: inout Int) -> String? {
        let view = buffer.readableBytesView
        let start = index - buffer.readerIndex + view.startIndex
        guard start <= view.endIndex,
            let cr = view[start...].firstIndex(of: 13), cr + 1 < view.endIndex
        else { return nil }
        let s = String(decoding: view[start..<cr], as: UTF8.self)
        index += cr - start + 2
        return s
    }

    private static func parseValue(_ b: ByteBuffer, at index: inout Int, maxBulkBytes: Int, depth: Int) throws
        -> RESPValue?
    {
        guard depth < 8 else { throw RESPProtocolError("reply nested too deeply") }
        guard let t = b.getInteger(at: index, as: UInt8.self) else { return nil }
        var i = index + 1
        guard let l = line(b, at: &i) else { return nil }
        let value: RESPValue
        switch t {
        case UInt8(ascii: "+"): value = .simpleString(l)
        case UInt8(ascii: "-"): value = .error(l)
        case UInt8(ascii: ":"):
            guard let n = Int(l) else { throw RESPProtocolError("bad integer reply") }
            value = .integer(n)
        case UInt8(ascii: "$"):
            guard let n = Int(l), n >= -1, n <= maxBulkBytes else { throw RESPProtocolError("bad bulk length") }
            if n == -1 {
                value = .bulkString(nil)
            } else {
                guard b.writerIndex - i >= n + 2 else { return nil }
                value = .bulkString(b.getSlice(at: i, length: n))
                i += n + 2
            }
        case UInt8(ascii: "*"):
            guard let n = Int(l), n >= -1, n <= 1 << 20 else { throw RESPProtocolError("bad array length") }
            if n == -1 {
                value = .array(nil)
            } else {
                var items: [RESPValue] = []
                items.reserveCapacity(min(n, 1024))  // a 10-byte header must not allocate 32 MB
                for _ in 0..<n {
                    guard let v = try parseValue(b, at: &i, maxBulkBytes: maxBulkBytes, depth: depth + 1) else {
                        return nil
                    }
                    items.append(v)
                }
                value = .array(items)
            }
        default:
            throw RESPProtocolError("unknown reply type byte \(t)")
        }
        index = i
        return value
    }
}
