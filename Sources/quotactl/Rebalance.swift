import ArgumentParser
import Foundation
import Glibc
import QuotaCore
import QuotaLedger
import QuotaRedis

/// `quotactl rebalance ID --from R --to R --amount N`: move unleased quota between regions' Redis.
///
/// Three steps, each one Lua script in one region, each idempotent by the transfer id (docs/accounting.md):
/// 1. source: `pool -= N`, allocation (`limit`) `-= N`, record `{id, to, N, taken}`; refused (nothing
///    changed) when the pool holds fewer than N;
/// 2. destination: `pool += N`, allocation `+= N`, record `{id, from, N}`; a second run adds nothing;
/// 3. source: mark the transfer `done`.
/// Between steps 1 and 2 the tokens are *in flight*: in no region's allocation, counted by the audit.
/// A crash between steps is finished by running the same command with the same `--transfer-id`, or by
/// `--resume`, which finishes every transfer its source still holds `taken`.
struct RebalanceCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rebalance",
        abstract: "Move unleased quota of a voucher from one region to another (crash-safe, idempotent by transfer id).",
        discussion: """
            Takes N tokens from the source region's pool (never leased tokens: if the pool holds fewer, nothing
            changes), records the transfer in the source, adds them to the destination's pool, and marks the
            transfer done. Sidecars of the destination lease the new quota at their next lease (a voucher they
            answered SOLDOUT for sells again within avail_refresh). If quotactl dies between steps, the tokens are
            in flight (quotactl audit shows them, and balances); run the same command with the same
            --transfer-id, or `quotactl rebalance ID --resume`, to finish it. A finished transfer run again
            changes nothing. Test failpoints: QUOTACTL_FAILPOINT=after-take|after-give kills quotactl (SIGKILL)
            right after that step.
            """)

    @Argument(help: "Voucher id.") var id: String
    @Option(name: .long, help: "Source region.") var from: String?
    @Option(name: .long, help: "Destination region.") var to: String?
    @Option(name: .long, help: "Tokens to move (> 0), taken from the source's unleased pool.") var amount: Int?
    @Option(name: .long, help: "The transfer's id (default: generated). The same id finishes an interrupted transfer.")
    var transferId: String?
    @Flag(name: .long, help: "Finish every transfer of the voucher left in state taken (with --transfer-id: that one).")
    var resume = false
    @OptionGroup var conn: Connection

    struct StepsJSON: Codable {
        var transfer: String
        var voucher: String
        var from: String
        var to: String
        var amount: Int
        /// Per step: `applied` (done by this run), `already` (done before: nothing changed).
        var take: String
        var give: String
        var done: String
        var result: String
    }

    func run() async throws {
        try requireVoucherID(id)
        if let transferId, !TransferRecord.isValidID(transferId) {
            throw ValidationError("invalid --transfer-id '\(transferId)': use 1-64 of A-Z a-z 0-9 _ . : -")
        }
        let r = try conn.regions()
        if resume {
            guard from == nil, to == nil, amount == nil else {
                throw ValidationError("--resume finds the transfers itself: give no --from/--to/--amount (or re-run the "
                    + "transfer with them and its --transfer-id)")
            }
            return try await resumeAll(r.regions)
        }
        guard let from, let to, let amount else {
            throw ValidationError("give --from REGION --to REGION --amount N (or --resume to finish interrupted transfers)")
        }
        guard amount > 0 else { throw ValidationError("--amount must be > 0, got \(amount); nothing changed") }
        guard from != to else { throw ValidationError("--from and --to are both '\(from)': nothing to move; nothing changed") }
        let known = r.regions.keys.sorted().joined(separator: ", ")
        guard let fromURL = r.regions[from] else {
            throw ValidationError("--from \(from): unknown region (configured: \(known)); nothing changed")
        }
        guard let toURL = r.regions[to] else {
            throw ValidationError("--to \(to): unknown region (configured: \(known)); nothing changed")
        }
        guard fromURL != toURL else {
            throw ValidationError("regions \(from) and \(to) use the same Redis (\(fromURL)): a voucher has one pool there; nothing changed")
        }
        let tid = transferId ?? Self.newTransferID()
        let voucher = id
        let src = try conn.store(fromURL)
        let dst = try conn.store(toURL)
        guard let srcRec = try await withRedis(fromURL, { () async throws(RedisError) in try await src.voucher(voucher) }) else {
            throw ValidationError("no voucher '\(id)' in region \(from); nothing changed")
        }
        let prior = try await withRedis(fromURL) { () async throws(RedisError) in try await src.transfer(voucher: voucher, id: tid) }
        if let p = prior, p.direction != .out || p.peer != to || p.amount != amount {
            throw ValidationError("transfer \(tid) exists in \(from) as \(Self.describe(p)), not \(amount) to \(to); nothing changed")
        }
        // A sharded voucher's transfers move quota in and out of its shard 0 (the voucher's own key).
        let movable = srcRec.shardPools.first ?? srcRec.pool
        if prior == nil && movable < amount {
            throw ValidationError("region \(from) has \(movable) unleased tokens of \(id) in its pool"
                + (srcRec.shardPools.isEmpty ? "" : " (sharded: transfers take from shard 0; all shards hold \(srcRec.pool))")
                + ", \(amount) asked; nothing changed (leased tokens come back to the pool as hosts return them)")
        }
        // The id must not be recorded in the destination otherwise (used the other way, or another
        // transfer): checked before step 1, so that a refused command changes nothing.
        if let d = try await withRedis(toURL, { () async throws(RedisError) in try await dst.transfer(voucher: voucher, id: tid) }),
           d.direction != .in || d.peer != from || d.amount != amount {
            throw ValidationError("transfer \(tid) exists in \(to) as \(Self.describe(d)), not \(amount) from \(from): use another "
                + "--transfer-id; nothing changed")
        }
        var dstRec = try await withRedis(toURL) { () async throws(RedisError) in try await dst.voucher(voucher) }
        if dstRec == nil {
            // No pool in the destination. Only a region that never had the voucher gets one (allocation 0):
            // without the region marker, its Redis lost its data (the voucher with it): fail closed.
            guard let regionGen = try await withRedis(toURL, { () async throws(RedisError) in try await dst.regionGeneration() })
            else {
                throw ValidationError("region \(to) has no region marker (its Redis lost its data?): its allocation of \(id) is "
                    + "unknown; rebuild it with `quotactl rehydrate --region \(to)` first; nothing changed")
            }
            // Created with the source's status and lease policy in the same script: never briefly active.
            _ = try await withRedis(toURL) { () async throws(RedisError) in
                try await dst.createVoucher(id: voucher, limit: 0, perUser: srcRec.perUser, totalLimit: srcRec.totalLimit,
                                            region: to, startMs: srcRec.startMs, endMs: srcRec.endMs, status: srcRec.status,
                                            policy: srcRec.policy, regionGeneration: regionGen)
            }
            dstRec = try await withRedis(toURL) { () async throws(RedisError) in try await dst.voucher(voucher) }
        }
        guard let dstRec else { throw ValidationError("no voucher '\(id)' in region \(to) and it could not be created; nothing changed") }
        if !conn.json { print("transfer \(tid): \(amount) of \(id) from \(from) to \(to)") }
        fflush(nil)

        // Step 1: take from the source.
        let taken = try await withRedis(fromURL) { () async throws(RedisError) in
            try await src.takeTransfer(voucher: voucher, id: tid, to: to, amount: amount, gen: srcRec.generation,
                                       toGeneration: dstRec.generation)
        }
        let rec: TransferRecord
        let take: String
        switch taken {
        case .applied(let t): rec = t; take = "applied"
        case .already(let t):
            guard t.direction == .out, t.peer == to, t.amount == amount else {
                throw ValidationError("transfer \(tid) exists in \(from) as \(Self.describe(t)), not \(amount) to \(to); nothing changed")
            }
            rec = t
            take = "already"
        case .poolTooSmall(let p):
            throw ValidationError("region \(from) has \(p) unleased tokens of \(id) in its pool, \(amount) asked; nothing changed "
                + "(leased tokens come back to the pool as hosts return them)")
        case .conflict(let t):
            throw ValidationError("transfer \(tid) exists in \(from) as \(Self.describe(t)), not \(amount) to \(to); nothing changed")
        case .unknown: throw ValidationError("transfer \(tid): unexpected answer from \(from)")
        }
        // The source's new allocation on the ledger (rehydration rebuilds the pool from it), on every run
        // that finds the take applied: a run killed before this write leaves it to the next one.
        try await recordDefinitions([(from, src)])
        Self.failpoint("after-take")
        let (give, done) = try await finish(rec, from: from, srcURL: fromURL, src: src, srcGen: srcRec.generation,
                                            regions: r.regions)
        let out = StepsJSON(transfer: tid, voucher: id, from: from, to: to, amount: amount, take: take, give: give, done: done,
                            result: take == "already" && give == "already" && done == "already" ? "already done" : "done")
        if conn.json { return try emitJSON(out) }
        print("  1 take from \(from): \(take == "applied" ? "done" : "done before")")
        print("  2 give to \(to): \(give == "applied" ? "done" : "done before")")
        print("  3 mark done in \(from): \(done == "applied" ? "done" : "done before")")
        print(out.result == "already done" ? "transfer \(tid) was already done: nothing changed" : "transfer \(tid) done")
    }

    /// Steps 2 and 3 of a transfer its source recorded (`rec`). Returns what each step did.
    private func finish(_ rec: TransferRecord, from: String, srcURL: String, src: QuotaStore, srcGen: String,
                        regions: [String: String]) async throws -> (give: String, done: String) {
        let voucher = id
        let tid = rec.id
        guard let toURL = regions[rec.peer] else {
            throw ValidationError("transfer \(tid): destination region \(rec.peer) is not configured here; it stays in flight")
        }
        let dst = try conn.store(toURL)
        guard let dstRec = try await withRedis(toURL, { () async throws(RedisError) in try await dst.voucher(voucher) }) else {
            throw ValidationError("transfer \(tid): no voucher '\(voucher)' in \(rec.peer) any more (Redis lost it? see quotactl "
                + "rehydrate); the transfer stays in flight")
        }
        if !rec.peerGeneration.isEmpty && rec.peerGeneration != dstRec.generation {
            throw ValidationError("transfer \(tid): voucher '\(voucher)' in \(rec.peer) has generation \(dstRec.generation), the "
                + "transfer was taken for \(rec.peerGeneration) (recreated or rehydrated since): not given; it stays in flight")
        }
        // Step 2: give to the destination (once per transfer id: its record says whether it happened).
        let given = try await withRedis(toURL) { () async throws(RedisError) in
            try await dst.giveTransfer(voucher: voucher, id: tid, from: from, amount: rec.amount, gen: dstRec.generation)
        }
        let give: String
        switch given {
        case .applied: give = "applied"
        case .already(let t):
            guard t.direction == .in, t.peer == from, t.amount == rec.amount else {
                throw ValidationError("transfer \(tid): \(rec.peer) holds it as \(Self.describe(t)), \(from) as \(Self.describe(rec))")
            }
            give = "already"
        case .conflict(let t):
            throw ValidationError("transfer \(tid): \(rec.peer) holds it as \(Self.describe(t)) (the id used the other way), "
                + "\(from) as \(Self.describe(rec)): not given; it stays in flight")
        default: throw ValidationError("transfer \(tid): unexpected answer from \(rec.peer)")
        }
        Self.failpoint("after-give")
        // Both regions' allocations on the ledger before the transfer is marked done (every run: one
        // killed before these writes leaves them to the next); not written: not marked done.
        try await recordDefinitions([(from, src), (rec.peer, dst)])
        // Step 3: mark it done in the source.
        let marked = try await withRedis(srcURL) { () async throws(RedisError) in
            try await src.finishTransfer(voucher: voucher, id: tid, gen: srcGen)
        }
        switch marked {
        case .applied: return (give, "applied")
        case .already: return (give, "already")
        default: throw ValidationError("transfer \(tid): \(from) has no record of it")
        }
    }

    /// Finish every transfer of the voucher that a source still holds `taken`.
    private func resumeAll(_ regions: [String: String]) async throws {
        let voucher = id
        var results: [StepsJSON] = []
        var failed: [String] = []
        var found = false
        for (name, url) in regions.sorted(by: { $0.key < $1.key }) {
            let s = try conn.store(url)
            guard let rec = try await withRedis(url, { () async throws(RedisError) in try await s.voucher(voucher) }) else { continue }
            found = true
            let pending = try await withRedis(url) { () async throws(RedisError) in try await s.transfers(voucher: voucher) }
                .filter { $0.direction == .out && $0.state == .taken && (transferId == nil || $0.id == transferId) }
            for t in pending {
                if !conn.json { print("transfer \(t.id): \(t.amount) of \(id) from \(name) to \(t.peer), left taken: finishing") }
                let give: String, done: String
                do {
                    (give, done) = try await finish(t, from: name, srcURL: url, src: s, srcGen: rec.generation, regions: regions)
                } catch {
                    // Reported; the others are still finished (the exit status says one failed).
                    FileHandle.standardError.write(Data(("error: transfer \(t.id) (\(t.amount) from \(name) to \(t.peer)) not "
                        + "finished: \(error)\n").utf8))
                    failed.append(t.id)
                    continue
                }
                results.append(StepsJSON(transfer: t.id, voucher: id, from: name, to: t.peer, amount: t.amount, take: "already",
                                         give: give, done: done, result: "done"))
                if !conn.json {
                    print("  2 give to \(t.peer): \(give == "applied" ? "done" : "done before"); 3 mark done: done")
                }
            }
        }
        guard found else { throw ValidationError("no voucher '\(id)' (see: quotactl voucher list)") }
        if conn.json { try emitJSON(results) } else if results.isEmpty && failed.isEmpty {
            print("no transfer of \(id) in flight: nothing to finish")
        }
        if !failed.isEmpty {
            fflush(nil)
            throw ValidationError("\(failed.count) transfer(s) of \(id) not finished: \(failed.joined(separator: ", ")) "
                + "(see the errors above; they stay in flight)")
        }
    }

    /// The regions' allocations as the ledger keeps them (rehydration rebuilds a pool from them). With
    /// Kafka configured, a failure to write them throws: the caller stops before marking the transfer done
    /// (it stays finishable by a re-run or `--resume`, which write them again).
    private func recordDefinitions(_ stores: [(String, QuotaStore)]) async throws {
        guard let cfg = try? conn.loadConfig(), let brokers = cfg.kafka.brokers else { return }
        var defs: [(key: String, value: [UInt8])] = []
        let now = Int64(Date().timeIntervalSince1970 * 1000)
        for (region, s) in stores {
            guard let rec = try await s.voucher(id) else {
                throw ValidationError("no voucher '\(id)' in \(region) to write its allocation to the ledger")
            }
            defs.append((id, VoucherDefinition(voucher: id, region: region, limit: rec.limit, totalLimit: rec.totalLimit,
                                               perUser: rec.perUser, state: rec.status.rawValue, generation: rec.generation,
                                               tsMs: now).kafkaValue))
        }
        do { _ = try produceEvents(brokers: brokers, topic: cfg.kafka.topic, defs) } catch {
            throw ValidationError("the new allocation of \(id) in \(stores.map(\.0).joined(separator: ", ")) is not on Kafka "
                + "(\(error)): the ledger's is stale, so the transfer is not marked done; run the same command again (or "
                + "--resume) when Kafka is back")
        }
    }

    static func describe(_ t: TransferRecord) -> String {
        t.direction == .out ? "\(t.amount) to \(t.peer) (\(t.state == .done ? "done" : "taken"))" : "\(t.amount) from \(t.peer)"
    }

    static func newTransferID() -> String {
        "t-\(Int(Date().timeIntervalSince1970 * 1000))-\(String(UInt32.random(in: 0...UInt32.max), radix: 16))"
    }

    /// Test failpoint: `QUOTACTL_FAILPOINT=name` kills this process (SIGKILL) right here.
    static func failpoint(_ name: String) {
        guard ProcessInfo.processInfo.environment["QUOTACTL_FAILPOINT"] == name else { return }
        fflush(nil)
        kill(getpid(), SIGKILL)
    }
}
