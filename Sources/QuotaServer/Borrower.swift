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
        let kept = stores.withLockedValue { m in
            if let other = m[url] { return other }
            m[url] = s
            return s
        }
        if kept !== s { s.connection.close() }  // another borrow made one first
        return kept
    }

    /// What a borrow came to.
    enum Outcome: Equatable {
        /// Tokens reached this region's pool (or were there already): ask Redis again now.
        case moved(Int)
        /// Some source could not be asked, or a step failed: nobody can tell the quota is gone. Ask again
        /// later (claims wait, and fail closed at their timeout); transfers left in flight are finished
        /// by the next borrow.
        case retry(String)
        /// Every source answered: none has unleased quota to lend, and this region's pool is empty.
        case exhausted
    }

    /// Move up to `amount` tokens of `voucher` into this region's pool from the first source region whose
    /// pool has any, after finishing transfers toward this region left in flight. `generation`: this
    /// region's generation of the voucher.
    func borrow(voucher: String, need: Int, amount: Int, generation: String) async -> Outcome {
        var moved = 0
        var unsure: String?
        for (region, url) in sources {
            do {
                let src = try store(url)
                // Transfers toward this region left in flight (a sidecar or quotactl killed between steps, a
                // reply lost), each on its own: one that cannot be finished does not hold up the others.
                for t in try await src.transfers(voucher: voucher)
                where t.direction == .out && t.state == .taken && t.peer == config.region {
                    do {
                        moved += try await finish(t, voucher: voucher, from: region, src: src, generation: generation)
                    } catch {
                        // Refused for good (taken for another generation of the voucher here, recorded otherwise):
                        // the operator's (audit shows it in flight); it does not keep this region from selling out.
                        if !Self.refusedForGood(error) { unsure = "transfer \(t.id) from \(region): \(error)" }
                        failures.add(1, ordering: .relaxed)
                        logger.warning("borrow: transfer not finished", metadata: ["quota.voucher": "\(voucher)",
                                                                                   "transfer": "\(t.id)", "error": "\(error)"])
                    }
                }
                if moved > 0 { return .moved(moved) }
                // A source that lost data lends nothing: its pool may hold tokens already sold.
                guard try await src.regionGeneration() != nil else {
                    unsure = "region \(region) has no region marker (its Redis lost its data?)"
                    continue
                }
                guard let rec = try await src.voucher(voucher) else { continue }
                if let why = wentBack(region: region, rec) {
                    unsure = why
                    continue
                }
                guard rec.status == .active else { continue }
                // The fullest shard of a sharded source (each keeps its own books and transfer records).
                let pools = rec.shardPools.isEmpty ? [rec.pool] : rec.shardPools
                guard let (shard, pool) = pools.enumerated().max(by: { $0.element < $1.element }).map({ ($0.offset, $0.element) }),
                      pool > 0 else { continue }
                let id = "b-\(config.hostID.prefix(24))-" + String(UInt64.random(in: 0...UInt64.max) & 0xFFFF_FFFF_FFFF, radix: 36)
                var taken = try await src.takeTransfer(voucher: voucher, id: id, to: config.region, amount: min(amount, pool),
                                                       gen: rec.generation, toGeneration: generation, shard: shard)
                if case .poolTooSmall(let p) = taken, p > 0 {
                    // Its pool shrank since it was read (its own hosts leased): what is there.
                    taken = try await src.takeTransfer(voucher: voucher, id: id, to: config.region, amount: min(amount, p),
                                                       gen: rec.generation, toGeneration: generation, shard: shard)
                }
                guard case .applied(let t) = taken else { continue }
                try await allocationsToLedger(voucher: voucher, [(region, src)])
                failpoint("borrow-after-take")
                if ProcessInfo.processInfo.environment["QUOTAD_FAILPOINT"] == "borrow-pause-after-take" {
                    try? await Task.sleep(for: .seconds(3))
                }
                moved += try await finish(t, voucher: voucher, from: region, src: src, generation: generation)
                logger.info("borrowed quota", metadata: ["quota.voucher": "\(voucher)", "from": "\(region)",
                                                         "tokens": "\(t.amount)", "transfer": "\(id)"])
                if moved > 0 { return .moved(moved) }
            } catch {
                unsure = "\(region): \(error)"
                failures.add(1, ordering: .relaxed)
                logger.warning("borrow failed", metadata: ["quota.voucher": "\(voucher)", "from": "\(region)",
                                                           "error": "\(error)"])
            }
        }
        if let unsure { return .retry(unsure) }
        // Every source said no. Tokens another finisher delivered here meanwhile are this region's to lease.
        do {
            if let own = try await home.voucher(voucher), own.pool > 0 { return .moved(0) }
        } catch {
            return .retry("this region's pool: \(error)")
        }
        return .exhausted
    }

    /// A transfer step refused in a way a retry cannot change (as opposed to Redis unreachable or slow).
    static func refusedForGood(_ error: any Error) -> Bool {
        switch error as? RedisError {
        case .generation?, .badReply?: return true
        default: return false
        }
    }

    /// Each source voucher's generation and lease sequences (per shard) as last read: a source whose
    /// sequence went back under the same generation lost acknowledged writes (a failover to a replica that
    /// lagged) and its pool may count tokens already sold: it lends nothing.
    private let seen = NIOLockedValueBox<[String: (gen: String, seqs: [Int])]>([:])

    private func wentBack(region: String, _ rec: VoucherRecord) -> String? {
        let seqs = rec.shardRecords.isEmpty ? [rec.leaseSeq] : rec.shardRecords.map(\.leaseSeq)
        return seen.withLockedValue { m in
            let key = "\(region)|\(rec.id)"
            if let prior = m[key], prior.gen == rec.generation {
                for (i, s) in prior.seqs.enumerated() where i < seqs.count && seqs[i] < s {
                    return "region \(region): lease sequence of '\(rec.id)'\(i == 0 ? "" : " shard \(i)") went back from \(s) to "
                        + "\(seqs[i]) (Redis lost writes): it lends nothing"
                }
            }
            m[key] = (rec.generation, seqs)
            return nil
        }
    }

    /// Steps 2 and 3 of a transfer toward this region. Returns its amount (the tokens reached this region,
    /// now or before).
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
        if added > 0 {
            tokensBorrowed.add(added, ordering: .relaxed)
            transfers.add(1, ordering: .relaxed)
        }
        failpoint("borrow-after-give")
        try await allocationsToLedger(voucher: voucher, [(from, src), (config.region, home)])
        _ = try await src.finishTransfer(voucher: voucher, id: t.id, gen: srcRec.generation)
        // Given now or before (by another finisher): the tokens reached this region.
        return t.amount
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
        let properties = config.kafka.properties
        // librdkafka blocks while it flushes: on a thread of its own, not the concurrency pool's.
        try await withCheckedThrowingContinuation { (k: CheckedContinuation<Void, any Error>) in
            Thread.detachNewThread {
                do {
                    _ = try KafkaProducer.produceAll(brokers: brokers, topic: topic, events, properties: properties, logger: logger,
                                                    timeout: .seconds(10))
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
