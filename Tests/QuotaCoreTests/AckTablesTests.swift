@testable import QuotaJournal
import Testing

/// The journal's bit set of unacknowledged events and the shipper's table of produced events, each
/// against a plain Set / Dictionary under random operations in the orders they meet in use.
@Suite struct AckTablesTests {
    @Test func ackBitsBehaveAsASetOfIndexes() {
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<50 {
            var bits = AckBits(), model = Set<Int>()
            let n = Int.random(in: 1...3000, using: &rng)
            bits.insert(0..<n)
            model.formUnion(0..<n)
            for _ in 0..<(n * 2) {
                let i = Int.random(in: 0..<(n + 70), using: &rng)
                if Bool.random(using: &rng) {
                    #expect(bits.remove(i) == (model.remove(i) != nil))
                } else {
                    bits.insert(i)
                    model.insert(i)
                }
                #expect(bits.count == model.count && bits.isEmpty == model.isEmpty)
            }
            #expect(Array(bits) == model.sorted() && model.allSatisfy(bits.contains))
        }
    }

    @Test func sequenceTableBehavesAsADictionaryForInOrderAndOutOfOrderAcknowledgements() {
        var rng = SystemRandomNumberGenerator()
        for round in 0..<30 {
            var table = SequenceTable(), model: [UInt64: JournalPosition?] = [:]
            var next: UInt64 = round % 2 == 0 ? 1 : 1_000_000
            for _ in 0..<20_000 {
                switch Int.random(in: 0..<10, using: &rng) {
                case 0..<4:
                    let pos: JournalPosition? = Bool.random(using: &rng) ? JournalPosition(segment: next / 100, index: Int(next % 100)) : nil
                    table.insert(next, pos)
                    model[next] = pos
                    next += 1
                case 4..<7:
                    // Mostly the oldest first, as Kafka acknowledges.
                    if let oldest = model.keys.min() {
                        #expect(table.remove(oldest).map { $0 } == model.removeValue(forKey: oldest).map { $0 })
                    }
                case 7..<9:
                    let seq = next > 50 ? UInt64.random(in: (next - 50)..<next + 3, using: &rng) : next
                    #expect(table.remove(seq).map { $0 } == model.removeValue(forKey: seq).map { $0 })
                default:
                    if Int.random(in: 0..<200, using: &rng) == 0 {
                        table.removeAll()
                        model.removeAll()
                    } else {
                        // A number below the window (never produced again) finds nothing.
                        #expect(table.remove(0) == nil)
                    }
                }
                #expect(table.count == model.count && table.isEmpty == model.isEmpty)
            }
            for (seq, pos) in model { #expect(table.remove(seq).map { $0 } == .some(pos)) }
            #expect(table.isEmpty)
        }
    }
}
