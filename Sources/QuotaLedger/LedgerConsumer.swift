import Foundation
import Logging
import QuotaKafka
import Synchronization

/// Reads the claim stream into the ledger: batches of up to `batch` messages (or what came in
/// `maxWait`), each written with its offsets in one transaction, in order. A batch that cannot be
/// written (database down) is retried until it is; nothing is ever skipped. The stream is read from
/// the offsets the database holds, so a crash at any point neither loses nor doubles a row.
public final class LedgerConsumer: Sendable {
    public struct Options: Sendable {
        public var brokers: String
        public var topic: String
        public var batch = 1000
        public var maxWait: Duration = .milliseconds(200)
        /// `--once`: stop once the stream has been idle this long (read to its end).
        public var idleExit: Duration? = nil
        public init(brokers: String, topic: String) {
            self.brokers = brokers
            self.topic = topic
        }
    }

    /// Counters for progress and metrics.
    public final class Stats: Sendable {
        let messages = Atomic<Int>(0)
        let rows = Atomic<Int>(0)
        let batches = Atomic<Int>(0)
        let lag = Atomic<Int>(-1)
        let dbErrors = Atomic<Int>(0)
        public init() {}
        public var messagesRead: Int { messages.load(ordering: .relaxed) }
        public var rowsWritten: Int { rows.load(ordering: .relaxed) }
        public var batchesWritten: Int { batches.load(ordering: .relaxed) }
        /// Messages on the topic not yet in the ledger (-1: unknown).
        public var currentLag: Int { lag.load(ordering: .relaxed) }
        public var databaseErrors: Int { dbErrors.load(ordering: .relaxed) }
    }

    private let ledger: Ledger
    private let options: Options
    private let logger: Logger
    public let stats = Stats()

    public init(ledger: Ledger, options: Options, logger: Logger) {
        self.ledger = ledger
        self.options = options
        self.logger = logger
    }

    /// Consume until cancelled (or, with `idleExit`, until the stream is read to its end).
    public func run() async throws {
        try await ledger.migrate()
        var consumer: KafkaConsumer?
        var kafkaDown = false
        var lastMessage = ContinuousClock.now
        var lastLag = ContinuousClock.now - .seconds(60)
        var next: [Int32: Int64] = [:]
        defer { consumer?.close() }
        while !Task.isCancelled {
            if consumer == nil {
                // (Re)start from what the database holds: the truth of what is written.
                next = try await withDatabase { try await self.ledger.offsets(topic: self.options.topic) }
                do {
                    consumer = try KafkaConsumer(brokers: options.brokers, topic: options.topic, group: "quota-ledger",
                                                 startOffsets: next)
                    if kafkaDown { logger.info("kafka reachable again; consuming", metadata: ["kafka.topic": "\(options.topic)"]) }
                    kafkaDown = false
                } catch {
                    if !kafkaDown { logger.error("kafka unreachable; waiting (nothing is skipped)", metadata: ["error": "\(error)"]) }
                    kafkaDown = true
                    try await Task.sleep(for: .seconds(1))
                    continue
                }
                lastMessage = .now
            }
            let c = consumer!
            var batch: [Ledger.Message] = []
            let until = ContinuousClock.now + options.maxWait
            while batch.count < options.batch && ContinuousClock.now < until {
                guard let m = c.poll(timeoutMs: 50) else { continue }
                batch.append(Ledger.Message(partition: m.partition, offset: m.offset, event: LedgerEvent(json: m.value)))
            }
            // The lag (a metadata round trip; brokers that do not answer it, like Tansu, leave it unknown).
            if ContinuousClock.now - lastLag >= .seconds(5) {
                lastLag = .now
                if let hw = c.highWatermarks(timeoutMs: 200) {
                    var lag = 0
                    for (p, h) in hw { lag += max(0, Int(h - (next[p] ?? 0))) - batch.filter { $0.partition == p }.count }
                    stats.lag.store(max(0, lag), ordering: .relaxed)
                }
            }
            if batch.isEmpty {
                if let idle = options.idleExit, ContinuousClock.now - lastMessage >= idle { return }
                continue
            }
            lastMessage = .now
            let full = batch
            let written = try await withDatabase { try await self.ledger.write(full, topic: self.options.topic) }
            for m in batch { next[m.partition] = max(next[m.partition] ?? 0, m.offset + 1) }
            stats.messages.add(batch.count, ordering: .relaxed)
            stats.rows.add(written.rows, ordering: .relaxed)
            stats.batches.add(1, ordering: .relaxed)
        }
    }

    /// Run a database step until it succeeds: a database that is down is waited for, never skipped.
    private func withDatabase<T: Sendable>(_ step: @Sendable () async throws -> T) async throws -> T {
        var delay: Duration = .milliseconds(100)
        var logged = false
        while true {
            do {
                let v = try await step()
                if logged { logger.info("ledger database reachable again") }
                return v
            } catch {
                stats.dbErrors.add(1, ordering: .relaxed)
                if !logged {
                    logger.error("ledger database unavailable; retrying the same batch (nothing is skipped)",
                                 metadata: ["db": "\(ledger.db.description)", "error": "\(error)"])
                    logged = true
                }
                try await Task.sleep(for: delay)
                delay = min(delay * 2, .seconds(5))
            }
        }
    }
}
