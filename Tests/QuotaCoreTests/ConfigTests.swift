import Foundation
import QuotaConfig
import QuotaCore
import Testing

@Suite("Configuration")
struct ConfigTests {
    let minimal = """
        host_id: host-a
        region: sg
        regions:
          sg: { redis: "unix:///tmp/t/redis.sock" }
        socket: { path: /tmp/t/quotad-a.sock }
        durability: none
        """

    func load(_ yaml: String, _ overrides: [(String, String)] = []) throws(ConfigError) -> SidecarConfig {
        try SidecarConfig.load(yaml: yaml, overrides: overrides, defaultHostID: "box")
    }

    func errorKey(_ yaml: String, _ overrides: [(String, String)] = []) -> String? {
        do {
            _ = try load(yaml, overrides)
            return nil
        } catch {
            return error.key
        }
    }

    @Test func minimalFileLoadsWithDocumentedDefaults() throws {
        let c = try load(minimal)
        #expect(c.hostID == "host-a" && c.region == "sg" && c.redisURL == "unix:///tmp/t/redis.sock")
        #expect(c.socket.path == "/tmp/t/quotad-a.sock" && c.socket.mode == 0o660)
        #expect(c.lease == LeasePolicy())
        #expect(c.limits.claimTimeout == .seconds(2))
        #expect(c.availRefresh == .seconds(1))
    }

    @Test func hostIDDefaultsToTheMachineName() throws {
        let c = try load(minimal.replacingOccurrences(of: "host_id: host-a\n", with: ""))
        #expect(c.hostID == "box")
    }

    @Test func unknownKeysAreRefusedByName() {
        #expect(errorKey(minimal + "\nbogus: 1") == "bogus")
        #expect(errorKey(minimal + "\nlease: { min: 5, maxx: 9 }") == "lease.maxx")
        #expect(errorKey(minimal.replacingOccurrences(of: "{ path:", with: "{ paht:")) == "socket.paht")
    }

    @Test func badValuesNameTheKey() {
        #expect(errorKey(minimal + "\nlease: { ttl: abc }") == "lease.ttl")
        #expect(errorKey(minimal + "\nlease: { min: 0 }") == "lease.min")
        #expect(errorKey(minimal + "\nlease: { min: 50, max: 10 }") == "lease.max")
        #expect(errorKey(minimal.replacingOccurrences(of: "durability: none", with: "durability: maybe")) == "durability")
        #expect(errorKey(minimal + "\nsocket_mode: 1") == "socket_mode")
        #expect(errorKey(minimal.replacingOccurrences(of: "region: sg", with: "region: id")) == "regions.id.redis")
        #expect(errorKey(minimal + "\nlimits: { max_qty: -3 }") == "limits.max_qty")
        #expect(errorKey("region: [1, 2]") == "region")
        #expect(errorKey("region: sg\nregions: { sg: { redis: localhost } }") == "regions.sg.redis")
        // Host ids go into Redis records, recall messages and claim ids: only the voucher id alphabet.
        for bad in ["\"a}b\"", "\"a|b\"", "\"a b\"", "\"a{b\"", "\"hôst\"", String(repeating: "h", count: 65)] {
            #expect(errorKey(minimal.replacingOccurrences(of: "host_id: host-a", with: "host_id: \(bad)")) == "host_id", "\(bad)")
        }
        // So do regions: a claim id (`region.host.boot.seq`) too long for UNCLAIM, or a region that breaks a record.
        for bad in ["\"a|b\"", "\"a b\"", "\"ré\"", String(repeating: "r", count: 65)] {
            let yaml = minimal.replacingOccurrences(of: "region: sg", with: "region: \(bad)")
                .replacingOccurrences(of: "  sg: {", with: "  \(bad): {")
            #expect(errorKey(yaml) == "region", "\(bad)")
        }
        let longest = String(repeating: "r", count: 64)
        #expect(errorKey(minimal.replacingOccurrences(of: "sg", with: longest)) == nil, "64 bytes is a region")
    }

    @Test func featuresNotBuiltYetAreRefusedNotIgnored() throws {
        #expect(errorKey(minimal + "\nper_user: { mode: sometimes }") == "per_user.mode")
        #expect(errorKey(minimal + "\nper_user: { on_unavailable: guess }") == "per_user.on_unavailable")
        #expect(errorKey(minimal + "\nborrow: maybe") == "borrow")
        #expect(errorKey(minimal + "\nborrow: true") == "borrow", "nothing to borrow from: one region")
        let two = minimal.replacingOccurrences(of: "  sg: { redis: \"unix:///tmp/t/redis.sock\" }",
                                               with: "  sg: { redis: \"unix:///tmp/t/redis.sock\" }\n  id: { redis: \"redis://h:2\" }")
        #expect(try load(two + "\nborrow: true").borrow)
        #expect(try !load(minimal).borrow)
    }

    @Test func contractMinimalFileWithJournalAndKafkaLoads() throws {
        let c = try load("""
            host_id: host-a
            region: sg
            regions:
              sg: { redis: "unix:///tmp/t/redis.sock" }
            socket: { path: /tmp/t/quotad-a.sock }
            durability: journal
            journal: { dir: /tmp/t/journal-a }
            kafka: { brokers: "127.0.0.1:9092", topic: quota.claims }
            """)
        #expect(c.durability == .journal && c.journal.dir == "/tmp/t/journal-a")
        #expect(c.kafka.brokers == "127.0.0.1:9092" && c.kafka.topic == "quota.claims")
    }

    @Test func durableModesNeedKafkaAndKnowTheirKeys() {
        let base = minimal.replacingOccurrences(of: "durability: none", with: "durability: kafka")
        #expect(errorKey(base) == "kafka.brokers")
        #expect(errorKey(base + "\nkafka: { brokers: b, bogus: 1 }") == "kafka.bogus")
        #expect(errorKey(base + "\nkafka: { brokers: b }\njournal: { dir: relative }") == "journal.dir")
        #expect(errorKey(base + "\nkafka: { brokers: b, properties: { linger.ms: [1] } }") == "kafka.properties.linger.ms")
        // journal is the default durability, and works without Kafka (claims stay in the journal).
        let journalOnly = try? load(minimal.replacingOccurrences(of: "durability: none", with: ""))
        #expect(journalOnly?.durability == .journal && journalOnly?.kafka.brokers == nil)
        #expect(errorKey(minimal + "\nredis: { require_durable: maybe }") == "redis.require_durable")
        #expect(errorKey(minimal + "\nredis: { bogus: 1 }") == "redis.bogus")
        #expect((try? load(minimal + "\nredis: { require_durable: false }"))?.requireDurableRedis == false)
        #expect((try? load(minimal))?.requireDurableRedis == true, "Redis must be durable unless the operator says otherwise")
    }

    @Test func flagOverridesWinOverTheFile() throws {
        let c = try load(minimal, [("lease.ttl", "4"), ("socket.path", "/tmp/x.sock"), ("host_id", "h2")])
        #expect(c.lease.ttl == .seconds(4) && c.socket.path == "/tmp/x.sock" && c.hostID == "h2")
        #expect(c.lease.safetyMargin == .seconds(1))
    }

    @Test func flagOverridesTakeFlowLists() throws {
        let c = try load(minimal, [("socket.allowed_uids", "[1000, 1001]")])
        #expect(c.socket.allowedUIDs == [1000, 1001])
        #expect(errorKey(minimal, [("socket.allowed_uids", "[x]")]) == "socket.allowed_uids")
    }

    @Test func socketModeIsOctal() throws {
        #expect(try load(minimal + "\n", [("socket.mode", "0600")]).socket.mode == 0o600)
        #expect(errorKey(minimal, [("socket.mode", "0999")]) == "socket.mode")
    }
}

@Suite("Shipped config files")
struct ShippedConfigTests {
    static let configDir = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("config")

    @Test(arguments: ["quotad.example.yaml", "quotad.full.yaml"])
    func shippedConfigLoads(_ name: String) throws {
        let text = try String(contentsOf: Self.configDir.appendingPathComponent(name), encoding: .utf8)
        let c = try SidecarConfig.load(yaml: text, defaultHostID: "box")
        #expect(c.region == "sg")
    }

    @Test func fullConfigDocumentsTheDefaults() throws {
        let text = try String(contentsOf: Self.configDir.appendingPathComponent("quotad.full.yaml"), encoding: .utf8)
        let c = try SidecarConfig.load(yaml: text, defaultHostID: "box")
        let d = try SidecarConfig.load(yaml: "region: sg\ndurability: none\nregions: { sg: { redis: \"redis://h:1\" } }", defaultHostID: "box")
        #expect(c.lease == d.lease)
        #expect(c.limits.maxWaitingClaims == d.limits.maxWaitingClaims && c.limits.claimTimeout == d.limits.claimTimeout)
        #expect(c.socket.mode == d.socket.mode && c.redisTimeout == d.redisTimeout && c.availRefresh == d.availRefresh)
        #expect(c.borrow == d.borrow)
    }
}
