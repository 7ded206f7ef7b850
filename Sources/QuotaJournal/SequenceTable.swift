/// Events produced and not yet acknowledged, by the librdkafka sequence number given at produce time:
/// numbers are handed out in increasing order and mostly acknowledged in that order, so the table is
/// a window of slots from the oldest unacknowledged number on (no hashing per event; issue 13).
/// A number below the window or beyond its end is kept in a side dictionary (not expected).
public struct SequenceTable: Sendable {
    /// Slot k is sequence `base + k - head`; nil: acknowledged (or never produced).
    private var slots: [JournalPosition??] = []
    private var head = 0
    private var base: UInt64 = 0
    private var other: [UInt64: JournalPosition?] = [:]
    public private(set) var count = 0

    public init() {}

    public var isEmpty: Bool { count == 0 }

    /// Record `seq` (not yet present) with its journal position (nil: not journaled).
    public mutating func insert(_ seq: UInt64, _ pos: JournalPosition?) {
        if head == slots.count {
            // Empty window: start it here.
            slots.removeAll(keepingCapacity: true)
            head = 0
            base = seq
        }
        if seq == base + UInt64(slots.count - head) {
            slots.append(.some(pos))
        } else {
            other[seq] = pos
        }
        count += 1
    }

    /// Take `seq`'s entry: `.some(position or nil)` if present, nil if not.
    public mutating func remove(_ seq: UInt64) -> JournalPosition?? {
        if seq >= base, seq - base < UInt64(slots.count - head) {
            let k = head + Int(seq - base)
            guard let entry = slots[k] else { return nil }
            slots[k] = nil
            count -= 1
            while head < slots.count, slots[head] == nil {
                head += 1
                base += 1
            }
            if head > 4096 && head * 2 > slots.count {
                slots.removeFirst(head)
                head = 0
            }
            return .some(entry)
        }
        guard let entry = other.removeValue(forKey: seq) else { return nil }
        count -= 1
        return .some(entry)
    }

    public mutating func removeAll() {
        slots.removeAll()
        head = 0
        other.removeAll()
        count = 0
    }
}
