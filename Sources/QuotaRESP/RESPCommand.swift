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
        guard readableBytes == upper.utf8CodeUnitCount else { return false }
        return withUnsafeReadableBytes { raw in
            let p = upper.utf8Start
            for i in 0..<raw.count {
                var c = raw[i]
                if c >= 97 && c <= 122 { c -= 32 }
                if c != p[i] { return false }
            }
            return true
        }
    }

    /// The readable bytes as a non-negative decimal integer, or nil.
    @inlinable
    public func parsePositiveInt() -> Int? {
        guard readableBytes > 0 && readableBytes <= 18 else { return nil }
        return withUnsafeReadableBytes { raw in
            var v = 0
            for c in raw {
                guard c >= 48 && c <= 57 else { return nil }
                v = v * 10 + Int(c - 48)
            }
            return v
        }
    }
}
