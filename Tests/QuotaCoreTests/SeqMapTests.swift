@testable import QuotaCore
import Testing

/// The in-flight claims and the runtime's waiters live in a ``SeqMap`` (cheaper hashing of our own sequence
/// numbers): it must behave exactly as `[Int: Value]` does.
struct SeqMapTests {
    @Test func randomOperationsMatchAStandardDictionary() {
        var rng = SystemRandomNumberGenerator()
        var map = SeqMap<String>()
        var model: [Int: String] = [:]
        for step in 0..<200_000 {
            // Dense increasing keys (as tickets are), some far apart, some negative.
            let key = [step / 3, step / 3 - 17, Int.random(in: -5...5, using: &rng), Int.random(in: .min ... .max, using: &rng)]
                .randomElement(using: &rng)!
            switch Int.random(in: 0..<5, using: &rng) {
            case 0, 1:
                map[key] = "v\(step)"
                model[key] = "v\(step)"
            case 2:
                #expect(map.removeValue(forKey: key) == model.removeValue(forKey: key))
            case 3:
                map[key]?.append("+")
                model[key]?.append("+")
            default:
                #expect(map[key] == model[key])
            }
            if step % 20_000 == 0 {
                #expect(map.count == model.count && map.isEmpty == model.isEmpty)
                #expect(Dictionary(uniqueKeysWithValues: map.map { ($0.key, $0.value) }) == model)
            }
        }
        #expect(Dictionary(uniqueKeysWithValues: map.map { ($0.key, $0.value) }) == model)
    }

    @Test func equalKeysHashEquallyAndDistinctKeysSpread() {
        var buckets = Set<Int>()
        for k in 0..<10_000 {
            #expect(SeqKey(k)._rawHashValue(seed: 42) == SeqKey(k)._rawHashValue(seed: 42))
            buckets.insert(SeqKey(k)._rawHashValue(seed: 42) & 1023)
        }
        #expect(buckets.count > 1000, "consecutive keys fill the low bits' buckets")
    }
}

/// The speed-up rests on the standard library calling `SeqKey._rawHashValue(seed:)`: a generic caller (as
/// `Dictionary` is) and `hashValue` must reach it, or the map has silently fallen back to SipHash.
struct SeqKeyHookTests {
    static func rawHash<K: Hashable>(_ k: K, seed: Int) -> Int { k._rawHashValue(seed: seed) }

    @Test func theCustomRawHashIsTheOneGenericCodeUses() {
        for k in [0, 1, 42, -7, Int.max, Int.min] {
            let key = SeqKey(k)
            #expect(Self.rawHash(key, seed: 99) == key._rawHashValue(seed: 99))
            #expect(key.hashValue == key._rawHashValue(seed: 0))
            var h = Hasher()
            h.combine(k)
            #expect(Self.rawHash(key, seed: 99) != Self.rawHash(k, seed: 99) || k == 0, "the Int hash, not the mix")
        }
    }
}
