import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import QuotaConfig
import QuotaCore
import QuotaJournal
import QuotaKafka
import Synchronization

/// What happens to a journal record before and after its reply, by durability mode:
///
/// - `journal`: the record is fsync'd (group commit), then the reply; shipping to Kafka follows.
/// - `kafka`: fsync'd, shipped, and acknowledged by Kafka (acks=all), then the reply.
/// - `none`: the reply at once; journal (if `journal.dir` is set) and Kafka follow.
///
/// Every shipped event (claims, cancellations, lease closes) reaches Kafka: delivery reports mark
/// their journal positions acknowledged, and a segment is deleted only when all its events are.
/// After a crash the unacknowledged events of the remaining segments are shipped again (same claim
/// ids; consumers dedupe by claim id). When the producer hits a fatal error (a broker that lost
/// its state, an idempotence failure) it is recreated and everything unacknowledged is shipped again.
final class ClaimPipeline: Sendable {
    let durability: Durability
    let journal: Journal?
    /// ``journal`` without a reference count (``journal`` keeps it alive): ``refusal()`` reads its health for every
    /// claim, from both event loops, and an `if let journal` there was a retain and a release each of one object
    /// the writer thread uses too (issue 13). (Unmanaged, read through `_withUnsafeGuaranteedRef`: an
    /// `unowned(unsafe)` reference bound by `if let` is still retained for its scope.)
    private let journalUnretained: Unmanaged<Journal>?
    private let producerBox = NIOLockedValueBox<KafkaProducer?>(nil)
    private let logger: Logger
    private let unavailableAfter: Duration
    private let kafka: SidecarConfig.KafkaSettings
    /// Why the producer must be recreated (nil: it need not): set by a fatal error, and again by a recreate that is
    /// put off or fails, so a later tick does it, with the first reason.
    private let needsRecreate = NIOLockedValueBox<String?>(nil)
    /// The producer had a fatal error and is not replaced yet: Kafka counts as down (helper-50: while a recreate
    /// was put off, every produce failed into the retry list, nothing was in flight to count as stalled, the
    /// probe answered, and `durability: kafka` went on taking claims that could only time out).
    private let producerFailed = NIOLockedValueBox(false)
    /// Closed producers whose librdkafka destroy was still running when their close returned.
    private let lingering = NIOLockedValueBox<[KafkaProducer]>([])
    /// Held while the producer is replaced or closed (never both at once: a recreate's close of the old
    /// producer would free it under the shutdown's flush); true once closed (then nothing is recreated).
    private let lifecycle = NIOLockedValueBox(false)

    private struct ShipState {
        /// Produced, not yet acknowledged: librdkafka sequence → journal position (nil: not journaled).
        var bySeq = SequenceTable()
        /// `durability: kafka`: replies waiting for a position's acknowledgement.
        var waiters: [JournalPosition: @Sendable () -> Void] = [:]
        /// `durability: kafka`: acknowledged before anyone waited for them.
        /// Events nobody waits for (lease records, cancellations) land here too: entries older than
        /// ``earlyAckAge`` are dropped by ``tick()`` (a claim's waiter comes within moments of its write).
        var earlyAcks: [JournalPosition: ContinuousClock.Instant] = [:]
        /// Events librdkafka could not queue yet (local queue full).
        var retry: [Outgoing] = []
        /// Journal positions whose delivery failed for good in librdkafka: produced again from the journal.
        var redeliver: [JournalPosition] = []
        var lastRedelivery = ContinuousClock.now
        var lastEarlyAckSweep = ContinuousClock.now
        var lastProgress = ContinuousClock.now
        var nextSequence: UInt64 = 1
        var shipped = 0
        var deliveryErrors = 0
        var recreations = 0
        var lastRecreate = ContinuousClock.now
    }
    private let ship = NIOLockedValueBox(ShipState())
    private let _kafkaDown = Atomic<Bool>(false)
    /// No journal: more than ``maxUnjournaled`` events wait for Kafka in memory (set by ``tick()``).
    private let _memoryBacklogFull = Atomic<Bool>(false)

    /// Without a journal (`durability: none`, no `journal.dir`) the events Kafka has not acknowledged are
    /// held only in memory (here and in librdkafka): past this many, claims are refused until Kafka catches
    /// up, so a broker that is down cannot grow the sidecar without bound (about 50 MB at this count).
    static let maxUnjournaled = 100_000

    /// - Parameter boot: written to the journal (durably) before anything else.
    /// - Parameter recreateGap: the least time between two producer recreations (tests lengthen it).
    init(config: SidecarConfig, recovered: JournalRecovery?, boot: JournalBoot, logger: Logger,
         recreateGap: Duration = ClaimPipeline.defaultRecreateGap) throws {
        self.durability = config.durability
        self.recreateGap = recreateGap
        self.logger = logger
        self.unavailableAfter = config.kafka.unavailableAfter
        self.kafka = config.kafka
        let shipBox = ship
        let box = producerBox
        if let dir = config.journal.dir {
            var opts = Journal.Options(dir: dir)
            opts.maxBytes = config.journal.maxBytes
            opts.segmentBytes = config.journal.segmentBytes
            opts.retention = config.claims.dedupeWindow
            opts.ships = config.kafka.brokers != nil
            let rec = recovered ?? JournalRecovery.read(dir: dir)
            do {
                journal = try Journal(options: opts, recovered: rec, boot: boot, logger: logger) { events in
                    ClaimPipeline.produce(events, producer: box, ship: shipBox)
                }
            } catch {
                throw QuotaError(.err, "\(error)")
            }
        } else {
            journal = nil
        }
        journalUnretained = journal.map { Unmanaged.passUnretained($0) }
        if config.kafka.brokers != nil {
            do {
                let producer = try makeProducer()
                producerBox.withLockedValue { $0 = producer }
            } catch {
                // No pipeline comes of this: the journal opened above must not keep its writer thread and its
                // lock (helper-49 E: a caller that goes on in the same process could not open it again).
                journal?.close()
                throw error
            }
        }
    }

    private func makeProducer() throws -> KafkaProducer {
        guard let brokers = kafka.brokers else { throw QuotaError(.err, "no kafka.brokers") }
        // In kafka mode every reply waits for the broker: do not linger (load batches by itself).
        var props = kafka.properties
        if durability == .kafka && props["linger.ms"] == nil { props["linger.ms"] = "0" }
        let shipBox = ship
        let journal = self.journal
        let logger = self.logger
        let recreate = needsRecreate
        let failed = producerFailed
        let kafkaMode = durability == .kafka
        return try KafkaProducer(
            brokers: brokers, topic: kafka.topic, properties: props, logger: logger,
            onDelivery: { reports in
                ClaimPipeline.delivered(reports, ship: shipBox, journal: journal, kafkaMode: kafkaMode, logger: logger)
            },
            onError: { e in
                guard e.isFatal else { return }
                failed.withLockedValue { $0 = true }
                recreate.withLockedValue { if $0 == nil { $0 = "fatal error: \(e)" } }
            })
    }

    /// Ship the unacknowledged events of recovered segments again (same claim ids).
    func reship(_ rec: JournalRecovery) {
        var items: [Outgoing] = []
        for seg in rec.segments {
            for (i, e) in seg.toShip { items.append(Outgoing(position: JournalPosition(segment: seg.id, index: i), event: e)) }
        }
        journal?.markShipped([])
        Self.produce(items, producer: producerBox, ship: ship)
    }

    // MARK: - Admission (hot path: atomic loads)

    /// Why a claim must be refused now (fail closed), or nil.
    private static func refusal(journal: Journal) -> QuotaError? {
        if !journal.isHealthy {
            return QuotaError(.unavailable, "journal not writable: \(journal.lastError ?? "unknown error")")
        }
        if journal.isOverBound {
            return QuotaError(.unavailable, "unshipped journal backlog over journal.max_bytes (\(journal.options.maxBytes))")
        }
        return nil
    }

    func refusal() -> QuotaError? {
        if let j = journalUnretained, let e = j._withUnsafeGuaranteedRef(Self.refusal(journal:)) { return e }
        if _memoryBacklogFull.load(ordering: .relaxed) {
            return QuotaError(.unavailable, "over \(Self.maxUnjournaled) claim events wait for Kafka in memory (no journal.dir)")
        }
        if durability == .kafka && _kafkaDown.load(ordering: .relaxed) {
            return QuotaError(.unavailable, "Kafka unreachable (durability: kafka)")
        }
        return nil
    }

    // MARK: - Records

    /// Append a record. `done` (if any) runs once it is durable (`true`, with its position) or failed.
    /// Without a journal (`durability: none` and no `journal.dir`), shipped events go to Kafka directly
    /// and `done` runs at once.
    func append(_ r: JournalRecord, done: (@Sendable (Bool, JournalPosition?) -> Void)? = nil) {
        if let journal {
            if let done {
                journal.append(r) { res in
                    switch res {
                    case .success(let pos): done(true, pos)
                    case .failure: done(false, nil)
                    }
                }
            } else {
                journal.append(r)
            }
            return
        }
        // No journal (durability none): ship straight to Kafka if there is one; build the event only then.
        if producerBox.withLockedValue({ $0 != nil }), let ev = ShippedEvent(r) {
            Self.produce([Outgoing(position: nil, event: ev)], producer: producerBox, ship: ship)
        }
        done?(true, nil)
    }

    /// Append a claim's record whose answer goes to `sink` with the rest of its write batch
    /// (``JournalBatchSink``). False: not queued (no journal, or the journal is stopping); the caller
    /// answers it as failed.
    func append(_ r: consuming JournalRecord, sink: any JournalBatchSink, token: Int) -> Bool {
        journal?.append(r, sink: sink, token: token) ?? false
    }

    /// `durability: kafka`: run `then` once Kafka acknowledged the event at `pos`.
    func whenAcknowledged(_ pos: JournalPosition, _ then: @escaping @Sendable () -> Void) {
        let now = ship.withLockedValue { s -> Bool in
            if s.earlyAcks.removeValue(forKey: pos) != nil { return true }
            s.waiters[pos] = then
            return false
        }
        if now { then() }
    }

    /// Forget a waiter (the claim timed out and was answered otherwise).
    func stopWaiting(_ pos: JournalPosition) {
        ship.withLockedValue { s in
            s.waiters.removeValue(forKey: pos)
            s.earlyAcks.removeValue(forKey: pos)
        }
    }

    // MARK: - Shipping

    /// Queue `items` in librdkafka, each under the next sequence number (its delivery report's key); those
    /// it cannot queue now wait in `retry` for the next ``tick()``. Generic so that the journal's batch is
    /// read in place (issue 13: a batch copied into another array cost ~500 instructions a claim).
    private static func produce<Items: RandomAccessCollection>(_ items: Items, producer: NIOLockedValueBox<KafkaProducer?>,
                                                               ship: NIOLockedValueBox<ShipState>)
    where Items.Element: ShipItem {
        guard !items.isEmpty, let p = producer.withLockedValue({ $0 }) else { return }
        // Consecutive sequence numbers from `first`, registered before anything is produced (a delivery
        // report can come before `produce` returns).
        let first = ship.withLockedValue { s -> UInt64 in
            if s.bySeq.isEmpty { s.lastProgress = .now }
            let first = s.nextSequence
            for i in items.indices {
                s.bySeq.insert(s.nextSequence, items[i].shipPosition)
                s.nextSequence += 1
            }
            return first
        }
        var failed: [Outgoing] = []
        var failedSeqs: [UInt64] = []
        var cache = KafkaValueCache()
        var scratch = ScratchBytes()
        // Runs of up to `heldRun` messages under one hold of the producer (not a lock a message), each value
        // written into one reused buffer (not an array a message; issue 13). (Bounded: a reship of a whole
        // journal after a recreate must not hold the producer from the journal writer's own batches for its
        // whole length; helper-55.)
        var seq = first
        var start = items.startIndex
        while start != items.endIndex {
            let end = items.index(start, offsetBy: Self.heldRun, limitedBy: items.endIndex) ?? items.endIndex
            let runFirst = seq
            let ran: Void? = p.producing { open in
                for i in items[start..<end].indices {
                    let event = items[i].shipEvent   // (once: each read of it is a copy)
                    do throws(KafkaError) {
                        try event.withKafkaValue(cache: &cache, scratch: &scratch) { (v) throws(KafkaError) in
                            try open.produce(key: event.key, value: v, sequence: seq)
                        }
                    } catch {
                        failed.append(Outgoing(position: items[i].shipPosition, event: event))
                        failedSeqs.append(seq)
                    }
                    seq += 1
                }
            }
            if ran == nil {
                // Closed: nothing of this run was produced (as each message's produce failed before).
                seq = runFirst
                for i in items[start..<end].indices {
                    failed.append(Outgoing(position: items[i].shipPosition, event: items[i].shipEvent))
                    failedSeqs.append(seq)
                    seq += 1
                }
            }
            start = end
        }
        if !failed.isEmpty {
            ship.withLockedValue { s in
                for q in failedSeqs { _ = s.bySeq.remove(q) }
                s.retry += failed
            }
        }
    }

    /// The most messages produced under one hold of the producer.
    static let heldRun = 1024

    private static func delivered(_ reports: [DeliveryReport], ship: NIOLockedValueBox<ShipState>, journal: Journal?,
                                  kafkaMode: Bool, logger: Logger) {
        var acked: [JournalPosition] = []
        acked.reserveCapacity(reports.count)
        var waiters: [@Sendable () -> Void] = []
        ship.withLockedValue { s in
            for r in reports {
                if r.error != nil {
                    // With message.timeout.ms=0 librdkafka retries by itself: this is fatal for the message.
                    // It stays unacknowledged in the journal, and is produced again from there.
                    s.deliveryErrors += 1
                    if case .some(.some(let pos)) = s.bySeq.remove(r.sequence) { s.redeliver.append(pos) }
                    continue
                }
                guard let entry = s.bySeq.remove(r.sequence) else { continue }
                s.shipped += 1
                guard let pos = entry else { continue }
                acked.append(pos)
                // (Looked up only when someone waits: a lookup hashes the position even in an empty dictionary,
                // measured 227 instructions a claim shipping in journal mode, where nobody waits; issue 13.)
                if !s.waiters.isEmpty, let w = s.waiters.removeValue(forKey: pos) {
                    waiters.append(w)
                } else if kafkaMode {
                    s.earlyAcks[pos] = .now
                }
            }
            s.lastProgress = .now
        }
        if !acked.isEmpty { journal?.markShipped(acked) }
        for w in waiters { w() }
    }

    /// Without delivery progress this long while the broker answers, the producer is recreated: a broker
    /// that lost its state can leave an idempotent producer stuck (its producer id and sequence numbers
    /// mean nothing to the new broker) without a fatal error.
    static let stuckAfter: Duration = .seconds(10)

    /// How long an acknowledgement nobody waited for is kept for a waiter that may still come.
    static let earlyAckAge: Duration = .seconds(10)

    /// Periodic: retry events librdkafka could not queue; recreate a producer after a fatal error or when
    /// it is stuck; decide whether Kafka counts as down.
    func tick() {
        if let reason = needsRecreate.withLockedValue({ v in defer { v = nil }; return v }) {
            recreateProducer(reason: reason)
        } else if let p = producerBox.withLockedValue({ $0 }), p.sinceBrokerAnswered < .seconds(2) {
            let stuck = ship.withLockedValue { s in
                !s.bySeq.isEmpty && ContinuousClock.now - s.lastProgress > Self.stuckAfter
                    && ContinuousClock.now - s.lastRecreate > Self.stuckAfter
            }
            if stuck { recreateProducer(reason: "no delivery progress for \(Self.stuckAfter) while the broker answers") }
        }
        var (retry, again) = ship.withLockedValue { s -> ([Outgoing], [JournalPosition]) in
            defer { s.retry.removeAll() }
            // At most once a second: an event the broker keeps refusing must not spin.
            guard !s.redeliver.isEmpty, ContinuousClock.now - s.lastRedelivery >= .seconds(1) else { return (s.retry, []) }
            s.lastRedelivery = .now
            defer { s.redeliver.removeAll() }
            return (s.retry, s.redeliver)
        }
        if !again.isEmpty, let journal {
            again.sort { ($0.segment, $0.index) < ($1.segment, $1.index) }
            for (seg, positions) in Dictionary(grouping: again, by: \.segment) {
                let events = journal.readEvents(segment: seg)
                for p in positions where p.index < events.count { retry.append(Outgoing(position: p, event: events[p.index])) }
            }
        }
        if !retry.isEmpty { Self.produce(retry, producer: producerBox, ship: ship) }
        ship.withLockedValue { s in
            guard !s.earlyAcks.isEmpty, ContinuousClock.now - s.lastEarlyAckSweep >= .seconds(1) else { return }
            s.lastEarlyAckSweep = .now
            let cutoff = ContinuousClock.now - Self.earlyAckAge
            s.earlyAcks = s.earlyAcks.filter { $0.value > cutoff }
        }
        if journal == nil {
            let waiting = ship.withLockedValue { $0.bySeq.count + $0.retry.count }
            let full = waiting > Self.maxUnjournaled
            if _memoryBacklogFull.exchange(full, ordering: .relaxed) != full {
                if full {
                    logger.error("claims refused: too many events wait for Kafka in memory",
                                 metadata: ["waiting": "\(waiting)", "bound": "\(Self.maxUnjournaled)"])
                } else {
                    logger.info("claims served again: Kafka caught up", metadata: ["waiting": "\(waiting)"])
                }
            }
        }
        let stalled = ship.withLockedValue { s in !s.bySeq.isEmpty && ContinuousClock.now - s.lastProgress > unavailableAfter }
        let silent = producerBox.withLockedValue { $0 }.map { $0.sinceBrokerAnswered > unavailableAfter } ?? false
        let failed = producerFailed.withLockedValue { $0 }
        let down = stalled || silent || failed
        let was = _kafkaDown.exchange(down, ordering: .relaxed)
        if down != was {
            if down {
                let why = failed ? "the producer failed and is not replaced yet" : stalled ? "no delivery progress" : "the broker does not answer"
                logger.error("kafka counts as down", metadata: ["why": "\(why)", "after": "\(unavailableAfter)"])
            } else {
                logger.info("kafka deliveries resumed")
            }
        }
    }

    /// Replace the producer, and ship everything the journal holds unacknowledged.
    ///
    /// Not more often than every ``recreateGap``, and not while ``maxLingeringDestroys`` closed producers'
    /// destroys still run (a close leaves a destroy that hangs running, with its threads and sockets: a broker
    /// that keeps failing must not pile them up, helper-49 C). A recreate put off is done by a later tick;
    /// meanwhile the journal keeps what is not shipped (and `durability: kafka` refuses claims).
    private func recreateProducer(reason: String) {
        let since = ship.withLockedValue { ContinuousClock.now - $0.lastRecreate }
        let lingering = lingering.withLockedValue { closed in
            closed.removeAll { $0.destroyFinished }
            return closed.count
        }
        guard since >= recreateGap, lingering < Self.maxLingeringDestroys else {
            needsRecreate.withLockedValue { if $0 == nil { $0 = reason } }
            if deferralLimiter.withLockedValue({ $0.admit("recreate") }) != nil {
                // Held by destroys that do not end, it waits for good (Kafka counts as down meanwhile): an error,
                // for the operator, whose restart of quotad ends them.
                let meta: Logger.Metadata = ["reason": "\(reason)", "since_last": "\(since)", "destroys_running": "\(lingering)"]
                if lingering >= Self.maxLingeringDestroys {
                    logger.error("kafka producer recreate waits for librdkafka destroys that have not ended; a restart ends them",
                                 metadata: meta)
                } else {
                    logger.warning("kafka producer recreate put off", metadata: meta)
                }
            }
            return
        }
        lifecycle.withLockedValue { closed in
            if !closed { replaceProducer(reason: reason) }
        }
    }

    /// The least time between two producer recreations.
    static let defaultRecreateGap: Duration = .seconds(2)
    let recreateGap: Duration
    /// At this many destroys of closed producers still running, no producer is recreated.
    static let maxLingeringDestroys = 2
    private let deferralLimiter = NIOLockedValueBox(LogLimiter(every: .seconds(30)))

    private func replaceProducer(reason: String) {
        let old = producerBox.withLockedValue { p -> KafkaProducer? in
            defer { p = nil }
            return p
        }
        if let old {
            old.close(flushTimeout: .zero)
            if !old.destroyFinished { lingering.withLockedValue { $0.append(old) } }
        }
        // Cleared before the new producer exists (its event thread starts in its init: a fatal error it reports
        // must not be cleared after; helper-51), and set again below if none could be made (no producer is down too).
        producerFailed.withLockedValue { $0 = false }
        let fresh: KafkaProducer
        do {
            fresh = try makeProducer()
        } catch {
            logger.error("cannot recreate the kafka producer; retrying", metadata: ["error": "\(error)"])
            // (Not sooner than the gap either: a producer's init that fails may destroy a handle on this thread.)
            ship.withLockedValue { $0.lastRecreate = .now }
            producerFailed.withLockedValue { $0 = true }
            needsRecreate.withLockedValue { if $0 == nil { $0 = reason } }
            return
        }
        ship.withLockedValue { s in
            s.bySeq.removeAll()
            s.retry.removeAll()
            s.recreations += 1
            s.lastProgress = .now
            s.lastRecreate = .now
        }
        producerBox.withLockedValue { $0 = fresh }
        guard let journal else { return }
        var items: [Outgoing] = []
        let bySegment = Dictionary(grouping: journal.unacknowledged, by: \.segment)
        for (seg, positions) in bySegment {
            let events = journal.readEvents(segment: seg)
            for p in positions where p.index < events.count { items.append(Outgoing(position: p, event: events[p.index])) }
        }
        logger.notice("kafka producer recreated; shipping the unacknowledged journal again",
                      metadata: ["reason": "\(reason)", "events": "\(items.count)"])
        Self.produce(items, producer: producerBox, ship: ship)
    }

    var kafkaDown: Bool { _kafkaDown.load(ordering: .relaxed) }

    /// Tests: a fatal error in the current producer, as a broker's (see ``KafkaProducer/raiseFatalErrorForTesting(_:)``).
    func raiseFatalErrorForTesting() {
        producerBox.withLockedValue { $0 }?.raiseFatalErrorForTesting("raised by a test")
    }

    struct Stats {
        /// Acknowledgements kept for a waiter that has not come (kafka mode).
        var earlyAcks = 0
        var inFlight: Int
        var shipped: Int
        var deliveryErrors: Int
        var recreations: Int
        /// When the producer was last recreated (or the pipeline made).
        var lastRecreate: ContinuousClock.Instant
        var journalBacklogBytes: Int
        var journalUnshipped: Int
        var journalSegments: Int
        var syncs: Int
        var recordsSynced: Int
    }

    var stats: Stats {
        let s = ship.withLockedValue { ($0.bySeq.count + $0.retry.count, $0.shipped, $0.deliveryErrors, $0.recreations, $0.earlyAcks.count, $0.lastRecreate) }
        let sync = journal?.syncStats ?? (0, 0)
        return Stats(earlyAcks: s.4, inFlight: s.0, shipped: s.1, deliveryErrors: s.2, recreations: s.3, lastRecreate: s.5,
                     journalBacklogBytes: journal?.backlogBytes ?? 0, journalUnshipped: journal?.unshippedClaims ?? 0,
                     journalSegments: journal?.segmentCount ?? 0, syncs: sync.0, recordsSynced: sync.1)
    }

    /// Shutdown: write what is queued, flush Kafka (bounded), record what Kafka acknowledged, close the
    /// journal. What is not shipped stays in the journal and ships at the next start.
    func close(flushTimeout: Duration) {
        journal?.stopWriting()
        lifecycle.withLockedValue { closed in
            closed = true
            guard let p = producerBox.withLockedValue({ $0 }) else { return }
            let left = p.flush(timeout: flushTimeout)
            if left > 0 {
                logger.warning("kafka not fully flushed at shutdown; the journal keeps the rest", metadata: ["outstanding": "\(left)"])
            }
            p.close(flushTimeout: .zero)
        }
        journal?.close()
    }
}

/// An event to ship, and its journal position (nil: not journaled).
protocol ShipItem {
    var shipPosition: JournalPosition? { get }
    var shipEvent: ShippedEvent { get }
}

/// An event to ship that is not a journal batch's (recovered, retried, or not journaled).
struct Outgoing: ShipItem {
    var position: JournalPosition?
    var event: ShippedEvent
    var shipPosition: JournalPosition? { position }
    var shipEvent: ShippedEvent { event }
}

extension DurableEvent: ShipItem {
    var shipPosition: JournalPosition? { position }
    var shipEvent: ShippedEvent { event }
}
