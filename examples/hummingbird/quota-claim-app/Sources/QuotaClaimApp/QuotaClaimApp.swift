import Foundation
import Hummingbird
import Logging
import QuotaClient

/// An HTTP front for the host's quotad: `POST /claim/{voucher}` claims through ``QuotaClient`` (pooled
/// connections, one request id per claim, safe retries) and answers with an HTTP status per outcome.
@main
struct QuotaClaimApp {
    static func main() async throws {
        let settings: Settings
        do {
            settings = try Settings(arguments: Array(CommandLine.arguments.dropFirst()),
                                    environment: ProcessInfo.processInfo.environment)
        } catch {
            FileHandle.standardError.write(Data("quota-claim-app: \(error)\n\n\(Settings.usage)\n".utf8))
            exit(2)
        }
        var logger = Logger(label: "quota-claim-app")
        logger.logLevel = settings.logLevel

        let quota = QuotaClient(
            configuration: .init(socketPath: settings.socket, poolSize: settings.poolSize,
                                 retry: .init(deadline: settings.claimDeadline), password: settings.password),
            logger: logger)
        let app = Application(
            router: ClaimRoutes(quota: quota, logger: logger).router(),
            configuration: .init(address: .hostname(settings.host, port: settings.port), serverName: "quota-claim-app"),
            logger: logger)
        logger.info("claiming through quotad", metadata: ["socket": "\(settings.socket)"])
        // Runs until SIGTERM or SIGINT, then finishes the requests in flight.
        try await app.runService()
        await quota.close()
    }
}

/// The app's settings: flags first, then environment variables, then defaults.
struct Settings {
    var socket = "/run/quotad/quotad.sock"
    var host = "127.0.0.1"
    var port = 8080
    var poolSize = 8
    var claimDeadline: Duration = .seconds(2)
    var password: String?
    var logLevel: Logger.Level = .info

    static let usage = """
        usage: QuotaClaimApp [--socket PATH] [--host HOST] [--port N] [--pool N] [--deadline-ms N] [--log-level L]
          --socket PATH     quotad's Unix socket (QUOTAD_SOCKET; default /run/quotad/quotad.sock)
          --host HOST       address to listen on (HOST; default 127.0.0.1)
          --port N          port to listen on (PORT; default 8080)
          --pool N          connections to quotad (QUOTA_POOL_SIZE; default 8)
          --deadline-ms N   longest one claim may retry before 503 (QUOTA_DEADLINE_MS; default 2000)
          --log-level L     trace, debug, info, notice, warning, error (LOG_LEVEL; default info)
          QUOTAD_PASSWORD   quotad's socket.password, when it has one
        """

    struct Invalid: Error, CustomStringConvertible {
        var description: String
    }

    init(arguments: [String], environment: [String: String]) throws {
        var values: [String: String] = [:]
        let env = ["socket": "QUOTAD_SOCKET", "host": "HOST", "port": "PORT", "pool": "QUOTA_POOL_SIZE",
                   "deadline-ms": "QUOTA_DEADLINE_MS", "log-level": "LOG_LEVEL"]
        for (key, variable) in env { values[key] = environment[variable] }
        var i = 0
        while i < arguments.count {
            let flag = arguments[i]
            guard flag.hasPrefix("--"), env[String(flag.dropFirst(2))] != nil else { throw Invalid(description: "unknown option '\(flag)'") }
            guard i + 1 < arguments.count else { throw Invalid(description: "\(flag) needs a value") }
            values[String(flag.dropFirst(2))] = arguments[i + 1]
            i += 2
        }
        func int(_ key: String, _ range: ClosedRange<Int>) throws -> Int? {
            guard let v = values[key] else { return nil }
            guard let n = Int(v), range.contains(n) else { throw Invalid(description: "--\(key) must be \(range), got '\(v)'") }
            return n
        }
        if let v = values["socket"] { socket = v }
        if let v = values["host"] { host = v }
        if let n = try int("port", 0...65535) { port = n }
        if let n = try int("pool", 1...1024) { poolSize = n }
        if let n = try int("deadline-ms", 1...600_000) { claimDeadline = .milliseconds(n) }
        if let v = values["log-level"] {
            guard let level = Logger.Level(rawValue: v) else { throw Invalid(description: "--log-level: unknown level '\(v)'") }
            logLevel = level
        }
        password = environment["QUOTAD_PASSWORD"]
    }
}
