import Synchronization

/// A string compared and hashed by its UTF-8 bytes.
///
/// Swift's `String` equality is Unicode canonical equivalence: `"é"` (U+00E9) and `"e\u{301}"` are equal
/// and hash alike, although they are different byte strings, and Redis (which decides per-user limits)
/// and the journal see them as different ids. User ids and request ids are keyed by this instead, so
/// two ids are the same only when their bytes are.
public struct ByteKey: Hashable, Sendable {
    public let string: String

    @inlinable
    public init(_ string: String) { self.string = string }

    @inlinable
    public static func == (a: ByteKey, b: ByteKey) -> Bool {
        let fast = a.string.utf8.withContiguousStorageIfAvailable { x in
            b.string.utf8.withContiguousStorageIfAvailable { y in
                x.count == y.count && x.elementsEqual(y)
            }
        }
        if let f = fast, let f { return f }
        return a.string.utf8.elementsEqual(b.string.utf8)
    }

    @inlinable
    public func hash(into h: inout Hasher) {
        let done: Void? = string.utf8.withContiguousStorageIfAvailable { h.combine(bytes: UnsafeRawBufferPointer($0)) }
        if done == nil { for b in string.utf8 { h.combine(b) } }
        h.combine(string.utf8.count)
    }

    /// UTF-8 bytes.
    @inlinable
    public var byteCount: Int { string.utf8.count }
}

/// The process-wide bound of the `REQ` dedupe tables (`claims.max_dedupe_entries`,
/// `claims.max_dedupe_bytes`), shared by every voucher's ``VoucherMachine``.
///
/// An entry is charged when a request id is first remembered and released when it is forgotten
/// (its answer expired, or it was transient and not kept). Bytes are an estimate: the request id's
/// length plus ``entryOverhead`` (the answer, the map slot, the expiry queue slot).
public final class DedupeBudget: Sendable {
    public let maxEntries: Int
    public let maxBytes: Int
    /// Bytes charged per entry besides its request id.
    public static let entryOverhead = 160
    private let _entries = Atomic<Int>(0)
    private let _bytes = Atomic<Int>(0)
    /// New request ids refused because the table was full of answers still within their window.
    private let _refused = Atomic<Int>(0)

    public init(maxEntries: Int, maxBytes: Int) {
        self.maxEntries = maxEntries
        self.maxBytes = maxBytes
    }

    public static func cost(_ key: ByteKey) -> Int { key.byteCount + entryOverhead }

    /// Charge one entry of `bytes` if it fits under both bounds.
    public func tryCharge(_ bytes: Int) -> Bool {
        let e = _entries.wrappingAdd(1, ordering: .relaxed).newValue
        let b = _bytes.wrappingAdd(bytes, ordering: .relaxed).newValue
        if e <= maxEntries && b <= maxBytes { return true }
        _entries.wrappingSubtract(1, ordering: .relaxed)
        _bytes.wrappingSubtract(bytes, ordering: .relaxed)
        return false
    }

    /// Charge one entry even over the bounds (answers recovered from the journal are never dropped).
    public func forceCharge(_ bytes: Int) {
        _entries.wrappingAdd(1, ordering: .relaxed)
        _bytes.wrappingAdd(bytes, ordering: .relaxed)
    }

    public func release(_ bytes: Int) {
        _entries.wrappingSubtract(1, ordering: .relaxed)
        _bytes.wrappingSubtract(bytes, ordering: .relaxed)
    }

    public func countRefusal() { _refused.wrappingAdd(1, ordering: .relaxed) }

    public var entries: Int { _entries.load(ordering: .relaxed) }
    public var bytes: Int { _bytes.load(ordering: .relaxed) }
    public var refused: Int { _refused.load(ordering: .relaxed) }
}

/// A bounded set of keys that each expire `ttl` after they were inserted (the negative cache of
/// unknown voucher ids). Full: the oldest entry goes first, expired or not (it is only a cache: a
/// forgotten id is asked of Redis again).
public struct ExpiringSet: Sendable {
    public let capacity: Int
    public let ttl: Duration
    private var until: [String: Instant] = [:]
    /// Insertions in order (expiries grow with it); entries re-inserted later are skipped when popped.
    private var order: [(key: String, until: Instant)] = []
    private var head = 0

    public init(capacity: Int, ttl: Duration) {
        self.capacity = max(0, capacity)
        self.ttl = ttl
    }

    public var count: Int { until.count }

    /// Whether `key` was inserted less than `ttl` ago (expired entries are dropped by later insertions).
    public func contains(_ key: String, now: Instant) -> Bool {
        guard let u = until[key] else { return false }
        return now < u
    }

    public mutating func insert(_ key: String, now: Instant) {
        guard capacity > 0 else { return }
        // Expired entries first, then the oldest while full.
        while head < order.count, order[head].until <= now || until.count >= capacity && until[key] == nil {
            let old = order[head]
            head += 1
            if until[old.key] == old.until { until.removeValue(forKey: old.key) }
        }
        let u = now + ttl
        until[key] = u
        order.append((key, u))
        if head > 1024 && head * 2 > order.count {
            order.removeFirst(head)
            head = 0
        }
    }
}

extension VoucherCounters {
    /// Add another voucher's counters (process totals).
    public mutating func add(_ c: VoucherCounters) {
        claimsOK += c.claimsOK
        tokensServed += c.tokensServed
        leasesTaken += c.leasesTaken
        tokensLeased += c.tokensLeased
        leasesRenewed += c.leasesRenewed
        leasesReturned += c.leasesReturned
        tokensReturned += c.tokensReturned
        leasesFenced += c.leasesFenced
        tokensLost += c.tokensLost
        consolidations += c.consolidations
        claimsWaited += c.claimsWaited
        for (k, v) in c.rejected { rejected[k, default: 0] += v }
    }
}
