/// How a sidecar sizes, renews and gives back leases for one voucher.
///
/// Region defaults and per-voucher overrides live in Redis (`quotactl lease set`);
/// the config file gives the host's defaults.
public struct LeasePolicy: Sendable, Equatable {
    /// Smallest lease asked for, in tokens. Default 10.
    public var min: Int
    /// Largest lease asked for, in tokens. Default 5,000.
    public var max: Int
    /// A lease covers this many seconds of observed demand. Default 2.
    public var targetSeconds: Double
    /// Lease time to live. Default 10 s.
    public var ttl: Duration
    /// Refill when local stock falls to this fraction of the next lease size. Default 0.5.
    public var lowWatermark: Double
    /// Stock unused for this long goes back to the pool. Default 30 s.
    public var idleReturn: Duration
    /// Stop serving a lease this long before its expiry unless renewed. Default: max(1 s, ttl / 5).
    public var safetyMargin: Duration
    /// Tokens of the opening lease a host takes in the warm-up window before a scheduled sale opens
    /// (`lease.opening`). nil: derived, see ``openingSize(regionLimit:hosts:)``.
    public var opening: Int?
    /// How long before a scheduled sale opens its opening leases are taken (`lease.warmup_seconds`). Default 10 s.
    public var warmup: Duration = .seconds(10)

    public init(
        min: Int = 10, max: Int = 5_000, targetSeconds: Double = 2, ttl: Duration = .seconds(10),
        lowWatermark: Double = 0.5, idleReturn: Duration = .seconds(30), safetyMargin: Duration? = nil
    ) {
        self.min = min
        self.max = max
        self.targetSeconds = targetSeconds
        self.ttl = ttl
        self.lowWatermark = lowWatermark
        self.idleReturn = idleReturn
        self.safetyMargin = safetyMargin ?? LeasePolicy.defaultMargin(ttl: ttl)
    }

    public static func defaultMargin(ttl: Duration) -> Duration {
        let fifth = ttl / 5
        return fifth > .seconds(1) ? fifth : (ttl > .seconds(2) ? .seconds(1) : ttl / 2)
    }

    /// The fraction of the remaining pool one lease may take near exhaustion
    /// (applied by the LEASE script against the authoritative pool).
    public static let exhaustionFraction = 0.1

    /// The opening lease of one host: `opening` when set, else half the region's allocation spread
    /// over the hosts seen in the region, within `[min, max]` (and never more than the allocation).
    public func openingSize(regionLimit: Int, hosts: Int) -> Int {
        let h = Swift.max(1, hosts)
        // Every live host must get its opening lease: an explicit size is capped at an equal share.
        if let opening { return Swift.max(1, Swift.min(opening, regionLimit / h)) }
        // Half the quota goes out as opening leases; the rest serves the first refills. Not raised to
        // `min`: that would let the first hosts take it all and leave the others none.
        let share = (regionLimit + 2 * h - 1) / (2 * h)
        return Swift.max(1, Swift.min(share, max))
    }

    /// The lease size for an observed demand of `rate` tokens per second.
    public func leaseSize(rate: Double) -> Int {
        let wanted = (rate * targetSeconds).rounded(.up)
        let clamped = Swift.min(Swift.max(wanted, Double(min)), Double(max))
        return Swift.max(1, Int(clamped))
    }

    /// Refill when local stock is at or below this many tokens.
    public func refillThreshold(leaseSize: Int) -> Int {
        Int((Double(leaseSize) * lowWatermark).rounded(.down))
    }

    /// Until when a lease whose request was *sent* at `sentAt` may be served.
    public func serveDeadline(sentAt: Instant, ttl: Duration) -> Instant {
        sentAt + ttl - safetyMargin
    }

    /// Renew a lease that still has stock once less than this much serving time is left.
    public var renewAhead: Duration { ttl / 3 }

    /// Check the policy; the error names the offending field.
    public func validate() throws(QuotaError) {
        guard min >= 1 else { throw QuotaError(.err, "lease min must be >= 1") }
        guard max >= min else { throw QuotaError(.err, "lease max must be >= min") }
        guard targetSeconds > 0 else { throw QuotaError(.err, "lease target_seconds must be > 0") }
        guard ttl >= .seconds(1) else { throw QuotaError(.err, "lease ttl must be >= 1s") }
        guard lowWatermark >= 0, lowWatermark < 1 else { throw QuotaError(.err, "lease low_watermark must be in [0, 1)") }
        guard safetyMargin > .zero, safetyMargin < ttl else {
            throw QuotaError(.err, "lease safety_margin must be > 0 and < ttl")
        }
    }
}

/// Per-voucher overrides of the policy, as stored in Redis. `nil` keeps the default.
public struct LeasePolicyOverride: Sendable, Equatable {
    public var min: Int?
    public var max: Int?
    public var targetSeconds: Double?
    public var ttlSeconds: Double?
    public var opening: Int?

    public init(min: Int? = nil, max: Int? = nil, targetSeconds: Double? = nil, ttlSeconds: Double? = nil,
                opening: Int? = nil) {
        self.min = min
        self.max = max
        self.targetSeconds = targetSeconds
        self.ttlSeconds = ttlSeconds
        self.opening = opening
    }

    public var isEmpty: Bool { min == nil && max == nil && targetSeconds == nil && ttlSeconds == nil && opening == nil }

    /// `base` with these overrides applied on top (`self` wins).
    public func applied(to base: LeasePolicy) -> LeasePolicy {
        var p = base
        if let min { p.min = min }
        if let max { p.max = max }
        if p.max < p.min { p.max = p.min }
        if let targetSeconds { p.targetSeconds = targetSeconds }
        if let opening { p.opening = opening }
        if let ttlSeconds {
            p.ttl = .milliseconds(Int64(ttlSeconds * 1000))
            if p.safetyMargin >= p.ttl { p.safetyMargin = LeasePolicy.defaultMargin(ttl: p.ttl) }
        }
        return p
    }

    /// Layer `other` over `self` (`other` wins where set).
    public func overlaid(by other: LeasePolicyOverride) -> LeasePolicyOverride {
        LeasePolicyOverride(
            min: other.min ?? min, max: other.max ?? max,
            targetSeconds: other.targetSeconds ?? targetSeconds, ttlSeconds: other.ttlSeconds ?? ttlSeconds,
            opening: other.opening ?? opening)
    }
}
