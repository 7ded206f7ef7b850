import Foundation
import Glibc
import QuotaClient
import QuotaHarness
import QuotaKafka
import QuotaRESP
import Testing

/// A stop must end within its bounds (drain, then Kafka's flush) even when the broker lost every producer id
/// and message while claims were being shipped: librdkafka's destroy otherwise waits for broker threads whose
/// requests are never answered (chaos seed 1590122988: a stop past 40 s).
@Suite("A stop after the broker lost its state", .serialized, .timeLimit(.minutes(5)))
struct KafkaStopTests {
    @Test(arguments: [("kafka", false), ("kafka", true)])
    func aSidecarShippingToABrokerThatLostEverythingStopsWithinItsBounds(durability: String, frozenAcrossTheWipe: Bool) async throws {
        let kafka = try await KafkaBroker()
        let redis = try await RedisServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "kw", limit: 1_000_000, perUser: 0, totalLimit: 1_000_000, region: "sg")
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a",
                                 extraYAML: "limits: { claim_timeout_ms: 300 }\n",
                                 kafka: kafka, topic: "t-kw", durability: durability)
        let c = try await RESPClient.connect(q.socket)
        // Claims flow (pipelined) before, across and after the wipe, so that requests are in flight to it.
        let until = ContinuousClock.now + .seconds(frozenAcrossTheWipe ? 8 : 5)
        let load = Task {
            var n = 0
            var answered: [String] = []
            while ContinuousClock.now < until {
                let rs = try await c.pipeline((0..<50).map { ["CLAIM", "kw", "u\(n + $0)"] })
                n += rs.count
                for r in rs { if case .bulkString(let b?) = r { answered.append(String(buffer: b)) } }
                // Paced (this suite runs beside the others): enough for requests in flight to the broker.
                try await Task.sleep(for: .milliseconds(20))
            }
            return (n, answered)
        }
        try await Task.sleep(for: .seconds(2))
        // The chaos run's sidecar was also stopped (SIGSTOP) for a while around the wipe.
        if frozenAcrossTheWipe { q.child.signal(SIGSTOP) }
        try await kafka.restartEmpty()
        if frozenAcrossTheWipe {
            try await Task.sleep(for: .seconds(2))
            q.child.signal(SIGCONT)
        }
        let (sent, answered) = try await load.value
        let t0 = ContinuousClock.now
        q.child.signal(SIGTERM)
        // Drain (10 s) + Kafka flush (10 s) + slack for a loaded machine; the stop seen hung was past 40 s.
        // (Past 25 s, where the stop waits is printed: gdb's stacks, taken before the bound fails the test.)
        let early = try? await q.child.wait(timeout: .seconds(25))
        let stacks = early == nil ? threadStacks(q.child.pid) : ""
        let left = (t0 + .seconds(35)) - ContinuousClock.now
        var status = early ?? -1
        if early == nil {
            status = try await step("quotad exits within 35 s of SIGTERM", within: left,
                                    context: { "\(stacks)\nlog:\n\(q.allLogs.suffix(3000))" }) { try await q.child.wait(timeout: .seconds(40)) }
        }
        let took = ContinuousClock.now - t0
        #expect(status == 0, "\(q.allLogs.suffix(3000))")
        if !stacks.isEmpty { print("the stop took more than 25 s; where it waited:\(stacks)") }
        print("durability \(durability): \(sent) claims sent, \(answered.count) answered; stop took \(took)")
        c.close()
        // What the stop did not ship (purged from the producer) is in the journal, and the next run ships it.
        try await q.restart()
        try await eventually("the journal is shipped", timeout: .seconds(60)) { try await q.stat("journal_unshipped_claims") == 0 }
        #expect(try await q.stop() == 0)
        // (Not compared with the topic: the wipe lost what the broker had acknowledged before it.)
        withExtendedLifetime((kafka, redis, dir)) {}
    }
}

/// A broker of its own, and a producer to it whose reports are collected ("ok" or the error).
private func producerWithReports(topic: String) async throws -> (KafkaBroker, Answered, KafkaProducer) {
    let kafka = try await KafkaBroker()
    let reports = Answered()
    let p = try KafkaProducer(brokers: kafka.brokers, topic: topic, logger: .init(label: "t"),
                              onDelivery: { rs in for r in rs { reports.add(r.error.map { "\($0)" } ?? "ok") } })
    return (kafka, reports, p)
}

@Suite("The producer's close", .serialized, .timeLimit(.minutes(3)))
struct KafkaProducerCloseTests {
    /// A broker that stopped answering with messages in flight: close returns within its flush bound and a
    /// little more, and the purged messages are not reported to the owner (it keeps them to produce again).
    @Test func closeWithABrokerThatStoppedAnsweringReturnsPromptlyAndReportsNoPurgedMessage() async throws {
        let (kafka, reports, p) = try await producerWithReports(topic: "stuck")
        for i in 1...500 { try p.produce(key: "k", value: Array("m\(i)".utf8), sequence: UInt64(i)) }
        #expect(try await offThePool { p.flush(timeout: .seconds(30)) } == 0)
        kafka.child.signal(SIGSTOP)
        defer { kafka.child.signal(SIGCONT) }
        // (Once, under the whole suite's load, all 1,500 were acknowledged: the messages are produced only once the
        // broker is seen stopped.)
        func state() -> String {
            ((try? String(contentsOfFile: "/proc/\(kafka.child.pid)/status", encoding: .utf8)) ?? "")
                .split(separator: "\n").first { $0.hasPrefix("State:") }.map(String.init) ?? "?"
        }
        try await eventually("the broker is stopped", timeout: .seconds(5)) { state().contains("T (stopped)") }
        let acknowledgedBefore = reports.all.count
        for i in 501...1500 { try p.produce(key: "k", value: Array("m\(i)".utf8), sequence: UInt64(i)) }
        try await Task.sleep(for: .milliseconds(300))
        #expect(p.outstanding > 0, "broker \(state()); \(reports.all.count) reports, \(acknowledgedBefore) before the stop")
        let t0 = ContinuousClock.now
        try await offThePool { p.close(flushTimeout: .milliseconds(500)) }
        let took = ContinuousClock.now - t0
        print("close took \(took)")
        #expect(took < .seconds(5), "close took \(took)")
        let all = reports.all
        #expect(all.filter { $0 != "ok" }.isEmpty, "\(Set(all.filter { $0 != "ok" }))")
        #expect(all.count == acknowledgedBefore, "only what the broker acknowledged before it stopped is reported")
    }
}

@Suite("A closed producer", .timeLimit(.minutes(2)))
struct KafkaProducerClosedTests {
    /// helper-49: the pipeline's recreate could close a producer another thread was still producing on. A produce
    /// after close begins is refused (`CLOSED`, the caller keeps the message) and never reaches the freed handles.
    @Test func aProduceAfterCloseIsRefusedAndNeverReported() async throws {
        let (kafka, reports, p) = try await producerWithReports(topic: "closed")
        try p.produce(key: "k", value: Array("m1".utf8), sequence: 1)
        try await offThePool { p.close(flushTimeout: .seconds(10)) }
        #expect(reports.all == ["ok"])
        #expect(throws: KafkaError.self) { try p.produce(key: "k", value: Array("m2".utf8), sequence: 2) }
        do {
            try p.produce(key: "k", value: Array("m3".utf8), sequence: 3)
        } catch {
            #expect(error.name == "CLOSED", "\(error)")
        }
        #expect(reports.all == ["ok"])
        withExtendedLifetime(kafka) {}
    }
}

@Suite("One-shot delivery", .timeLimit(.minutes(2)))
struct ProduceAllTests {
    /// An event Kafka never acknowledged (here one too large to queue) is a failure, not a success with a
    /// smaller count that a caller ignoring the count takes for "all delivered" (helper-44).
    @Test func anEventNeverAcknowledgedMakesTheOneShotDeliveryThrow() async throws {
        let kafka = try await KafkaBroker()
        let events: [(key: String, value: [UInt8])] = [("a", Array("small".utf8)), ("b", [UInt8](repeating: 65, count: 2_000_000))]
        let brokers = kafka.brokers
        let failed = try await offThePool { () -> Bool in
            do {
                _ = try KafkaProducer.produceAll(brokers: brokers, topic: "one-shot", events, logger: .init(label: "t"),
                                                 timeout: .seconds(20))
                return false
            } catch { return true }
        }
        #expect(failed, "a delivery with an event never acknowledged did not throw")
        #expect(try await offThePool {
            try KafkaProducer.produceAll(brokers: brokers, topic: "one-shot", [("c", Array("fine".utf8))],
                                         logger: .init(label: "t"), timeout: .seconds(20))
        } == 1)
    }
}
