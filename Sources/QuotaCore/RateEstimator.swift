/// An exponentially weighted estimate of tokens claimed per second.
public struct RateEstimator: Sendable {
    public private(set) var rate: Double = 0
    private var windowStart: Instant?
    private var windowCount: Int = 0
    /// Length of one sampling window.
    public var window: Duration = .milliseconds(100)
    /// Weight of the newest window.
    public var alpha: Double = 0.5

    public init() {}

    /// Start from an expected rate (a scheduled sale's opening) unless a higher one was observed.
    public mutating func seed(_ expected: Double) {
        // Bounded: a seed from an absurd opening (tokens / target seconds) must stay a number others can report.
        let bounded = expected.isFinite ? min(expected, 1e12) : 0
        if bounded > rate { rate = bounded }
    }

    /// Count `tokens` claimed at `now`.
    public mutating func record(_ tokens: Int, now: Instant) {
        windowCount += tokens
        roll(now: now)
    }

    /// Close windows that ended before `now` (idle windows count as zero demand).
    public mutating func roll(now: Instant) {
        guard let start = windowStart else {
            windowStart = now
            return
        }
        let elapsed = now - start
        guard elapsed >= window else { return }
        let sample = Double(windowCount) / elapsed.seconds
        rate = rate == 0 ? sample : alpha * sample + (1 - alpha) * rate
        if rate < 0.01 { rate = 0 }
        windowStart = now
        windowCount = 0
    }
}
