import Foundation
import QuotaClient
import QuotaHarness
import QuotaRESP
import Testing

@Suite("quota-bench and the metrics endpoint", .serialized, .timeLimit(.minutes(5)))
struct BenchAndMetricsTests {
    @Test func benchRunsAllThreeDesignsOnATinyWorkloadAndEachSellsExactlyTheLimit() async throws {
        let dir = TempDir()
        let chart = dir.file("chart.svg")
        let p = try ChildProcess(Bin.path("quota-bench"), [
            "compare", "--limit", "300", "--users", "400", "--per-user", "2", "--connections", "6", "--pipeline", "4",
            "--duration", "60", "--quiet", "--json", "--chart", chart,
        ], log: dir.file("out"))
        #expect(try await p.wait(timeout: .seconds(240)) == 0, "\(p.output)")
        let out = p.output
        let start = try #require(out.firstIndex(of: "["), "\(out)")
        let rows = try #require(try JSONSerialization.jsonObject(with: Data(out[start...].utf8)) as? [[String: Any]])
        #expect(rows.map { $0["design"] as? String } == ["quotad", "redis-lua", "postgres"])
        for r in rows {
            let name = r["design"] as? String ?? "?"
            #expect(r["sold"] as? Int == 300, "\(name) sold exactly the limit (clients)")
            #expect(r["soldInStore"] as? Int == 300, "\(name) sold exactly the limit (store)")
            #expect(r["oversell"] as? Int == 0, "\(name)")
            #expect((r["maxPerUser"] as? Int ?? 99) <= 2, "\(name) per-user limit held")
            #expect((r["claimsPerSecond"] as? Double ?? 0) > 0)
            let p50 = r["p50us"] as? Int ?? -1, p99 = r["p99us"] as? Int ?? -1, p999 = r["p999us"] as? Int ?? -1
            #expect(p50 > 0 && p50 <= p99 && p99 <= p999, "\(name) percentiles \(p50) \(p99) \(p999)")
        }
        #expect((rows[1]["redisCommandsPerClaim"] as? Double ?? 0) >= 1, "the Lua design is a round trip per claim")
        #expect((rows[2]["redisCommandsPerClaim"] as? Double ?? 1) == 0)
        let svg = try String(contentsOfFile: chart, encoding: .utf8)
        #expect(svg.hasPrefix("<svg") && svg.contains("quotad") && svg.contains("postgres") && svg.contains("p99"))

        // The human table has the same rows and the ratio lines.
        let t = try ChildProcess(Bin.path("quota-bench"), [
            "compare", "--limit", "100", "--connections", "4", "--pipeline", "2", "--quiet", "--design", "quotad",
            "--design", "redis-lua",
        ], log: dir.file("table"))
        #expect(try await t.wait(timeout: .seconds(120)) == 0)
        #expect(t.output.contains("| design | claims/s | p50 | p99 | p999 |"))
        #expect(t.output.contains("| quotad |") && t.output.contains("quotad / redis-lua:"))
    }

    @Test func scaleScenarioLeavesNoStrandedTokensAndBalancedBooks() async throws {
        let dir = TempDir()
        let p = try ChildProcess(Bin.path("quota-bench"), [
            "scale", "--sidecars", "1,2", "--duration", "3", "--connections", "8", "--pipeline", "4", "--json", "--quiet",
        ], log: dir.file("out"))
        #expect(try await p.wait(timeout: .seconds(120)) == 0, "\(p.output)")
        let out = p.output
        let start = try #require(out.firstIndex(of: "["), "\(out)")
        let steps = try #require(try JSONSerialization.jsonObject(with: Data(out[start...].utf8)) as? [[String: Any]])
        #expect(steps.map { $0["sidecars"] as? Int } == [1, 2])
        for s in steps {
            #expect(s["strandedTokens"] as? Int == 0)
            #expect(s["booksBalance"] as? Bool == true)
            #expect((s["claimsPerSecond"] as? Double ?? 0) > 0)
            // A design that asks Redis per claim needs >= 1,000; the lease design needs a fraction, even in a
            // 3 s debug run on a loaded CI machine (1 s was once too few claims under load), where few claims carry the refreshes' fixed cost (the
            // release figures are in the README: ~0.5 per 1,000).
            #expect((s["redisCommandsPer1000Claims"] as? Double ?? 1000) < 1000, "under one command per claim")
        }
    }

    @Test func metricsEndpointIsScrapedWithDocumentedNamesAndLabels() async throws {
        let redis = try await RedisServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "mx", limit: 5, perUser: 0, totalLimit: 5, region: "sg")
        let port = try freePort()
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a", extraYAML: "metrics: { listen: \"127.0.0.1:\(port)\" }\n")
        let c = try await RESPClient.connect(q.socket)
        for i in 0..<8 { _ = try await c.send("CLAIM", "mx", "u\(i)") }
        _ = try await c.send("CLAIM", "nosuch", "u")
        let (status, body) = try httpGet(port: port, path: "/metrics")
        #expect(status == 200)
        func value(_ series: String) -> Double? {
            body.split(separator: "\n").first { $0.hasPrefix(series + " ") }.flatMap { Double($0.split(separator: " ").last!) }
        }
        #expect(value("quota_claims_total{result=\"ok\"}") == 5)
        #expect(value("quota_claims_total{result=\"soldout\"}") == 3)
        #expect(value("quota_claims_total{result=\"novoucher\"}") == 1)
        #expect(value("quota_claims_total{result=\"userlimit\"}") == 0, "every result series exists from the start")
        #expect(value("quota_claim_duration_seconds_count") == 9)
        #expect((value("quota_lease_events_total{event=\"taken\"}") ?? 0) >= 1)
        #expect(value("quota_tokens_local{voucher=\"mx\"}") == 0)
        #expect((value("quota_redis_commands_total") ?? 0) > 0)
        for name in ["quota_journal_backlog_bytes", "quota_kafka_backlog_messages", "quota_lease_size_tokens{voucher=\"mx\"}",
                     "quota_tokens_leased_total", "quota_connections"] {
            #expect(value(name) != nil, "\(name) exported")
        }
        let (notFound, _) = try httpGet(port: port, path: "/nope")
        #expect(notFound == 404)
        // INFO carries the same counters.
        let okInfo = try await q.stat("claims_ok")
        let soldoutInfo = try await q.stat("claims_soldout")
        #expect(okInfo == 5 && soldoutInfo == 3)
        c.close()
        #expect(try await q.stop() == 0)
    }
}
