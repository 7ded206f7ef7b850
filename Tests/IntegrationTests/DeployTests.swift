import Foundation
import QuotaClient
import QuotaHarness
import Testing

/// `deploy/`: each file checked by the tool that reads it (promtool, systemd-analyze, systemd-sysusers,
/// systemd-tmpfiles, quotad --check-config), and every metric the alerts and the dashboard query is one
/// a running quotad exports.
/// `name`'s path on PATH (or the sbin directories, where Debian puts some tools), or nil.
func which(_ name: String) -> String? {
    let dirs = (ProcessInfo.processInfo.environment["PATH"] ?? "").split(separator: ":").map(String.init)
        + ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
    return dirs.map { $0 + "/" + name }.first { FileManager.default.isExecutableFile(atPath: $0) }
}

@Suite("deploy/: systemd, Kubernetes, Prometheus, Grafana", .serialized, .timeLimit(.minutes(3)))
struct DeployTests {
    static func file(_ rel: String) -> String { Clients.path("deploy/" + rel) }

    static func read(_ rel: String) throws -> String { try String(contentsOfFile: file(rel), encoding: .utf8) }

    /// Run `exe args`; (status, stdout+stderr).
    static func tool(_ exe: String, _ args: [String]) async throws -> (Int32, String) {
        guard let path = which(exe) else {
            throw TestError.failed("\(exe) is missing: run scripts/install-deps.sh (it installs the deploy checkers)")
        }
        return try await Clients.run(path, args)
    }

    @Test func alertingRulesPassPromtool() async throws {
        let (st, out) = try await Self.tool("promtool", ["check", "rules", Self.file("prometheus/quotad-alerts.yml")])
        #expect(st == 0 && out.contains("SUCCESS"), "\(out)")
        // promtool is a real check: a broken expression fails it.
        let dir = TempDir()
        let bad = try Self.read("prometheus/quotad-alerts.yml").replacingOccurrences(of: "== 1", with: "== == 1")
        try bad.write(toFile: dir.file("bad.yml"), atomically: true, encoding: .utf8)
        let (badSt, _) = try await Self.tool("promtool", ["check", "rules", dir.file("bad.yml")])
        #expect(badSt != 0)
    }

    @Test func systemdUnitVerifiesAndSysusersAndTmpfilesCreateTheUserAndDirectories() async throws {
        let dir = TempDir()
        // systemd-analyze checks that ExecStart exists: point it at the quotad under test.
        let unit = try Self.read("systemd/quotad.service")
            .replacingOccurrences(of: "/usr/local/bin/quotad", with: Bin.path("quotad"))
            .replacingOccurrences(of: "/usr/bin/redis-cli", with: which("redis-cli") ?? "/usr/bin/redis-cli")
        try unit.write(toFile: dir.file("quotad.service"), atomically: true, encoding: .utf8)
        let (st, out) = try await Self.tool("systemd-analyze", ["verify", dir.file("quotad.service")])
        #expect(st == 0 && out.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty, "\(out)")
        let shipped = try Self.read("systemd/quotad.service")
        for key in ["ExecStop=-/usr/bin/redis-cli -s /run/quotad/quotad.sock DRAIN", "Restart=on-failure", "User=quotad",
                    "TimeoutStopSec=40",
                    "Environment=SWIFT_BACKTRACE=enable=yes,swift-backtrace=/usr/local/libexec/quotad/swift-backtrace-static"] {
            #expect(shipped.contains(key), "\(key)")
        }
        let root = dir.file("root")
        try FileManager.default.createDirectory(atPath: root + "/etc", withIntermediateDirectories: true)
        let (su, suOut) = try await Self.tool("systemd-sysusers", ["--root=\(root)", Self.file("systemd/quotad.sysusers.conf")])
        #expect(su == 0, "\(suOut)")
        #expect(try String(contentsOfFile: root + "/etc/passwd", encoding: .utf8).contains("quotad:"))
        let (tf, tfOut) = try await Self.tool("systemd-tmpfiles", ["--root=\(root)", "--create", Self.file("systemd/quotad.tmpfiles.conf")])
        #expect(tf == 0, "\(tfOut)")
        for d in ["/run/quotad", "/var/lib/quotad/journal"] {
            var isDir: ObjCBool = false
            #expect(FileManager.default.fileExists(atPath: root + d, isDirectory: &isDir) && isDir.boolValue, "\(d)")
        }
    }

    /// The manifest as JSON objects (Ruby's YAML reader: multi-document files).
    static func yamlDocuments(_ rel: String) async throws -> [[String: Any]] {
        let (st, out) = try await tool("ruby", ["-ryaml", "-rjson", "-e",
                                                "puts JSON.generate(YAML.load_stream(File.read(ARGV[0])).compact)", file(rel)])
        guard st == 0, let data = out.data(using: .utf8),
            let docs = try JSONSerialization.jsonObject(with: data) as? [[String: Any]]
        else { throw TestError.failed("not YAML: \(out)") }
        return docs
    }

    @Test func daemonSetSharesTheSocketDrainsBeforeStopAndItsConfigIsValid() async throws {
        let docs = try await Self.yamlDocuments("kubernetes/quotad-daemonset.yaml")
        let ds = try #require(docs.first { $0["kind"] as? String == "DaemonSet" })
        let cm = try #require(docs.first { $0["kind"] as? String == "ConfigMap" })
        let spec = try #require(((ds["spec"] as? [String: Any])?["template"] as? [String: Any])?["spec"] as? [String: Any])
        let grace = spec["terminationGracePeriodSeconds"] as? Int ?? 30
        #expect(grace > 20, "above the drain bound (10 s) plus the Kafka flush bound (10 s)")
        let c = try #require((spec["containers"] as? [[String: Any]])?.first)
        func command(_ path: [String]) -> [String] {
            var v: Any? = c
            for k in path { v = (v as? [String: Any])?[k] }
            return v as? [String] ?? []
        }
        #expect(command(["lifecycle", "preStop", "exec", "command"]).last == "DRAIN")
        #expect(command(["readinessProbe", "exec", "command"]).last == "PING")
        let volumes = spec["volumes"] as? [[String: Any]] ?? []
        let socketDir = volumes.compactMap { ($0["hostPath"] as? [String: Any])?["path"] as? String }
        #expect(socketDir.contains("/run/quotad"), "the socket directory is a hostPath app pods mount too")
        // The ConfigMap's quotad.yaml is one quotad accepts.
        let yaml = try #require((cm["data"] as? [String: Any])?["quotad.yaml"] as? String)
        let dir = TempDir()
        try yaml.write(toFile: dir.file("quotad.yaml"), atomically: true, encoding: .utf8)
        let (st, out) = try await Clients.run(Bin.path("quotad"), ["--config", dir.file("quotad.yaml"), "--check-config",
                                                                   "--set", "host_id=node-1"])
        #expect(st == 0, "\(out)")
    }

    @Test func everyMetricTheAlertsAndTheDashboardQueryIsExported() async throws {
        let dashboard = try Self.read("grafana/quotad-dashboard.json")
        let json = try #require(try JSONSerialization.jsonObject(with: Data(dashboard.utf8)) as? [String: Any])
        let panels = json["panels"] as? [[String: Any]] ?? []
        #expect(panels.count >= 6)
        let exprs = panels.flatMap { ($0["targets"] as? [[String: Any]] ?? []).compactMap { $0["expr"] as? String } }
        #expect(exprs.count >= panels.count - 1, "panels query something")
        let rules = try Self.read("prometheus/quotad-alerts.yml")
        var names = Set<String>()
        let re = try NSRegularExpression(pattern: "quota_[a-z_]+")
        for text in exprs + [rules] {
            for m in re.matches(in: text, range: NSRange(text.startIndex..., in: text)) {
                names.insert(String(text[Range(m.range, in: text)!]))
            }
        }
        #expect(names.count >= 8, "\(names)")

        let redis = try await RedisServer()
        let dir = TempDir()
        _ = try await redis.store.createVoucher(id: "dx", limit: 5, perUser: 0, totalLimit: 5, region: "sg")
        let port = try freePort()
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a", extraYAML: "metrics: { listen: \"127.0.0.1:\(port)\" }\n")
        let c = try await RESPClient.connect(q.socket)
        for i in 0..<3 { _ = try await c.send("CLAIM", "dx", "u\(i)") }
        let (status, body) = try httpGet(port: port, path: "/metrics")
        #expect(status == 200)
        let exported = Set(body.split(separator: "\n").compactMap { line -> String? in
            guard line.hasPrefix("# TYPE ") else { return nil }
            return line.split(separator: " ").dropFirst(2).first.map(String.init)
        })
        for name in names.sorted() {
            let base = ["_bucket", "_count", "_sum"].reduce(name) { n, s in n.hasSuffix(s) ? String(n.dropLast(s.count)) : n }
            #expect(exported.contains(base), "\(name) is queried but quotad does not export it")
        }
        // Label values the queries select on (e.g. result="unavailable") are ones quotad writes.
        let labelled = try NSRegularExpression(pattern: #"(quota_[a-z_]+)\{([a-z_]+)="([^"]+)""#)
        for text in exprs + [rules] {
            for m in labelled.matches(in: text, range: NSRange(text.startIndex..., in: text)) {
                let part = { (i: Int) in String(text[Range(m.range(at: i), in: text)!]) }
                let series = "\(part(1)){\(part(2))=\"\(part(3))\""
                #expect(body.contains(series), "\(series) is queried but never exported")
            }
        }
        c.close()
        #expect(try await q.stop() == 0)
        withExtendedLifetime((redis, dir)) {}
    }
}
