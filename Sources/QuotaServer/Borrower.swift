import Foundation
import Glibc
import Logging
import NIOConcurrencyHelpers
import QuotaConfig
import QuotaCore
import QuotaKafka
import QuotaRedis
import Synchronization

/// Automatic borrowing between regions (`borrow: true`).
///
/// When this region's pool of a voucher is exhausted and no host holds stock that a recall could bring
/// back (the LEASE script's "sold out"), the sidecar moves unleased quota from another configured region
/// that still has some into this region's pool, with `quotactl rebalance`'s three idempotent steps and
/// transfer records (docs/accounting.md): take from the source (pool and allocation, record `taken`),
/// give to this region (record `in`), mark it done in the source. The amount is bounded: what the waiting
/// claims need, at least, and at most the lease policy's `max` (never more than the source's pool). The
/// allocations go to Kafka (`voucher_defined`, as `quotactl` writes them, so that rehydration rebuilds the
/// pools right) before the transfer is marked done.
///
/// A sidecar killed between steps leaves the transfer `taken` in its source: the next borrow of the
/// voucher by any sidecar of this region finishes every transfer toward this region first (steps are
/// once per transfer id), and so does `quotactl rebalance ID --resume`.
final class Borrower: Sendable {
    let config: SidecarConfig
    let home: QuotaStore
    let logger: Logger
    private let stores = NIOLockedValueBox<[String: QuotaStore]>([:])
    /// Tokens moved into this region, transfers made, borrow attempts that failed.
    let tokensBorrowed = Atomic<Int>(0)
    let transfers = Atomic<Int>(0)
    let failures = Atomic<Int>(0)

    init(config: SidecarConfig, home: QuotaStore, logger: Logger) {
        self.config = config
        self.home = home
        self.logger = logger
    }

    /// The other regions this host may borrow from (a region on the same Redis is the same pool).
    var sources: [(region: String, url: String)] {
        config.regions.filter { $0.key != config.region && $0.value != config.redisURL }.sorted { $0.key < $1.key }
            .map { ($0.key, $0.value) }
    }

    private func store(_ url: String) throws(RedisError) -> QuotaStore {
        if let s = stores.withLockedValue({ $0[url] }) { return s }
        let s = try QuotaStore(url: url, timeout: config.redisTimeout, logger: logger)
        stores.withLockedValue { $0[url] = $0[url] ?? s }
        return stores.withLockedValue { $0[url]! }
    }

    /// Move up to `amount` tokens of `voucher` (at least `need` if a source has them) into this region's
    /// pool from the first source region whose pool has any. `generation`: this region's generation of the
    /// voucher. Returns the tokens moved in (0: none could be; the caller answers what Redis said).
    func borrow(voucher: String, need: Int, amount: Int, generation: String) async -> Int {
        var moved = 0
        for (region, url) in sources {
            do {
                let src = try store(url)
                // Transfers toward this region left in flight (a sidecar or quotactl killed between steps).
                for t in try await src.transfers(voucher: voucher)
                where t.direction == .out && t.state == .taken && t.peer == config.region {
                    moved += try await finish(t, voucher: voucher, from: region, src: src, generation: generation)
                }
                if moved >= max(1, need) { return moved }
                guard let rec = try await src.voucher(voucher), rec.status == .active else { continue }
                // A sharded source lends from its shard 0 (transfers move quota in and out of the voucher's key).
                let pool = rec.shardPools.first ?? rec.pool
                let n = min(amount - moved, pool)
                guard n > 0 else { continue }
                let id = "b-\(config.hostID.prefix(24))-" + String(UInt64.random(in: 0...UInt64.max) & 0xFFFF_FFFF_FFFF, radix: 36)
                let taken = try await src.takeTransfer(voucher: voucher, id: id, to: config.region, amount: n,
                                                       gen: rec.generation, toGeneration: generation)
                guard case .applied(let t) = taken else { continue }  // the pool shrank meanwhile: the next source
                try await allocationsToLedger(voucher: voucher, [(region, src)])
                failpoint("borrow-after-take")
                moved += try await finish(t, voucher: voucher, from: region, src: src, generation: generation)
                logger.info("borrowed quota", metadata: ["quota.voucher": "\(voucher)", "from": "\(region)", "tokens": "\(n)",
                                                         "transfer": "\(id)"])
                if moved >= max(1, need) { return moved }
            } catch {
                failures.add(1, ordering: .relaxed)
                logger.warning("borrow failed", metadata: ["quota.voucher": "\(voucher)", "from": "\(region)",
                                                           "error": "\(error)"])
            }
        }
        return moved
    }

    /// Steps 2 and 3 of a transfer toward this region. Returns the tokens it added here now (0 if given before).
    private func finish(_ t: TransferRecord, voucher: String, from: String, src: QuotaStore, generation: String)
        async throws -> Int
    {
        guard t.peerGeneration.isEmpty || t.peerGeneration == generation else {
            throw RedisError.generation("transfer \(t.id) was taken for generation \(t.peerGeneration) of '\(voucher)' here, "
                                        + "this host knows \(generation): left in flight")
        }
        guard let srcRec = try await src.voucher(voucher) else {
            throw RedisError.badReply("transfer \(t.id): '\(voucher)' is gone from \(from)")
        }
        let given = try await home.giveTransfer(voucher: voucher, id: t.id, from: from, amount: t.amount, gen: generation)
        let added: Int
        switch given {
        case .applied: added = t.amount
        case .already(let r) where r.direction == .in && r.peer == from && r.amount == t.amount: added = 0
        default: throw RedisError.badReply("transfer \(t.id): this region answered \(given)")
        }
        failpoint("borrow-after-give")
        try await allocationsToLedger(voucher: voucher, [(from, src), (config.region, home)])
        _ = try await src.finishTransfer(voucher: voucher, id: t.id, gen: srcRec.generation)
        if added > 0 {
            tokensBorrowed.add(added, ordering: .relaxed)
            transfers.add(1, ordering: .relaxed)
        }
        return added
    }

    /// The regions' allocations of `voucher` on Kafka, as `quotactl` writes them (no Kafka configured:
    /// nothing to write). Throws when Kafka did not acknowledge them: the transfer is then not marked done.
    private func allocationsToLedger(voucher: String, _ regions: [(String, QuotaStore)]) async throws {
        guard let brokers = config.kafka.brokers else { return }
        var defs: [(key: String, value: [UInt8])] = []
        let now = Int64(Date().timeIntervalSince1970 * 1000)
        for (region, s) in regions {
            guard let rec = try await s.voucher(voucher) else { throw RedisError.badReply("'\(voucher)' is gone from \(region)") }
            defs.append((voucher, VoucherDefinition(voucher: voucher, region: region, limit: rec.limit, totalLimit: rec.totalLimit,
                                                    perUser: rec.perUser, state: rec.status.rawValue, generation: rec.generation,
                                                    tsMs: now).kafkaValue))
        }
        let topic = config.kafka.topic
        let logger = self.logger
        let events = defs
        // librdkafka blocks while it flushes: on a thread of its own, not the concurrency pool's.
        try await withCheckedThrowingContinuation { (k: CheckedContinuation<Void, any Error>) in
            Thread.detachNewThread {
                do {
                    _ = try KafkaProducer.produceAll(brokers: brokers, topic: topic, events, logger: logger, timeout: .seconds(10))
                    k.resume()
                } catch {
                    k.resume(throwing: error)
                }
            }
        }
    }

    /// Test failpoint: `QUOTAD_FAILPOINT=name` kills this process (SIGKILL) right here.
    private func failpoint(_ name: String) {
        guard ProcessInfo.processInfo.environment["QUOTAD_FAILPOINT"] == name else { return }
        logger.critical("failpoint \(name): SIGKILL")
        kill(getpid(), SIGKILL)
    }
}
