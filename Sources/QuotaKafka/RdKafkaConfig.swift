import CRdKafka

/// Builds a librdkafka configuration; the error names the property.
enum RdKafkaConfig {
    static func make(_ props: [(String, String)]) throws(KafkaError) -> OpaquePointer {
        let conf = rd_kafka_conf_new()!
        var err = [CChar](repeating: 0, count: 512)
        for (k, v) in props {
            if rd_kafka_conf_set(conf, k, v, &err, err.count) != RD_KAFKA_CONF_OK {
                rd_kafka_conf_destroy(conf)
                throw KafkaError(code: -1, name: "CONFIG", message: "kafka property '\(k)': \(cString(err))")
            }
        }
        return conf
    }

    static func error(_ code: rd_kafka_resp_err_t, _ text: String? = nil) -> KafkaError {
        KafkaError(code: code.rawValue, name: String(cString: rd_kafka_err2name(code)),
                   message: text ?? String(cString: rd_kafka_err2str(code)))
    }

    /// The librdkafka version actually loaded at run time.
    static var version: String { String(cString: rd_kafka_version_str()) }
}

/// A NUL-terminated C buffer as a String.
func cString(_ buf: [CChar]) -> String {
    String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}
