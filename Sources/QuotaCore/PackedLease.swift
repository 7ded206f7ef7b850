/// A lease id as one integer: `N` (shard 0) or `s.N` (hot-key shard s) as `s << 48 | N`, for books that
/// keep a lease id per claim (the `UNCLAIM` book). Only ids spelled as ``id(_:)`` spells them pack:
/// decimal, no sign, no leading zero, 1 ≤ s < 128, N < 2⁴⁸.
public enum PackedLease {
    /// The packed form of `id`, or nil. Reads the bytes; makes no string (it runs for every claim).
    public static func pack(_ id: String) -> Int64? {
        id.withUTF8Bytes { u -> Int64? in
            /// A canonical decimal number in `u[from..<to]` below `limit`.
            func number(_ from: Int, _ to: Int, below limit: Int64) -> Int64? {
                guard to > from, to - from <= 15, u[from] != UInt8(ascii: "0") || to - from == 1 else { return nil }
                var v: Int64 = 0
                for i in from..<to {
                    let d = u[i] &- UInt8(ascii: "0")
                    guard d < 10 else { return nil }
                    v = v * 10 + Int64(d)
                }
                return v < limit ? v : nil
            }
            var dot = -1
            for i in 0..<u.count where u[i] == UInt8(ascii: ".") {
                guard dot < 0 else { return nil }
                dot = i
            }
            if dot < 0 { return number(0, u.count, below: 1 << 48) }
            guard let shard = number(0, dot, below: 128), shard >= 1, let n = number(dot + 1, u.count, below: 1 << 48)
            else { return nil }
            return shard << 48 | n
        }
    }

    /// The lease id of a packed value.
    public static func id(_ v: Int64) -> String {
        let s = v >> 48, n = v & (1 << 48 - 1)
        return s == 0 ? String(n) : "\(s).\(n)"
    }
}
