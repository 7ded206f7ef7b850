/// The event indexes of one segment that Kafka has not acknowledged: one bit per index (a segment's
/// indexes are dense, 0..<events), so marking an event written or acknowledged is a bit operation,
/// not a hash-set insert or removal (issue 13: the journal thread's hashing).
struct AckBits: Sequence, Equatable {
    private var words: [UInt64] = []
    private(set) var count = 0

    init() {}
    init<S: Sequence>(_ indexes: S) where S.Element == Int {
        for i in indexes { insert(i) }
    }

    var isEmpty: Bool { count == 0 }

    func contains(_ i: Int) -> Bool {
        guard i >= 0, i >> 6 < words.count else { return false }
        return words[i >> 6] & (1 << UInt64(i & 63)) != 0
    }

    mutating func insert(_ i: Int) {
        precondition(i >= 0, "event indexes are never negative")
        let w = i >> 6
        if w >= words.count { words.append(contentsOf: repeatElement(0, count: w - words.count + 1)) }
        let bit: UInt64 = 1 << UInt64(i & 63)
        if words[w] & bit == 0 {
            words[w] |= bit
            count += 1
        }
    }

    /// Insert every index of `range`.
    mutating func insert(_ range: Range<Int>) {
        for i in range { insert(i) }
    }

    /// Remove `i`; whether it was there.
    @discardableResult
    mutating func remove(_ i: Int) -> Bool {
        guard i >= 0, i >> 6 < words.count else { return false }
        let bit: UInt64 = 1 << UInt64(i & 63)
        guard words[i >> 6] & bit != 0 else { return false }
        words[i >> 6] &= ~bit
        count -= 1
        if count == 0 { words.removeAll() }
        return true
    }

    func makeIterator() -> AnyIterator<Int> {
        var w = 0
        var current: UInt64 = words.first ?? 0
        let words = self.words
        return AnyIterator {
            while w < words.count {
                if current != 0 {
                    let bit = current.trailingZeroBitCount
                    current &= current - 1
                    return w << 6 | bit
                }
                w += 1
                current = w < words.count ? words[w] : 0
            }
            return nil
        }
    }
}
