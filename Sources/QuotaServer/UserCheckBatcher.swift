import NIOConcurrencyHelpers
import NIOCore
import QuotaCore
import QuotaRedis

/// Receives the results of per-user checks, all of one batch that it submitted in one call.
protocol UserCheckSink: AnyObject, Sendable {
    /// `results[i]` is the result of the check submitted with `tokens[i]`.
    func usersChecked(tokens: [Int], results: [Result<QuotaStore.UserCheckOutcome, RedisError>])
}

/// Batches per-user checks from concurrent claims: whatever queued while earlier batches were
/// on the wire goes out together, as one script call. Up to `maxInFlight` batches are on the
/// wire at once. Results are handed back from the task that sent the batch, one call per sink
/// (a voucher's runtime), which feeds its machine all of them under one taking of its lock.
final class UserCheckBatcher: Sendable {
    private struct Item {
        var check: QuotaStore.UserCheck
        var sink: any UserCheckSink
        var token: Int
    }
    private let store: QuotaStore
    private let maxInFlight: Int
    private let maxBatch: Int
    private struct State {
        var queue: [Item] = []
        var inFlight = 0
        var batches = 0
        var checks = 0
    }
    private let state = NIOLockedValueBox(State())

    init(store: QuotaStore, maxInFlight: Int = 4, maxBatch: Int = 2048) {
        self.store = store
        self.maxInFlight = maxInFlight
        self.maxBatch = maxBatch
    }

    func submit(_ check: QuotaStore.UserCheck, sink: any UserCheckSink, token: Int) {
        let batch = state.withLockedValue { s -> [Item]? in
            s.queue.append(Item(check: check, sink: sink, token: token))
            guard s.inFlight < maxInFlight else { return nil }
            s.inFlight += 1
            return take(&s)
        }
        if let batch { send(batch) }
    }

    private func take(_ s: inout State) -> [Item] {
        let n = min(s.queue.count, maxBatch)
        let b = Array(s.queue.prefix(n))
        s.queue.removeFirst(n)
        s.batches += 1
        s.checks += n
        return b
    }

    private func send(_ batch: [Item]) {
        let store = self.store
        Task {
            // Per check: on a Redis Cluster a batch is split over masters, and the checks that ran keep
            // their answers when another master fails (only a check that was not sent is `.unreachable`).
            let results = await store.checkEachUser(batch.map(\.check))
            for g in grouped(Array(zip(batch, results)), by: { ObjectIdentifier($0.0.sink) }) {
                g[0].0.sink.usersChecked(tokens: g.map(\.0.token), results: g.map(\.1))
            }
            let next = state.withLockedValue { s -> [Item]? in
                guard !s.queue.isEmpty else {
                    s.inFlight -= 1
                    return nil
                }
                return take(&s)
            }
            if let next { send(next) }
        }
    }

    /// Batches sent and checks in them (checks per batch = the batching factor).
    var stats: (batches: Int, checks: Int) { state.withLockedValue { ($0.batches, $0.checks) } }
}
