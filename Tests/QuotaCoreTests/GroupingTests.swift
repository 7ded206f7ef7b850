import QuotaCore
import Testing

private final class Receiver {}

@Suite("grouped(_:by:): a batch's answers by receiver")
struct GroupingTests {
    /// The plain definition: groups in the order of their first item, items in their order.
    private func reference(_ items: [(Int, Int)]) -> [[(Int, Int)]] {
        var order: [Int] = []
        var by: [Int: [(Int, Int)]] = [:]
        for it in items {
            if by[it.0] == nil { order.append(it.0) }
            by[it.0, default: []].append(it)
        }
        return order.map { by[$0]! }
    }

    @Test(arguments: [0, 1, 2, 3, 15, 16, 17, 40])
    func groupsKeepTheOrderOfFirstItemsAndOfItemsWithinForAnyNumberOfReceivers(receivers: Int) {
        let objects = (0..<max(receivers, 1)).map { _ in Receiver() }
        var rng = SystemRandomNumberGenerator()
        for n in [0, 1, 5, 100, 1000] {
            let items: [(Int, Int)] = receivers == 0 ? [] : (0..<n).map { ($0 % 3 == 0 ? 0 : Int.random(in: 0..<receivers, using: &rng), $0) }
            let got = grouped(items, by: { ObjectIdentifier(objects[$0.0]) })
            let want = reference(items)
            #expect(got.map { $0.map(\.1) } == want.map { $0.map(\.1) }, "receivers \(receivers), items \(n)")
            #expect(got.allSatisfy { g in g.allSatisfy { $0.0 == g[0].0 } })
        }
    }

    /// forEachRun: the runs of equal keys, in order, covering every item once; on a slice, with its own indices.
    @Test func runsOfEqualKeysCoverEveryItemOnceInOrder() {
        var rng = SystemRandomNumberGenerator()
        for n in [0, 1, 2, 7, 100] {
            let items = (0..<n).map { i in (Int.random(in: 0..<3, using: &rng), i) }
            for slice in [items[...], items.dropFirst(min(n, 2))] {
                var seen: [Int] = []
                var keys: [Int] = []
                forEachRun(slice, by: \.0) { run in
                    #expect(!run.isEmpty && run.allSatisfy { $0.0 == run[run.startIndex].0 })
                    keys.append(run[run.startIndex].0)
                    seen += run.map(\.1)
                }
                #expect(seen == slice.map(\.1), "items \(n)")
                #expect(zip(keys, keys.dropFirst()).allSatisfy { $0 != $1 }, "two runs of one key side by side")
            }
        }
    }
}
