import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import QuotaConfig
import QuotaCore
import QuotaJournal
import QuotaKafka
import Synchronization

/// What happens to a granted claim before and after its reply, by durability mode:
///
/// - `journal`: the claim record is fsync'd (group commit), then the reply; shipping to Kafka follows.
/// - `kafka`: fsync'd, shipped, and acknowledged by Kafka (acks=all), then the reply.
/// - `none`: the reply at once; journal (if `journal.dir` is set) and Kafka follow.
///
/// Every claim record reaches Kafka: delivery reports advance the journal's shipped mark, and a
/// segment is deleted only when all its claims are acknowledged. After a crash the remaining
/// segments are shipped again (same claim ids; consumers dedupe by claim id).
final class ClaimPipeline: Sendable {
    let durability: SidecarConfig.Durability
    let journal: Journal?
    private let producerBox = NIOLockedValueBox<KafkaProducer?>(nil)
    private let logger: Logger
    private let unavailableAfter: Duration
    private let ackTimeout: Duration

    private struct ShipState {
        /// Produced, not yet acknowledged: sequence → (segment, waiter for kafka mode).
        var inFlight: [UInt64: (segment: UInt64, waiter: (@Sendable (Bool) -> Void)?)] = [:]
        /// Claims librdkafka could not queue yet (local queue full).
        var retry: [(UInt64, UInt64, ClaimEvent)] = []
        var lastProgress = ContinuousClock.now
        var nextSequence: UInt64 = 1 << 40  // sequences for re-shipped (recovered) claims and none-mode claims
        var shipped = 0
        var deliveryErrors = 0
    }
    private let ship = NIOLockedValueBox(ShipState())
    private let _kafkaDown = Atomic<Bool>(false)

    init(config: SidecarConfig, recovered: JournalRecovery?, logger: Logger) throws {
        self.durability = config.durability
        self.logger = logger
        self.unavailableAfter = config.kafka.unavailableAfter
        self.ackTimeout = config.limits.claimTimeout
        let shipBox = ship
        if let dir = config.journal.dir {
            var opts = Journal.Options(dir: dir)
            opts.maxBytes = config.journal.maxBytes
            opts.segmentBytes = config.journal.segmentBytes
            opts.retention = config.claims.dedupeWindow
            var rec = recovered ?? JournalRecovery.read(dir: dir)
            if !rec.leaseStateTrusted { rec.openLeases = [] }
            let box = producerBox
            journal = try Journal(options: opts, recovered: rec, logger: logger) { claims in
                ClaimPipeline.produce(claims.map { ($0.position.sequence, $0.position.segment, $0.event) },
                                      producer: box, ship: shipBox, logger: logger)
            }
        } else {
            journal = nil
        }
        if let brokers = config.kafka.brokers {
            let journal = self.journal
            // In kafka mode every reply waits for the broker: do not linger (load batches by itself).
            var props = config.kafka.properties
            if config.durability == .kafka && props["linger.ms"] == nil { props["linger.ms"] = "0" }
            let producer = try KafkaProducer(
                brokers: brokers, topic: config.kafka.topic, properties: props, logger: logger,
                onDelivery: { reports in ClaimPipeline.delivered(reports, ship: shipBox, journal: journal, logger: logger) })
            producerBox.withLockedValue { $0 = producer }
        }
    }

    /// Ship the claims of recovered segments again (same claim ids).
    func reship(_ rec: JournalRecovery) {
        var items: [(UInt64, UInt64, ClaimEvent)] = []
        ship.withLockedValue { s in
            for seg in rec.segments where !seg.shipped {
                for e in seg.claims {
                    items.append((s.nextSequence, seg.id, e))
                    s.nextSequence += 1
                }
            }
        }
        for seg in rec.segments where seg.claims.isEmpty || seg.shipped { journal?.markShipped(segment: seg.id, count: 0) }
        Self.produce(items, producer: producerBox, ship: ship, logger: logger)
    }

    // MARK: - Admission (hot path: atomic loads and a lock-free check)

    /// Why a claim must be refused now (fail closed), or nil.
    func refusal() -> QuotaError? {
        guard let journal else {
            if durability == .kafka && _kafkaDown.load(ordering: .relaxed) {
                return QuotaError(.unavailable, "Kafka unreachable (durability: kafka)")
            }
            return nil
        }
        if !journal.isHealthy {
            return QuotaError(.unavailable, "journal not writable: \(journal.lastError ?? "unknown error")")
        }
        if journal.isOverBound {
            return QuotaError(.unavailable, "unshipped journal backlog over journal.max_bytes (\(journal.options.maxBytes))")
        }
        if durability == .kafka && _kafkaDown.load(ordering: .relaxed) {
            return QuotaError(.unavailable, "Kafka unreachable (durability: kafka)")
        }
        return nil
    }

    // MARK: - Records

    /// Record a granted claim. `reply` is called once with true (durable as the mode requires) or false.
    /// With `durability: none` it returns false ("reply now") and records in the background.
    func recordClaim(_ e: ClaimEvent, reply: @escaping @Sendable (Bool) -> Void) -> Bool {
        switch durability {
        case .none:
            if let journal {
                journal.append(.claim(e))
            } else if producerBox.withLockedValue({ $0 != nil }) {
                let seq = ship.withLockedValue { s -> UInt64 in
                    defer { s.nextSequence += 1 }
                    return s.nextSequence
                }
                Self.produce([(seq, 0, e)], producer: producerBox, ship: ship, logger: logger)
            }
            return false
        case .journal:
            journal!.append(.claim(e)) { r in
                if case .failure = r { reply(false) } else { reply(true) }
            }
            return true
        case .kafka:
            let ship = self.ship
            journal!.append(.claim(e)) { r in
                guard case .success(let pos) = r else { return reply(false) }
                // Wait for the broker's acknowledgement of this very record.
                let acked = ship.withLockedValue { s -> Bool in
                    if s.inFlight[pos.sequence] != nil {
                        s.inFlight[pos.sequence]!.waiter = reply
                        return false
                    }
                    return true  // acknowledged before we got here
                }
                if acked { reply(true) }
            }
            return true
        }
    }

    func recordLease(_ r: JournalRecord) {
        journal?.append(r)
    }

    /// A kafka-mode claim that was never acknowledged in time: journal its cancellation, so the
    /// stream nets to zero for a claim whose caller was told UNAVAILABLE.
    func recordCancellation(_ e: ClaimEvent) {
        journal?.append(.claim(e.cancellation(tsMs: e.tsMs)))
    }

    // MARK: - Shipping

    private static func produce(_ items: [(UInt64, UInt64, ClaimEvent)], producer: NIOLockedValueBox<KafkaProducer?>,
                                ship: NIOLockedValueBox<ShipState>, logger: Logger) {
        guard let p = producer.withLockedValue({ $0 }) else { return }
        var failed: [(UInt64, UInt64, ClaimEvent)] = []
        ship.withLockedValue { s in
            if s.inFlight.isEmpty { s.lastProgress = .now }
            for (seq, seg, _) in items { s.inFlight[seq] = (seg, nil) }
        }
        for item in items {
            do {
                try p.produce(key: item.2.voucher, value: item.2.kafkaValue, sequence: item.0)
            } catch {
                failed.append(item)
            }
        }
        if !failed.isEmpty {
            ship.withLockedValue { s in s.retry += failed }
        }
    }

    private static func delivered(_ reports: [DeliveryReport], ship: NIOLockedValueBox<ShipState>, journal: Journal?,
                                  logger: Logger) {
        var perSegment: [UInt64: Int] = [:]
        var waiters: [@Sendable (Bool) -> Void] = []
        ship.withLockedValue { s in
            for r in reports {
                if let e = r.error {
                    // With message.timeout.ms=0 librdkafka retries by itself; this is fatal. The record stays
                    // in the journal and ships after a restart.
                    s.deliveryErrors += 1
                    logger.error("kafka delivery failed", metadata: ["error": "\(e)"])
                    continue
                }
                guard let entry = s.inFlight.removeValue(forKey: r.sequence) else { continue }
                s.shipped += 1
                if entry.segment > 0 { perSegment[entry.segment, default: 0] += 1 }
                if let w = entry.waiter { waiters.append(w) }
            }
            s.lastProgress = .now
        }
        for (seg, n) in perSegment { journal?.markShipped(segment: seg, count: n) }
        for w in waiters { w(true) }
    }

    /// Periodic: retry claims librdkafka could not queue; decide whether Kafka counts as down.
    func tick() {
        let retry = ship.withLockedValue { s -> [(UInt64, UInt64, ClaimEvent)] in
            defer { s.retry.removeAll() }
            return s.retry
        }
        if !retry.isEmpty {
            ship.withLockedValue { s in for (seq, _, _) in retry { s.inFlight.removeValue(forKey: seq) } }
            Self.produce(retry, producer: producerBox, ship: ship, logger: logger)
        }
        let stalled = ship.withLockedValue { s in !s.inFlight.isEmpty && ContinuousClock.now - s.lastProgress > unavailableAfter }
        let silent = producerBox.withLockedValue { $0 }.map { $0.sinceBrokerAnswered > unavailableAfter } ?? false
        let down = stalled || silent
        let was = _kafkaDown.exchange(down, ordering: .relaxed)
        if down != was {
            if down {
                logger.error("kafka counts as down: no delivery progress", metadata: ["after": "\(unavailableAfter)"])
            } else {
                logger.info("kafka deliveries resumed")
            }
        }
    }

    var kafkaDown: Bool { _kafkaDown.load(ordering: .relaxed) }

    struct Stats {
        var inFlight: Int
        var shipped: Int
        var deliveryErrors: Int
        var journalBacklogBytes: Int
        var journalUnshipped: Int
        var journalSegments: Int
        var syncs: Int
        var recordsSynced: Int
    }

    var stats: Stats {
        let s = ship.withLockedValue { ($0.inFlight.count + $0.retry.count, $0.shipped, $0.deliveryErrors) }
        // journalSegments counts unshipped and retained segments alike
        let sync = journal?.syncStats ?? (0, 0)
        return Stats(inFlight: s.0, shipped: s.1, deliveryErrors: s.2, journalBacklogBytes: journal?.backlogBytes ?? 0,
                     journalUnshipped: journal?.unshippedClaims ?? 0, journalSegments: journal?.segmentCount ?? 0,
                     syncs: sync.0, recordsSynced: sync.1)
    }

    /// Shutdown: flush Kafka (bounded), close the journal. What is not shipped stays in the journal.
    func close(flushTimeout: Duration) {
        let p = producerBox.withLockedValue { $0 }
        // Let queued journal records become durable (and be handed to the producer) first.
        journal?.close()
        if let p {
            let left = p.flush(timeout: flushTimeout)
            if left > 0 {
                logger.warning("kafka not fully flushed at shutdown; the journal keeps the rest", metadata: ["outstanding": "\(left)"])
            }
            p.close(flushTimeout: .zero)
        }
    }
}
