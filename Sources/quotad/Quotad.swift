import ArgumentParser
import Foundation
import Logging
import QuotaConfig
import QuotaServer
import ServiceLifecycle

@main
struct Quotad: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "quotad",
        abstract: "Per-host quota sidecar: leases voucher tokens from Redis, serves claims over a Unix socket (RESP).",
        discussion: """
            Flags override keys of the config file. Any key can be overridden with --set KEY=VALUE
            (dotted path, e.g. --set lease.ttl=5). Stops gracefully on SIGTERM/SIGINT: stops accepting,
            answers what is in flight, returns every unused token.
            """)

    @Option(name: .long, help: "YAML config file.")
    var config: String?

    @Option(name: .long, help: "Override host_id.") var hostId: String?
    @Option(name: .long, help: "Override region.") var region: String?
    @Option(name: .long, help: "Redis URL of this host's region (regions.<region>.redis).") var redis: String?
    @Option(name: .long, help: "Override socket.path.") var socket: String?
    @Option(name: .long, help: "Override durability (journal|kafka|none).") var durability: String?
    @Option(name: .long, help: "Override log_level.") var logLevel: String?
    @Option(name: .long, parsing: .singleValue, help: "Override any key: --set lease.ttl=5 (repeatable).")
    var set: [String] = []

    @Flag(name: .long, help: "Validate the configuration, print it, and exit.")
    var checkConfig = false

    func run() async throws {
        var yaml = ""
        if let config {
            guard let text = try? String(contentsOfFile: config, encoding: .utf8) else {
                throw ValidationError("cannot read config file '\(config)'")
            }
            yaml = text
        }
        var overrides: [(String, String)] = []
        for s in set {
            guard let eq = s.firstIndex(of: "=") else { throw ValidationError("--set needs KEY=VALUE, got '\(s)'") }
            overrides.append((String(s[..<eq]), String(s[s.index(after: eq)...])))
        }
        if let hostId { overrides.append(("host_id", hostId)) }
        if let region { overrides.append(("region", region)) }
        if let socket { overrides.append(("socket.path", socket)) }
        if let durability { overrides.append(("durability", durability)) }
        if let logLevel { overrides.append(("log_level", logLevel)) }
        if let redis {
            let r = region ?? Self.regionName(yaml: yaml) ?? "default"
            if region == nil && Self.regionName(yaml: yaml) == nil { overrides.append(("region", r)) }
            overrides.append(("regions.\(r).redis", redis))
        }
        let cfg: SidecarConfig
        do {
            cfg = try SidecarConfig.load(
                yaml: yaml, overrides: overrides, defaultHostID: ProcessInfo.processInfo.hostName)
        } catch {
            throw ValidationError("\(error)")
        }
        if checkConfig {
            print("config ok: host_id=\(cfg.hostID) region=\(cfg.region) redis=\(cfg.redisURL) socket=\(cfg.socket.path)")
            return
        }
        let level = Logger.Level(rawValue: cfg.logLevel) ?? .info
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = level
            return h
        }
        let logger = Logger(label: "quotad")
        do {
            let service = try SidecarService(config: cfg, logger: logger)
            let group = ServiceGroup(
                configuration: .init(
                    services: [.init(service: service, successTerminationBehavior: .gracefullyShutdownGroup)],
                    gracefulShutdownSignals: [.sigterm, .sigint],
                    logger: logger))
            try await group.run()
        } catch {
            // Not through ArgumentParser's error exit: it renders the command's usage first, and that crashed now and
            // then ("attempted to read an unowned reference but object was already destroyed", inside argument-parser's
            // help generator) when a start was refused (journal.dir in use) while the service's threads wound down.
            let text = (error as? any LocalizedError)?.errorDescription ?? String(describing: error)
            FileHandle.standardError.write(Data("Error: \(text)\n".utf8))
            Foundation.exit(1)
        }
    }

    /// The `region:` of a config file, if set (so `--redis` alone names the right region).
    static func regionName(yaml: String) -> String? {
        guard let root = try? ConfigNode.parse(yaml: yaml), case .map(let m) = root,
            case .scalar(let r)? = m.first(where: { $0.0 == "region" })?.1
        else { return nil }
        return r
    }
}
