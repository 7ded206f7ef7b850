/// A Kafka failure, with librdkafka's error name and text.
public struct KafkaError: Error, Sendable, Equatable, CustomStringConvertible {
    public var code: Int32
    public var name: String
    public var message: String
    public var isFatal: Bool = false

    public var description: String { "Kafka \(name): \(message)" }
}

/// The delivery outcome of one produced message.
public struct DeliveryReport: Sendable, Equatable {
    /// The sequence number given to ``KafkaProducer/produce(key:value:sequence:)``.
    public var sequence: UInt64
    /// nil when the broker acknowledged the message (acks=all).
    public var error: KafkaError?
}
