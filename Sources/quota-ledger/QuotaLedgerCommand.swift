import ArgumentParser
import Foundation
import Logging
import Metrics
import NIOCore
import NIOPosix
import Prometheus
import QuotaConfig
import QuotaLedger
import QuotaMetricsHTTP

@main
struct QuotaLedgerCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "quota-ledger",
        abstract: "Write the claim stream (Kafka) into the ledger database: SQLite by default, or PostgreSQL.",
        discussion: """
            Uses the config file's kafka.brokers / kafka.topic and ledger.db. Batches are written with the
            offsets they reach in one transaction, so kill -9 at any moment loses and doubles nothing; a
            database or broker that is down is waited for, never skipped. Prometheus metrics on
            ledger.metrics_listen (quota_ledger_rows_total, quota_ledger_lag_messages, ...).
            """)

    @Option(name: .long, help: "quotad config file (kafka.*, ledger.*).") var config: String
    @Option(name: .long, help: "Override ledger.db.") var db: String?
    @Flag(name: .long, help: "Consume to the end of the topic and exit.") var once = false
    @Option(name: .long, help: "With --once: the topic counts as read to its end after this many idle seconds.")
    var idle: Double = 3
    @Flag(name: .long, help: "No progress lines.") var quiet = false

    func run() async throws {
        guard let text = try? String(contentsOfFile: config, encoding: .utf8) else {
            throw ValidationError("cannot read config file '\(config)'")
        }
        let cfg: SidecarConfig
        do {
            cfg = try SidecarConfig.load(yaml: text, overrides: db.map { [("ledger.db", $0)] } ?? [], defaultHostID: "quota-ledger")
        } catch {
            throw ValidationError("\(error)")
        }
        guard let brokers = cfg.kafka.brokers else {
            throw ValidationError("config key 'kafka.brokers': quota-ledger reads the claim stream from Kafka; set it")
        }
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = Logger.Level(rawValue: cfg.logLevel) ?? .info
            return h
        }
        let logger = Logger(label: "quota-ledger")
        let database: any LedgerDatabase
        do {
            database = try await openLedgerDatabase(url: cfg.ledger.db, logger: logger)
        } catch {
            throw ValidationError("\(error)")
        }
        var options = LedgerConsumer.Options(brokers: brokers, topic: cfg.kafka.topic)
        options.batch = cfg.ledger.batch
        if once { options.idleExit = .milliseconds(Int64(idle * 1000)) }
        let consumer = LedgerConsumer(ledger: Ledger(db: database), options: options, logger: logger)
        var metrics: (any Channel)?
        if let (host, port) = cfg.ledger.metricsListen {
            let registry = PrometheusCollectorRegistry()
            MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: registry))
            let stats = consumer.stats
            metrics = try await MetricsHTTPServer.serve(host: host, port: port, group: MultiThreadedEventLoopGroup.singleton) {
                Gauge(label: "quota_ledger_lag_messages").record(stats.currentLag)
                Gauge(label: "quota_ledger_rows_total").record(stats.rowsWritten)
                Gauge(label: "quota_ledger_messages_total").record(stats.messagesRead)
                Gauge(label: "quota_ledger_batches_total").record(stats.batchesWritten)
                Gauge(label: "quota_ledger_database_errors_total").record(stats.databaseErrors)
                return registry.emitToBuffer()
            }
        }
        logger.info("quota-ledger consuming", metadata: ["kafka.topic": "\(cfg.kafka.topic)", "db": "\(database.description)"])
        let start = ContinuousClock.now
        let progress = Task {
            var last = 0
            while !Task.isCancelled && !quiet {
                try? await Task.sleep(for: .seconds(5))
                let n = consumer.stats.rowsWritten
                logger.info("progress", metadata: ["rows": "\(n)", "rows_per_second": "\((n - last) / 5)",
                                                   "lag": "\(consumer.stats.currentLag)"])
                last = n
            }
        }
        try await consumer.run()
        progress.cancel()
        try? await metrics?.close()
        let secs = Double((ContinuousClock.now - start).components.seconds) + 0.001
        let counts = try await Ledger(db: database).counts()
        print("ledger: \(consumer.stats.messagesRead) messages read, \(consumer.stats.rowsWritten) rows written "
            + "in \(consumer.stats.batchesWritten) batches (\(Int(Double(consumer.stats.rowsWritten) / secs)) rows/s); "
            + "\(counts.claims) claims, \(counts.cancellations) cancellations in \(database.description)")
        await database.close()
    }
}
