import CRdKafka
import Foundation
import Logging
import NIOConcurrencyHelpers

/// An idempotent producer (`enable.idempotence=true`, `acks=all`) for one topic.
///
/// Delivery reports and errors are read from librdkafka's main event queue by one
/// dedicated thread (no C callbacks carrying Swift objects) and handed to `onDelivery`
/// / `onError` in batches. The handles are freed by ``close(flushTimeout:)``.
public final class KafkaProducer: @unchecked Sendable {
    public let topic: String
    private let rk: OpaquePointer
    private let rkt: OpaquePointer
    private let queue: OpaquePointer
    private let logger: Logger
    private let running = NIOLockedValueBox(true)
    private var thread: Thread?
    private let onDelivery: @Sendable ([DeliveryReport]) -> Void
    private let onError: @Sendable (KafkaError) -> Void
    private let closed = NIOLockedValueBox(false)
    private var probeThread: Thread?
    private let lastProbeOK = NIOLockedValueBox(ContinuousClock.now)
    /// One line per kind of error or log facility per 30 s (event thread only).
    private var limiter = LogLimiter(every: .seconds(30))

    /// - Parameters:
    ///   - properties: any librdkafka property; `enable.idempotence` and `acks` are forced.
    public init(
        brokers: String, topic: String, properties: [String: String] = [:], logger: Logger,
        onDelivery: @escaping @Sendable ([DeliveryReport]) -> Void,
        onError: @escaping @Sendable (KafkaError) -> Void = { _ in }
    ) throws(KafkaError) {
        var props: [(String, String)] = [
            ("bootstrap.servers", brokers), ("linger.ms", "5"), ("batch.num.messages", "10000"),
            ("queue.buffering.max.messages", "1000000"), ("message.timeout.ms", "0"),
            ("socket.keepalive.enable", "true"), ("log.queue", "true"),
        ]
        for (k, v) in properties.sorted(by: { $0.key < $1.key }) {
            props.removeAll { $0.0 == k }
            props.append((k, v))
        }
        props.append(("enable.idempotence", "true"))
        props.append(("acks", "all"))
        let conf = try RdKafkaConfig.make(props)
        rd_kafka_conf_set_events(conf, Int32(RD_KAFKA_EVENT_DR | RD_KAFKA_EVENT_ERROR | RD_KAFKA_EVENT_LOG))
        var err = [CChar](repeating: 0, count: 512)
        guard let rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, &err, err.count) else {
            rd_kafka_conf_destroy(conf)
            throw KafkaError(code: -1, name: "CREATE", message: cString(err))
        }
        guard let rkt = rd_kafka_topic_new(rk, topic, nil) else {
            rd_kafka_destroy(rk)
            throw RdKafkaConfig.error(rd_kafka_last_error())
        }
        self.rk = rk
        self.rkt = rkt
        self.queue = rd_kafka_queue_get_main(rk)
        // librdkafka's own log lines come through the same queue, so they can be rate-limited.
        _ = rd_kafka_set_log_queue(rk, queue)
        self.topic = topic
        self.logger = logger
        self.onDelivery = onDelivery
        self.onError = onError
        let t = Thread { [self] in self.pollLoop() }
        t.name = "kafka-events"
        thread = t
        t.start()
        let p = Thread { [self] in self.probeLoop() }
        p.name = "kafka-probe"
        probeThread = p
        p.start()
        logger.info("kafka producer started", metadata: ["kafka.brokers": "\(brokers)", "kafka.topic": "\(topic)",
                                                         "librdkafka": "\(RdKafkaConfig.version)"])
    }

    /// The producer held open for a run of messages (``producing(_:)``): close waits until the run ends. Not
    /// copyable, and lent to the run only: it cannot outlive the call (helper-55).
    public struct Open: ~Copyable {
        fileprivate let rkt: OpaquePointer

        /// Queue one message (librdkafka copies the key and value); `sequence` comes back in its delivery report.
        public func produce(key: String, value: UnsafeRawBufferPointer, sequence: UInt64) throws(KafkaError) {
            func send(_ k: UnsafeBufferPointer<UInt8>) -> Int32 {
                rd_kafka_produce(
                    rkt, RD_KAFKA_PARTITION_UA, RD_KAFKA_MSG_F_COPY, UnsafeMutableRawPointer(mutating: value.baseAddress),
                    value.count, k.baseAddress, k.count, UnsafeMutableRawPointer(bitPattern: UInt(sequence)))
            }
            // (The key's bytes where they are; a foreign string made native first.)
            var k = key
            let rc = key.utf8.withContiguousStorageIfAvailable(send) ?? k.withUTF8(send)
            if rc != 0 { throw RdKafkaConfig.error(rd_kafka_last_error()) }
        }
    }

    /// Runs `body` with the producer held open, under one taking of `closed`'s lock for the whole run (not one a
    /// message; issue 13). Nil, without calling `body`, when the producer is closed.
    public func producing<R>(_ body: (borrowing Open) -> R) -> R? {
        closed.withLockedValue { isClosed in
            guard !isClosed else { return nil }
            let open = Open(rkt: rkt)
            return body(open)
        }
    }

    /// Queue one message. Throws when librdkafka's local queue is full (`_QUEUE_FULL`) or the topic is unknown,
    /// and `CLOSED` once ``close(flushTimeout:)`` has begun: a produce never runs on
    /// handles being freed (helper-49: the pipeline's recreate closed a producer that another thread was
    /// still producing on); the caller keeps the message for the next producer.
    /// (One message as a run of one: ``Open/produce(key:value:sequence:)`` is the one place a message is queued.)
    public func produce(key: String, value: [UInt8], sequence: UInt64) throws(KafkaError) {
        let r: Result<Void, KafkaError>? = producing { open in
            value.withUnsafeBytes { v in Result { () throws(KafkaError) in try open.produce(key: key, value: v, sequence: sequence) } }
        }
        guard let r else { throw KafkaError(code: -1, name: "CLOSED", message: "the producer is closed") }
        try r.get()
    }

    /// Raises a fatal error in librdkafka as a broker's would (`rd_kafka_test_fatal_error`, librdkafka's own
    /// testing entry point): it reaches `onError` with `isFatal` set. For tests of what the owner does then.
    public func raiseFatalErrorForTesting(_ reason: String) {
        closed.withLockedValue { isClosed in
            if !isClosed { _ = rd_kafka_test_fatal_error(rk, RD_KAFKA_RESP_ERR__FATAL, reason) }
        }
    }

    /// Time since a broker last answered the liveness probe (a metadata request every 500 ms),
    /// so an unreachable broker is noticed even when nothing is being produced.
    public var sinceBrokerAnswered: Duration { ContinuousClock.now - lastProbeOK.withLockedValue { $0 } }

    private func probeLoop() {
        while running.withLockedValue({ $0 }) {
            var md: UnsafePointer<rd_kafka_metadata>?
            if rd_kafka_metadata(rk, 0, rkt, &md, 1000) == RD_KAFKA_RESP_ERR_NO_ERROR, let md {
                rd_kafka_metadata_destroy(md)
                lastProbeOK.withLockedValue { $0 = .now }
            }
            for _ in 0..<5 where running.withLockedValue({ $0 }) { usleep(100_000) }
        }
    }

    /// Messages not yet delivered (queued or in flight).
    public var outstanding: Int { Int(rd_kafka_outq_len(rk)) }

    /// Wait up to `timeout` for every queued message to be delivered. Returns what is still outstanding.
    @discardableResult
    public func flush(timeout: Duration) -> Int {
        _ = rd_kafka_flush(rk, Int32(timeout.components.seconds * 1000 + timeout.components.attoseconds / 1_000_000_000_000_000))
        return outstanding
    }

    /// Flush (bounded), purge what is left, stop the event thread, free the handles. Idempotent.
    ///
    /// What is still queued or in flight after the flush is purged (never reported to `onDelivery`: its
    /// owner keeps it to produce again). Without the purge, `rd_kafka_destroy` waits for the broker threads,
    /// and with `message.timeout.ms` 0 a broker thread whose requests a broker that lost its state never
    /// answers kept a stop waiting past 40 s (chaos seed 1590122988).
    public func close(flushTimeout: Duration = .seconds(5)) {
        guard closed.withLockedValue({ let was = $0; $0 = true; return !was }) else { return }
        if flush(timeout: flushTimeout) > 0 {
            _ = rd_kafka_purge(rk, Int32(RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT))
            // The purged messages' reports come through the event thread (and are dropped there).
            let deadline = ContinuousClock.now + .seconds(2)
            while outstanding > 0, ContinuousClock.now < deadline { usleep(10_000) }
        }
        running.withLockedValue { $0 = false }
        while thread?.isFinished == false || probeThread?.isFinished == false { usleep(10_000) }
        rd_kafka_queue_destroy(queue)
        rd_kafka_topic_destroy(rkt)
        // `rd_kafka_destroy` joins librdkafka's broker threads, and after a broker lost its state a broker thread
        // was seen serving its queue past 25 s even after the purge (a stop under the suite's load, gdb: the main
        // thread in `rd_kafka_destroy_internal`, a broker thread in `rd_kafka_broker_serve`). Nothing of ours is
        // left in it (the event thread has stopped, the purged messages stay in the journal), so a destroy that
        // takes longer than `destroyWait` goes on on its own thread and close returns; at exit the process ends it.
        let destroyer = Thread { [self] in
            rd_kafka_destroy(rk)
            destroyed.withLockedValue { $0 = true }
        }
        destroyer.name = "kafka-destroy"
        destroyer.start()
        let deadline = ContinuousClock.now + Self.destroyWait
        while !destroyFinished, ContinuousClock.now < deadline { usleep(5_000) }
        if !destroyFinished {
            logger.warning("librdkafka's destroy did not finish in time; it goes on in the background",
                           metadata: ["kafka.topic": "\(topic)", "waited": "\(Self.destroyWait)"])
        }
    }

    /// Whether librdkafka's destroy of this producer has ended (a ``close(flushTimeout:)`` that returned may have left
    /// it running, with librdkafka's threads and sockets: whoever makes producers again and again bounds how many
    /// of those it leaves, helper-49 C).
    public var destroyFinished: Bool { destroyed.withLockedValue { $0 } }
    private let destroyed = NIOLockedValueBox(false)

    /// How long ``close(flushTimeout:)`` waits for librdkafka's destroy.
    static let destroyWait = Duration.seconds(5)

    private func pollLoop() {
        var batch: [DeliveryReport] = []
        while running.withLockedValue({ $0 }) {
            guard let ev = rd_kafka_queue_poll(queue, 100) else { continue }
            switch rd_kafka_event_type(ev) {
            case RD_KAFKA_EVENT_DR:
                let n = rd_kafka_event_message_count(ev)
                var msgs = [UnsafePointer<rd_kafka_message_t>?](repeating: nil, count: n)
                let got = rd_kafka_event_message_array(ev, &msgs, n)
                batch.removeAll(keepingCapacity: true)
                for i in 0..<got {
                    guard let m = msgs[i] else { continue }
                    let seq = UInt64(UInt(bitPattern: m.pointee._private))
                    let e = m.pointee.err
                    // Purged by close: neither delivered nor failed for the owner, who produces it again.
                    if e == RD_KAFKA_RESP_ERR__PURGE_QUEUE || e == RD_KAFKA_RESP_ERR__PURGE_INFLIGHT { continue }
                    batch.append(DeliveryReport(sequence: seq, error: e == RD_KAFKA_RESP_ERR_NO_ERROR ? nil : RdKafkaConfig.error(e)))
                }
                if !batch.isEmpty { onDelivery(batch) }
            case RD_KAFKA_EVENT_ERROR:
                var e = RdKafkaConfig.error(rd_kafka_event_error(ev), String(cString: rd_kafka_event_error_string(ev)))
                e.isFatal = rd_kafka_event_error_is_fatal(ev) != 0
                if e.isFatal {
                    logger.error("kafka producer fatal error", metadata: ["error": "\(e)"])
                } else if let n = limiter.admit(e.name) {
                    logger.warning("kafka error", metadata: ["error": "\(e)", "repeats_suppressed": "\(n)"])
                }
                onError(e)
            case RD_KAFKA_EVENT_LOG:
                var fac: UnsafePointer<CChar>?
                var str: UnsafePointer<CChar>?
                var level: Int32 = 0
                if rd_kafka_event_log(ev, &fac, &str, &level) == 0 {
                    let facility = fac.map { String(cString: $0) } ?? "?"
                    if let n = limiter.admit("log." + facility) {
                        let text = str.map { String(cString: $0) } ?? ""
                        logger.notice("librdkafka", metadata: ["facility": "\(facility)", "message": "\(text)",
                                                               "repeats_suppressed": "\(n)"])
                    }
                }
            default:
                break
            }
            rd_kafka_event_destroy(ev)
        }
    }
}

/// Admits the first message of each kind, then at most one per `every`, counting what it held back.
public struct LogLimiter: Sendable {
    public let every: Duration
    private var last: [String: (at: ContinuousClock.Instant, suppressed: Int)] = [:]

    public init(every: Duration) { self.every = every }

    /// nil: hold this one back. Else the number held back since the last one admitted.
    public mutating func admit(_ kind: String) -> Int? {
        let now = ContinuousClock.now
        if let l = last[kind], now - l.at < every {
            last[kind]!.suppressed += 1
            return nil
        }
        let n = last[kind]?.suppressed ?? 0
        last[kind] = (now, 0)
        return n
    }
}

/// A one-shot delivery failure of ``KafkaProducer/produceAll(brokers:topic:_:logger:timeout:)``.
public struct KafkaDeliveryError: Error, Sendable, CustomStringConvertible {
    public var description: String
}

extension KafkaProducer {
    /// Produce `events` with a short-lived idempotent producer and wait until Kafka acknowledged them all
    /// (operator tools, and rare sidecar records such as a borrow's allocations). Returns how many were
    /// acknowledged; throws when the producer cannot start or not all were acknowledged within `timeout`.
    public static func produceAll(brokers: String, topic: String, _ events: [(key: String, value: [UInt8])],
                                  properties: [String: String] = [:], logger: Logger,
                                  timeout: Duration = .seconds(60)) throws(KafkaDeliveryError) -> Int {
        guard !events.isEmpty else { return 0 }
        let acked = NIOLockedValueBox(0)
        let p: KafkaProducer
        do {
            p = try KafkaProducer(brokers: brokers, topic: topic, properties: properties, logger: logger,
                                  onDelivery: { rs in acked.withLockedValue { $0 += rs.filter { $0.error == nil }.count } })
        } catch {
            throw KafkaDeliveryError(description: "cannot start a Kafka producer for \(brokers): \(error)")
        }
        for (i, e) in events.enumerated() {
            do {
                try p.produce(key: e.key, value: e.value, sequence: UInt64(i + 1))
            } catch {
                _ = p.flush(timeout: .seconds(5))
                try? p.produce(key: e.key, value: e.value, sequence: UInt64(i + 1))
            }
        }
        let left = p.flush(timeout: timeout)
        p.close(flushTimeout: .zero)
        guard left == 0 else {
            throw KafkaDeliveryError(description: "Kafka did not acknowledge \(left) of \(events.count) events within \(timeout)")
        }
        // Nothing outstanding is not everything delivered: an event that could not be queued, or whose report
        // was an error, left nothing behind either.
        let n = acked.withLockedValue { $0 }
        guard n == events.count else {
            throw KafkaDeliveryError(description: "Kafka acknowledged \(n) of \(events.count) events (the rest failed)")
        }
        return n
    }
}
