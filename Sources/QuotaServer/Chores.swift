import Logging
import NIOConcurrencyHelpers
import QuotaCore
import QuotaRedis
import Synchronization

/// Background Redis work that is owed and must eventually be done: restocks of cancelled claims and
/// releases of per-user counts. Each job is idempotent (by claim id), so it is retried until Redis
/// takes it, with backoff. One owner runs them (``run()``, inside the service), and shutdown waits
/// for them (``drain(timeout:)``) and names what is left, instead of fire-and-forget tasks that
/// nothing waits for.
final class Chores: Sendable {
    struct Job: Sendable {
        /// What it is, for logs: `restock of claim X`.
        var what: String
        /// `.done` when finished for good (applied, or nothing left to do); `.retry` when it must be tried again.
        var run: @Sendable () async -> Outcome
    }

    enum Outcome: Sendable { case done, retry(String) }

    private struct Entry {
        var job: Job
        var attempts = 0
        var notBefore = ContinuousClock.now
        var lastError = ""
    }

    private struct State {
        var queue: [Entry] = []
        var running = 0
        var completed = 0
        var retries = 0
    }

    private let state = NIOLockedValueBox(State())
    /// Jobs not done yet (waiting or running), readable without the lock (claims check it).
    private let owed = Atomic<Int>(0)
    private let logger: Logger
    private let concurrency: Int
    /// A queue longer than this is logged (the work is owed: it is never dropped).
    private let warnAt: Int

    init(logger: Logger, concurrency: Int = 16, warnAt: Int = 100_000) {
        self.logger = logger
        self.concurrency = concurrency
        self.warnAt = warnAt
    }

    func submit(_ job: Job) {
        owed.add(1, ordering: .relaxed)
        let n = state.withLockedValue { s -> Int in
            s.queue.append(Entry(job: job))
            return s.queue.count
        }
        if n == warnAt { logger.warning("background Redis work is piling up (Redis slow or down?)", metadata: ["jobs": "\(n)"]) }
    }

    /// Jobs waiting or running.
    var outstanding: Int { state.withLockedValue { $0.queue.count + $0.running } }

    /// BUSY while `limit` jobs are owed (`limits.max_background_jobs`): work that could owe more (claims,
    /// cancellations) waits until Redis has taken some. Owed work itself is never dropped.
    func refusal(limit: Int) -> QuotaError? {
        guard owed.load(ordering: .relaxed) >= limit else { return nil }
        return QuotaError(.busy, "background Redis work owed is at limits.max_background_jobs (\(limit)): Redis is "
            + "slow or unreachable; retry later")
    }
    var stats: (outstanding: Int, completed: Int, retries: Int) {
        state.withLockedValue { ($0.queue.count + $0.running, $0.completed, $0.retries) }
    }

    /// Run jobs until cancelled: up to `concurrency` at once, failed ones again after a backoff.
    func run() async {
        await withTaskGroup(of: Void.self) { group in
            while !Task.isCancelled {
                let due = takeDue()
                if due.isEmpty {
                    try? await Task.sleep(for: .milliseconds(20))
                    continue
                }
                for e in due { group.addTask { await self.execute(e) } }
                await group.waitForAll()
            }
        }
    }

    private func takeDue() -> [Entry] {
        state.withLockedValue { s in
            let now = ContinuousClock.now
            var out: [Entry] = []
            var i = 0
            while i < s.queue.count && out.count < concurrency {
                if s.queue[i].notBefore <= now {
                    out.append(s.queue.remove(at: i))
                } else {
                    i += 1
                }
            }
            s.running += out.count
            return out
        }
    }

    private func execute(_ e: Entry) async {
        let outcome = await e.job.run()
        state.withLockedValue { s in
            s.running -= 1
            switch outcome {
            case .done:
                s.completed += 1
                owed.subtract(1, ordering: .relaxed)
            case .retry(let why):
                var e = e
                e.attempts += 1
                e.lastError = why
                s.retries += 1
                let ms = min(2_000, 50 << min(e.attempts, 6))
                e.notBefore = .now + .milliseconds(ms)
                s.queue.append(e)
            }
        }
    }

    /// Wait up to `timeout` for every job to finish. Returns what is left (described), empty when done.
    func drain(timeout: Duration) async -> [String] {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if outstanding == 0 { return [] }
            try? await Task.sleep(for: .milliseconds(20))
        }
        return state.withLockedValue { s in s.queue.map { "\($0.job.what) (\($0.lastError))" } }
    }
}
