import Foundation
import Logging
import NIOConcurrencyHelpers
import QuotaHarness
import QuotaConfig
import QuotaCore
import QuotaJournal
@testable import QuotaServer
import Testing

/// Review of 0968746: runs produced under one hold of the producer while the producer is recreated again and
/// again (fatal errors) from another thread; every journaled claim reaches Kafka with its exact bytes, nothing
/// stays in flight, and no run deadlocks with a close.
@Suite("Producing runs under recreate (review)", .timeLimit(.minutes(4)))
struct ProducingRunReviewTests {
    @Test func everyClaimShipsWithItsBytesWhileTheProducerIsRecreated() async throws {
        let kafka = try await KafkaBroker()
        let fx = try PipelineFixture("cp-run", brokers: kafka.brokers)
        fx.config.kafka.topic = "review-\(UUID().uuidString.prefix(8))"
        let pipeline = try await offThePool { try fx.pipeline(recreateGap: .milliseconds(30)) }
        let sent = NIOLockedValueBox<[String: [UInt8]]>([:])
        let stop = NIOLockedValueBox(false)
        let writers = (0..<2).map { w in
            let t = Thread {
                var n = 0
                while !stop.withLockedValue({ $0 }) {
                    let shares = (0..<(1 + n % 3)).map { _ in ClaimShare(leaseId: "sg:h:\(w):\(n % 5)\u{1}\"", tokens: 1) }
                    let e = ClaimEvent(kind: n % 7 == 0 ? .unclaimed : .claimed, idPrefix: "sg.h.\(w)\\.", seq: n,
                                       voucher: ["v1", "v2"][n % 2], user: String(repeating: "u\"", count: n % 90),
                                       qty: shares.count, region: "sg", host: "h", shares: ClaimShares(shares), tsMs: Int64(n / 3), toPool: UInt64(n))
                    sent.withLockedValue { $0[e.claimID] = e.kafkaValue }
                    pipeline.append(.claim(e))
                    n += 1
                    if n % 50 == 0 { usleep(1000) }
                }
            }
            t.start()
            return t
        }
        let until = ContinuousClock.now + .seconds(5)
        while ContinuousClock.now < until {
            pipeline.raiseFatalErrorForTesting()
            try await offThePool { pipeline.tick() }
            try await Task.sleep(for: .milliseconds(40))
        }
        stop.withLockedValue { $0 = true }
        while writers.contains(where: { !$0.isFinished }) { try await Task.sleep(for: .milliseconds(10)) }
        let deadline = ContinuousClock.now + .seconds(60)
        while ContinuousClock.now < deadline {
            try await offThePool { pipeline.tick() }
            let s = pipeline.stats
            if s.journalUnshipped == 0 && s.inFlight == 0 { break }
            try await Task.sleep(for: .milliseconds(100))
        }
        let s = pipeline.stats
        #expect(s.journalUnshipped == 0 && s.inFlight == 0, "unshipped \(s.journalUnshipped) in flight \(s.inFlight) recreations \(s.recreations)")
        let msgs = try await kafka.consume(fx.config.kafka.topic)
        var got: [String: [UInt8]] = [:]
        var wrong = 0
        for m in msgs {
            guard let o = try? JSONSerialization.jsonObject(with: Data(m.value)) as? [String: Any], let id = o["claim_id"] as? String else { continue }
            if let old = got[id], old != m.value { wrong += 1 }
            got[id] = m.value
        }
        let want = sent.withLockedValue { $0 }
        let missing = want.keys.filter { got[$0] == nil }
        let differ = want.filter { got[$0.key] != nil && got[$0.key] != $0.value }
        #expect(missing.isEmpty, "\(missing.count) of \(want.count) claims never reached Kafka (recreations \(s.recreations))")
        #expect(differ.isEmpty && wrong == 0, "\(differ.count) values differ")
        print("review: sent \(want.count) consumed \(msgs.count) recreations \(s.recreations)")
        try await offThePool { pipeline.close(flushTimeout: .seconds(2)) }
        withExtendedLifetime((kafka, fx)) {}
    }
}
