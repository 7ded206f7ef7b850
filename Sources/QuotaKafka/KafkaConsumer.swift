import CRdKafka
import Foundation

/// One consumed message.
public struct KafkaMessage: Sendable {
    public var key: String
    public var value: [UInt8]
    public var partition: Int32
    public var offset: Int64
}

/// Reads one topic from the earliest offset (tests, `quota-ledger`). Not thread-safe: use it from one task.
///
/// `.group` joins a consumer group (`subscribe`); `.allPartitions` assigns every partition of the topic
/// directly, with no group coordination (Tansu's group coordinator does not hand out partitions to
/// librdkafka 2.16 here; tests read back with this mode).
public final class KafkaConsumer: @unchecked Sendable {
    public enum Mode: Sendable { case group, allPartitions }
    private let rk: OpaquePointer
    private var isClosed = false
    /// Partitions assigned (`.allPartitions`).
    public private(set) var partitions: Int32 = 0
    public let topic: String
    /// The last error a poll saw (broker down, unknown topic), cleared by the next message.
    public private(set) var lastError: KafkaError?

    /// - Parameter startOffsets: with `.allPartitions`, where to start reading each partition (the next
    ///   offset to read); a partition not listed starts at its beginning.
    public init(brokers: String, topic: String, group: String, mode: Mode = .allPartitions,
                properties: [String: String] = [:], startOffsets: [Int32: Int64] = [:]) throws(KafkaError) {
        var props: [(String, String)] = [
            ("bootstrap.servers", brokers), ("group.id", group), ("auto.offset.reset", "earliest"),
            ("enable.auto.commit", "true"), ("enable.partition.eof", "false"),
        ]
        for (k, v) in properties.sorted(by: { $0.key < $1.key }) {
            props.removeAll { $0.0 == k }
            props.append((k, v))
        }
        let conf = try RdKafkaConfig.make(props)
        var err = [CChar](repeating: 0, count: 512)
        guard let rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, &err, err.count) else {
            rd_kafka_conf_destroy(conf)
            throw KafkaError(code: -1, name: "CREATE", message: cString(err))
        }
        self.rk = rk
        self.topic = topic
        rd_kafka_poll_set_consumer(rk)
        switch mode {
        case .group:
            let list = rd_kafka_topic_partition_list_new(1)
            rd_kafka_topic_partition_list_add(list, topic, RD_KAFKA_PARTITION_UA)
            let rc = rd_kafka_subscribe(rk, list)
            rd_kafka_topic_partition_list_destroy(list)
            if rc != RD_KAFKA_RESP_ERR_NO_ERROR { throw RdKafkaConfig.error(rc) }
        case .allPartitions:
            let n = try Self.partitionCount(rk, topic: topic)
            let list = rd_kafka_topic_partition_list_new(n)
            for p in 0..<n {
                rd_kafka_topic_partition_list_add(list, topic, p)?.pointee.offset = startOffsets[p] ?? Int64(RD_KAFKA_OFFSET_BEGINNING)
            }
            partitions = n
            let rc = rd_kafka_assign(rk, list)
            rd_kafka_topic_partition_list_destroy(list)
            if rc != RD_KAFKA_RESP_ERR_NO_ERROR { throw RdKafkaConfig.error(rc) }
        }
    }

    private static func partitionCount(_ rk: OpaquePointer, topic: String) throws(KafkaError) -> Int32 {
        guard let rkt = rd_kafka_topic_new(rk, topic, nil) else { throw RdKafkaConfig.error(rd_kafka_last_error()) }
        defer { rd_kafka_topic_destroy(rkt) }
        var lastError = RD_KAFKA_RESP_ERR_NO_ERROR
        for _ in 0..<50 {
            var md: UnsafePointer<rd_kafka_metadata>?
            let rc = rd_kafka_metadata(rk, 0, rkt, &md, 2000)
            if rc == RD_KAFKA_RESP_ERR_NO_ERROR, let md {
                defer { rd_kafka_metadata_destroy(md) }
                if md.pointee.topic_cnt > 0, md.pointee.topics[0].err == RD_KAFKA_RESP_ERR_NO_ERROR,
                    md.pointee.topics[0].partition_cnt > 0
                {
                    return md.pointee.topics[0].partition_cnt
                }
                lastError = md.pointee.topic_cnt > 0 ? md.pointee.topics[0].err : RD_KAFKA_RESP_ERR__UNKNOWN_TOPIC
            } else {
                lastError = rc
            }
            usleep(100_000)
        }
        throw RdKafkaConfig.error(lastError)
    }

    /// The next message, or nil after `timeoutMs` without one. Transient broker errors are skipped.
    public func poll(timeoutMs: Int32) -> KafkaMessage? {
        guard let m = rd_kafka_consumer_poll(rk, timeoutMs) else { return nil }
        defer { rd_kafka_message_destroy(m) }
        let p = m.pointee
        guard p.err == RD_KAFKA_RESP_ERR_NO_ERROR else {
            if p.err != RD_KAFKA_RESP_ERR__PARTITION_EOF { lastError = RdKafkaConfig.error(p.err) }
            return nil
        }
        lastError = nil
        let value = p.payload.map { Array(UnsafeRawBufferPointer(start: $0, count: p.len)) } ?? []
        let key = p.key.map { String(decoding: UnsafeRawBufferPointer(start: $0, count: p.key_len), as: UTF8.self) } ?? ""
        return KafkaMessage(key: key, value: value, partition: p.partition, offset: p.offset)
    }

    /// Read until `idle` passes with no message (or `limit` passes). Waits up to `firstWait`
    /// for the first message: joining the consumer group takes a few seconds.
    public func drain(idle: Duration = .seconds(3), firstWait: Duration = .seconds(20), limit: Duration = .seconds(60))
        -> [KafkaMessage]
    {
        var out: [KafkaMessage] = []
        let end = ContinuousClock.now + limit
        var lastMessage = ContinuousClock.now + (firstWait > idle ? firstWait - idle : .zero)
        while ContinuousClock.now < end && ContinuousClock.now - lastMessage < idle {
            if let m = poll(timeoutMs: 100) {
                out.append(m)
                lastMessage = .now
            }
        }
        return out
    }

    /// The high watermark (next offset to be written) of each assigned partition, or nil when the broker
    /// does not answer within `timeoutMs`.
    public func highWatermarks(timeoutMs: Int32 = 2000) -> [Int32: Int64]? {
        var out: [Int32: Int64] = [:]
        for p in 0..<partitions {
            var lo: Int64 = 0
            var hi: Int64 = 0
            guard rd_kafka_query_watermark_offsets(rk, topic, p, &lo, &hi, timeoutMs) == RD_KAFKA_RESP_ERR_NO_ERROR else {
                return nil
            }
            out[p] = hi
        }
        return out
    }

    public func close() {
        guard !isClosed else { return }
        isClosed = true
        rd_kafka_consumer_close(rk)
        rd_kafka_destroy(rk)
    }

    deinit { close() }
}

/// librdkafka's in-process mock cluster, on real 127.0.0.1 ports, for fault injection.
public final class KafkaMockCluster: @unchecked Sendable {
    private let rk: OpaquePointer
    private let cluster: OpaquePointer
    public let bootstrapServers: String

    public init(brokers: Int32 = 3) throws(KafkaError) {
        let conf = try RdKafkaConfig.make([("log_level", "0")])
        var err = [CChar](repeating: 0, count: 512)
        guard let rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, &err, err.count) else {
            throw KafkaError(code: -1, name: "CREATE", message: cString(err))
        }
        guard let c = rd_kafka_mock_cluster_new(rk, brokers) else {
            rd_kafka_destroy(rk)
            throw KafkaError(code: -1, name: "MOCK", message: "cannot create mock cluster")
        }
        self.rk = rk
        self.cluster = c
        self.bootstrapServers = String(cString: rd_kafka_mock_cluster_bootstraps(c))
    }

    public func createTopic(_ name: String, partitions: Int32 = 3) {
        _ = rd_kafka_mock_topic_create(cluster, name, partitions, 1)
        for p in 0..<partitions { _ = rd_kafka_mock_partition_set_leader(cluster, name, p, 1) }
    }

    public func setBroker(_ id: Int32, up: Bool) {
        _ = up ? rd_kafka_mock_broker_set_up(cluster, id) : rd_kafka_mock_broker_set_down(cluster, id)
    }

    /// Make the next `count` Produce requests fail with a retriable error.
    public func failNextProduces(_ count: Int) {
        var errs = [rd_kafka_resp_err_t](repeating: RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS, count: count)
        rd_kafka_mock_push_request_errors_array(cluster, 0 /* Produce */, count, &errs)
    }

    deinit {
        rd_kafka_mock_cluster_destroy(cluster)
        rd_kafka_destroy(rk)
    }
}
