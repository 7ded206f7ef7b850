extension String {
    /// `body` over the string's UTF-8 bytes. A native string's are read where they are, with no copy of the
    /// string: `var s = s; s.withUTF8 { … }` (which must be able to make them contiguous) retained and
    /// released the string around every use, and the claim path writes ~10 strings a claim (issue 13).
    @inlinable @inline(__always)
    public func withUTF8Bytes<R>(_ body: (UnsafeBufferPointer<UInt8>) throws -> R) rethrows -> R {
        if let r = try utf8.withContiguousStorageIfAvailable(body) { return r }
        var s = self   // (bridged or otherwise foreign storage: made native first)
        return try s.withUTF8(body)
    }
}
