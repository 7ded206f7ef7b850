/// A point on a monotonic clock, in nanoseconds. The domain never reads a clock
/// itself: callers pass `now`, so tests drive time by hand.
public struct Instant: Sendable, Hashable, Comparable, CustomStringConvertible {
    public var nanoseconds: UInt64

    public init(nanoseconds: UInt64) { self.nanoseconds = nanoseconds }

    /// Later than any instant a clock reads.
    public static let max = Instant(nanoseconds: .max)
    /// Not later than any instant a clock reads.
    public static let min = Instant(nanoseconds: 0)

    public static func < (a: Instant, b: Instant) -> Bool { a.nanoseconds < b.nanoseconds }

    public static func + (a: Instant, d: Duration) -> Instant { a.adding(nanoseconds: d.nanosecondsClamped) }

    /// `self + .nanoseconds(n)`, clamped to the representable instants, without `Duration`'s 128-bit
    /// arithmetic (~200 instructions; issue 13: a waiting claim's deadline).
    public func adding(nanoseconds n: Int64) -> Instant {
        if n >= 0 {
            let (sum, overflow) = nanoseconds.addingReportingOverflow(UInt64(n))
            return Instant(nanoseconds: overflow ? .max : sum)
        }
        let m = n.magnitude
        return Instant(nanoseconds: nanoseconds > m ? nanoseconds - m : 0)
    }

    public static func - (a: Instant, d: Duration) -> Instant { a + (.zero - d) }

    /// `a - b` as a duration (negative when `a` is before `b`).
    public static func - (a: Instant, b: Instant) -> Duration {
        if a.nanoseconds >= b.nanoseconds { return .nanoseconds(Int64(a.nanoseconds - b.nanoseconds)) }
        return .zero - .nanoseconds(Int64(b.nanoseconds - a.nanoseconds))
    }

    public var description: String { "\(nanoseconds)ns" }
}

extension Duration {
    /// The duration in whole nanoseconds, clamped to `Int64`.
    public var nanosecondsClamped: Int64 {
        let (s, a) = components
        let (ns, overflow) = s.multipliedReportingOverflow(by: 1_000_000_000)
        if overflow { return s < 0 ? .min : .max }
        return ns &+ a / 1_000_000_000
    }

    /// The duration in milliseconds.
    public var milliseconds: Int64 { nanosecondsClamped / 1_000_000 }

    /// The duration in seconds as a `Double`.
    public var seconds: Double { Double(nanosecondsClamped) / 1e9 }
}
