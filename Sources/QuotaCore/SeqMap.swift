/// A key that is one of this process's own sequence numbers or tickets (never a value a peer chooses), hashed by
/// a cheap integer mix instead of the standard SipHash: a lookup in an `[Int: …]` map hashed for ~90 instructions,
/// and a claim in `durability: journal` makes about seven (issue 13). The mix is the splitmix64 finalizer of the
/// key and the table's seed; hash flooding needs a peer that picks keys, which no peer does here. (`_rawHashValue`
/// is the standard library's underscored hook; should it ever stop being called, `hash(into:)` is the fallback:
/// the map stays correct and only loses the speed. `SeqMapTests` checks that the hook is the one used.)
public struct SeqKey: Hashable, Sendable {
    public let value: Int

    @inline(__always)
    public init(_ value: Int) { self.value = value }

    public func hash(into hasher: inout Hasher) { hasher.combine(value) }

    @inline(__always)
    public func _rawHashValue(seed: Int) -> Int {
        var x = UInt64(bitPattern: Int64(value)) ^ UInt64(bitPattern: Int64(seed))
        x = (x ^ (x >> 30)) &* 0xBF58_476D_1CE4_E5B9
        x = (x ^ (x >> 27)) &* 0x94D0_49BB_1331_11EB
        return Int(bitPattern: UInt(x ^ (x >> 31)))
    }
}

/// `[Int: Value]` keyed by ``SeqKey``: the same operations, cheaper hashing.
public struct SeqMap<Value>: Sequence {
    @usableFromInline var storage: [SeqKey: Value] = [:]

    public init() {}

    @inlinable
    public subscript(key: Int) -> Value? {
        get { storage[SeqKey(key)] }
        _modify { yield &storage[SeqKey(key)] }
        set { storage[SeqKey(key)] = newValue }
    }

    @inlinable @discardableResult
    public mutating func removeValue(forKey key: Int) -> Value? { storage.removeValue(forKey: SeqKey(key)) }

    @inlinable public var isEmpty: Bool { storage.isEmpty }
    @inlinable public var count: Int { storage.count }
    @inlinable public mutating func removeAll() { storage.removeAll() }

    public struct Iterator: IteratorProtocol {
        @usableFromInline var base: Dictionary<SeqKey, Value>.Iterator
        @inlinable
        public mutating func next() -> (key: Int, value: Value)? {
            guard let (k, v) = base.next() else { return nil }
            return (k.value, v)
        }
    }

    public func makeIterator() -> Iterator { Iterator(base: storage.makeIterator()) }
}

extension SeqMap: Sendable where Value: Sendable {}
extension SeqMap.Iterator: Sendable where Value: Sendable {}
