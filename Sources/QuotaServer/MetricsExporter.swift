import CoreMetrics
import Logging
import Metrics
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import QuotaMetricsHTTP
import Prometheus
import QuotaCore

/// Metric names, defined once. Label values are bounded: `result` takes the error codes, `event`
/// four lease events, `voucher` at most `maxVoucherLabels` voucher ids (the rest as `_other`).
enum MetricName {
    static let claims = "quota_claims_total"  // {result}
    static let claimDuration = "quota_claim_duration_seconds"  // histogram
    static let leases = "quota_lease_events_total"  // {event=taken|renewed|returned|fenced}
    static let tokensLeased = "quota_tokens_leased_total"
    static let tokensReturned = "quota_tokens_returned_total"
    static let tokensLocal = "quota_tokens_local"  // {voucher}
    static let leaseSize = "quota_lease_size_tokens"  // {voucher}
    static let redisCommands = "quota_redis_commands_total"
    static let redisErrors = "quota_redis_errors_total"
    static let journalBacklog = "quota_journal_backlog_bytes"
    static let journalHealthy = "quota_journal_healthy"
    static let kafkaBacklog = "quota_kafka_backlog_messages"
    static let kafkaDown = "quota_kafka_down"
    static let connections = "quota_connections"
    static let maxVoucherLabels = 100
}

/// Prometheus metrics over swift-metrics: counters and gauges are brought up to date from the
/// engine's own counters at every scrape (nothing on the hot path but the claim-duration timer).
final class MetricsExporter: Sendable {
    let registry = PrometheusCollectorRegistry()
    let claimTimer: Timer
    private let engine: SidecarEngine
    private let last = NIOLockedValueBox<[String: Int]>([:])

    init(engine: SidecarEngine) {
        self.engine = engine
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.defaultDurationHistogramBuckets = [
            .microseconds(10), .microseconds(50), .microseconds(100), .microseconds(250), .microseconds(500),
            .milliseconds(1), .milliseconds(2), .milliseconds(5), .milliseconds(10), .milliseconds(25),
            .milliseconds(50), .milliseconds(100), .milliseconds(250), .milliseconds(500), .seconds(1), .seconds(2),
        ]
        MetricsSystem.bootstrap(factory)
        claimTimer = Timer(label: MetricName.claimDuration)
        // Every series exists from the start (0), so rates and alerts do not see gaps.
        for code in QuotaErrorCode.allCases { _ = Counter(label: MetricName.claims, dimensions: [("result", code.rawValue)]) }
        _ = Counter(label: MetricName.claims, dimensions: [("result", "ok")])
        for e in ["taken", "renewed", "returned", "fenced"] { _ = Counter(label: MetricName.leases, dimensions: [("event", e)]) }
        for name in [MetricName.tokensLeased, MetricName.tokensReturned, MetricName.redisCommands, MetricName.redisErrors] {
            _ = Counter(label: name)
        }
    }

    /// Bring every counter and gauge up to date; returns the exposition text.
    func scrape() -> [UInt8] {
        let s = engine.statistics()
        func counter(_ name: String, _ dims: [(String, String)], _ value: Int) {
            let key = name + dims.map { "|\($0.0)=\($0.1)" }.joined()
            let delta = last.withLockedValue { m -> Int in
                defer { m[key] = max(value, m[key] ?? 0) }
                return value - (m[key] ?? 0)
            }
            if delta > 0 { Counter(label: name, dimensions: dims).increment(by: Int64(delta)) }
        }
        for code in QuotaErrorCode.allCases {
            counter(MetricName.claims, [("result", code.rawValue)], s.totals.rejected[code, default: 0])
        }
        counter(MetricName.claims, [("result", "ok")], s.totals.claimsOK)
        counter(MetricName.leases, [("event", "taken")], s.totals.leasesTaken)
        counter(MetricName.leases, [("event", "renewed")], s.totals.leasesRenewed)
        counter(MetricName.leases, [("event", "returned")], s.totals.leasesReturned)
        counter(MetricName.leases, [("event", "fenced")], s.totals.leasesFenced)
        counter(MetricName.tokensLeased, [], s.totals.tokensLeased)
        counter(MetricName.tokensReturned, [], s.totals.tokensReturned)
        counter(MetricName.redisCommands, [], s.redisCommands)
        counter(MetricName.redisErrors, [], s.redisErrors)
        var otherLocal = 0
        for (i, v) in s.vouchers.enumerated() {
            if i < MetricName.maxVoucherLabels {
                Gauge(label: MetricName.tokensLocal, dimensions: [("voucher", v.id)]).record(v.local)
                Gauge(label: MetricName.leaseSize, dimensions: [("voucher", v.id)]).record(v.leaseSize)
            } else {
                otherLocal += v.local
            }
        }
        if s.vouchers.count > MetricName.maxVoucherLabels {
            Gauge(label: MetricName.tokensLocal, dimensions: [("voucher", "_other")]).record(otherLocal)
        }
        Gauge(label: MetricName.journalBacklog).record(s.pipeline.journalBacklogBytes)
        Gauge(label: MetricName.journalHealthy).record(s.journalHealthy ? 1 : 0)
        Gauge(label: MetricName.kafkaBacklog).record(s.pipeline.inFlight)
        Gauge(label: MetricName.kafkaDown).record(s.kafkaDown ? 1 : 0)
        Gauge(label: MetricName.connections).record(s.connections)
        return registry.emitToBuffer()
    }

    /// Serve `GET /metrics` on `host:port` (HTTP/1.1). Returns the bound channel.
    func serve(host: String, port: Int, group: any EventLoopGroup) async throws -> any Channel {
        try await MetricsHTTPServer.serve(host: host, port: port, group: group) { [self] in scrape() }
    }
}
