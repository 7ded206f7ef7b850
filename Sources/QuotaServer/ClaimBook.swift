import NIOConcurrencyHelpers
import QuotaCore

/// Claims made through this host, for `UNCLAIM`: bounded, oldest forgotten first.
final class ClaimBook: Sendable {
    struct Entry: Sendable {
        var event: ClaimEvent
        var unclaimed: Bool
    }
    private struct State {
        var map: [String: Entry] = [:]
        var order: [String] = []
        var head = 0
    }
    private let state = NIOLockedValueBox(State())
    let capacity: Int

    init(capacity: Int) { self.capacity = capacity }

    func add(_ e: ClaimEvent) {
        guard capacity > 0 else { return }
        state.withLockedValue { s in
            s.map[e.claimID] = Entry(event: e, unclaimed: false)
            s.order.append(e.claimID)
            while s.map.count > capacity, s.head < s.order.count {
                s.map.removeValue(forKey: s.order[s.head])
                s.head += 1
            }
            if s.head > 4096 && s.head * 2 > s.order.count {
                s.order.removeFirst(s.head)
                s.head = 0
            }
        }
    }

    enum Take { case unknown, already, take(ClaimEvent) }

    /// Mark a claim cancelled; only the first call gets `.take`.
    func takeForUnclaim(_ id: String) -> Take {
        state.withLockedValue { s in
            guard let e = s.map[id] else { return .unknown }
            if e.unclaimed { return .already }
            s.map[id]!.unclaimed = true
            return .take(e.event)
        }
    }

    /// Undo `takeForUnclaim` (the cancellation could not be journaled).
    func restore(_ id: String) { state.withLockedValue { s in s.map[id]?.unclaimed = false } }

    func markUnclaimed(_ id: String) { state.withLockedValue { s in s.map[id]?.unclaimed = true } }

    var count: Int { state.withLockedValue { $0.map.count } }
}
