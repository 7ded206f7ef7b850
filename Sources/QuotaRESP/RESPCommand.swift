import NIOCore

/// One decoded command: its arguments as byte slices of the read buffer.
public struct RESPCommand: Sendable, Equatable {
    public var arguments: [ByteBuffer]

    public init(arguments: [ByteBuffer]) { self.arguments = arguments }

    public init(_ strings: [String]) {
        self.arguments = strings.map { ByteBuffer(string: $0) }
    }

    /// Argument `i` as a string (lossy for invalid UTF-8).
    public func string(_ i: Int) -> String { String(buffer: arguments[i]) }
}

extension ByteBuffer {
    /// Whether the readable bytes equal `upper` (ASCII, given in upper case) ignoring case.
    @inlinable
    public func equalsUppercased(_ upper: StaticString) -> Bool {
        withUnsafeReadableBytes { RESPBytes.equalsUppercased($0, upper) }
    }

    /// The readable bytes as a non-negative decimal integer, or nil.
    @inlinable
    public func parsePositiveInt() -> Int? {
        withUnsafeReadableBytes { RESPBytes.parsePositiveInt($0) }
    }
}

/// Checks of an argument's raw bytes.
public enum RESPBytes {
    /// Whether `raw` equals `upper` (ASCII, given in upper case) ignoring case.
    @inlinable
    public static func equalsUppercased(_ raw: UnsafeRawBufferPointer, _ upper: StaticString) -> Bool {
        guard raw.count == upper.utf8CodeUnitCount else { return false }
        let p = upper.utf8Start
        for i in 0..<raw.count {
            var c = raw[i]
            if c >= 97 && c <= 122 { c -= 32 }
            if c != p[i] { return false }
        }
        return true
    }

    /// `raw` as a non-negative decimal integer, or nil.
    @inlinable
    public static func parsePositiveInt(_ raw: UnsafeRawBufferPointer) -> Int? {
        guard raw.count > 0 && raw.count <= 18 else { return nil }
        var v = 0
        for c in raw {
            guard c >= 48 && c <= 57 else { return nil }
            v = v * 10 + Int(c - 48)
        }
        return v
    }
}

/// A decoded command's arguments, each read in place as raw bytes: slices (`[ByteBuffer]`), or one buffer's
/// bytes and the arguments' ``RESPSpan``s (``RESPSpannedArguments``: no slice made).
public protocol RESPArgumentBytes {
    var argumentCount: Int { get }
    func withArgument<R>(_ i: Int, _ body: (UnsafeRawBufferPointer) -> R) -> R
}

extension Array: RESPArgumentBytes where Element == ByteBuffer {
    public var argumentCount: Int { count }

    @inlinable
    public func withArgument<R>(_ i: Int, _ body: (UnsafeRawBufferPointer) -> R) -> R {
        self[i].withUnsafeReadableBytes(body)
    }
}

/// Arguments as spans of the bytes of the buffer they were decoded from: valid only while those bytes are
/// (inside the buffer's `withVeryUnsafeBytes`, before they are discarded).
public struct RESPSpannedArguments: RESPArgumentBytes {
    /// The buffer's storage from its index 0 (``ByteBuffer/withVeryUnsafeBytes(_:)``).
    public let storage: UnsafeRawBufferPointer
    public let spans: UnsafeBufferPointer<RESPSpan>

    public init(storage: UnsafeRawBufferPointer, spans: UnsafeBufferPointer<RESPSpan>) {
        self.storage = storage
        self.spans = spans
    }

    public var argumentCount: Int { spans.count }

    @inlinable
    public func withArgument<R>(_ i: Int, _ body: (UnsafeRawBufferPointer) -> R) -> R {
        let s = spans[i]
        precondition(s.start >= 0 && s.count >= 0 && s.start + s.count <= storage.count, "an argument outside its buffer")
        return body(UnsafeRawBufferPointer(rebasing: storage[s.start..<s.start + s.count]))
    }
}
