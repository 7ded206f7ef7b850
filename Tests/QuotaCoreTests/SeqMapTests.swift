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
