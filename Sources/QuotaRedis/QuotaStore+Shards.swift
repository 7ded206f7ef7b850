import QuotaCore

/// Hot-key shards (`quotactl voucher create ID --shards K`).
///
/// A sharded voucher's region pool is K sub-pools, each a complete voucher hash with its own hash tag:
/// shard 0 is `quota:{ID}` itself (so every unsharded path stays as it was), shard s ≥ 1 is
/// `quota:{<tag s>}` where the tag starts `ID#s` (`#` is not in the voucher-id alphabet, so a tag never
/// names another voucher), salted on a cluster so that the shards land on different masters. Shard 0
/// lists the other tags (`shard_tags`); each sub-pool records `shard_of` and numbers its leases
/// `<s>.<n>` (`lease_prefix`), so a lease id names its shard and every per-lease script (renew, return,
/// restock, reclaim) goes to that shard's keys. Each shard keeps the accounting identity by itself, so
/// their sums (what ``voucher(_:)`` answers) keep it too.
///
/// A sidecar leases from its home shard (its host id's FNV-1a modulo K) and, when that is empty, from
/// the next ones in turn: shards rebalance themselves through the sidecars, no operator involved. The
/// voucher is sold out (or recalling) only when every shard says so.
///
/// One lease request id, several shards: each shard sees its own variant of the id (`req` on shard 0,
/// `req#s` on shard s). A request moves on to the next shard only after the previous shard's variant is
/// final and got nothing (resolved with `want` 0, which records it as answered), so at most one shard
/// ever grants to a request, however its calls are cut short and retried; resolving a request (`want`
/// 0, after a lost reply or a crash) resolves its variant on every shard.
extension QuotaStore {
    /// The shard a lease id belongs to: `<s>.<n>` → s, a plain number → 0.
    public static func shardIndex(ofLease id: String) -> Int {
        guard let dot = id.firstIndex(of: "."), let s = Int(id[..<dot]), s > 0 else { return 0 }
        return s
    }

    /// Sort key of lease ids: by shard, then number.
    static func leaseOrder(_ id: String) -> (Int, Int) { leaseNumber(id) ?? (shardIndex(ofLease: id), 0) }

    /// A lease id's shard and its number in that shard's `lease_seq` (nil: not a lease id quotad makes).
    public static func leaseNumber(_ id: String) -> (shard: Int, number: Int)? {
        let s = shardIndex(ofLease: id)
        let n = s == 0 ? Substring(id) : id[id.index(after: id.firstIndex(of: ".")!)...]
        return Int(n).map { (s, $0) }
    }

    /// The request id a sidecar journaled for a lease record's request (a shard's variant `req#s` → `req`).
    public static func journaledRequest(_ req: String, lease: String) -> String {
        let s = shardIndex(ofLease: lease)
        let suffix = "#\(s)"
        return s > 0 && req.hasSuffix(suffix) ? String(req.dropLast(suffix.count)) : req
    }

    /// The home shard of `host` among `shards`.
    public static func homeShard(host: String, shards: Int) -> Int { userGroup(user: host, groups: shards) }

    /// The variant of lease request `req` that shard `shard` sees.
    static func variant(_ req: String, shard: Int) -> String { shard == 0 ? req : "\(req)#\(shard)" }

    /// `limit` split into `parts` shares differing by at most one (the first ones larger).
    static func split(_ limit: Int, into parts: Int) -> [Int] {
        (0..<parts).map { limit / parts + ($0 < limit % parts ? 1 : 0) }
    }

    static func unknownShard(_ voucher: String, lease: String, shards: Int) -> RedisError {
        .badReply("lease '\(lease)' names a shard voucher '\(voucher)' does not have (it has \(shards))")
    }

    /// The voucher's shard tags (`[voucher]` when unsharded), from the cache or Redis.
    public func shardTags(_ voucher: String) async throws(RedisError) -> [String] {
        if let t = shardCache.withLockedValue({ $0[voucher] }) { return t }
        let r = try await connection.send(["HGET", Self.meta(voucher), "shard_tags"])
        if case .error(let e) = r { throw RedisError.server(e) }
        let tags = Self.tags(voucher, r.string)
        shardCache.withLockedValue { $0[voucher] = tags }
        return tags
    }

    static func tags(_ voucher: String, _ field: String?) -> [String] {
        [voucher] + (field ?? "").split(separator: ",").map(String.init)
    }

    /// The tag of the shard lease `lease` of `voucher` belongs to.
    func shardTag(_ voucher: String, lease: String) async throws(RedisError) -> String {
        let i = Self.shardIndex(ofLease: lease)
        guard i > 0 else { return voucher }
        let tags = try await shardTags(voucher)
        guard i < tags.count else { throw Self.unknownShard(voucher, lease: lease, shards: tags.count) }
        return tags[i]
    }

    /// Tags for a new voucher's shards: on a cluster, each shard on a slot of the master that holds the
    /// fewest of the voucher's shards so far (salting the tag until one does); standalone, `ID#s`.
    func placeShards(id: String, shards: Int) async throws(RedisError) -> [String] {
        let cluster = connection.cluster
        if let cluster, cluster.masters.isEmpty { _ = try await nowMs() }  // the topology is read on first use
        let masters = cluster?.masters ?? []
        var load: [String: Int] = Dictionary(uniqueKeysWithValues: masters.map { ($0, 0) })
        var slots: Set<Int> = [ClusterSlot.of(Self.meta(id))]
        if let m = cluster?.master(ofSlot: ClusterSlot.of(Self.meta(id))) { load[m, default: 0] += 1 }
        var tags = [id]
        for s in 1..<shards {
            let least = load.values.min() ?? 0
            var best: (tag: String, master: String?, load: Int)?
            for salt in 0..<20_000 {
                let tag = salt == 0 ? "\(id)#\(s)" : "\(id)#\(s).\(salt)"
                let slot = ClusterSlot.of(Self.meta(tag))
                if slots.contains(slot) { continue }
                let m = cluster?.master(ofSlot: slot)
                let l = m.map { load[$0, default: 0] } ?? 0
                if best == nil || l < best!.load { best = (tag, m, l) }
                if l <= least { break }
            }
            guard let best else { throw RedisError.badReply("no free slot for shard \(s) of '\(id)'") }
            tags.append(best.tag)
            slots.insert(ClusterSlot.of(Self.meta(best.tag)))
            if let m = best.master { load[m, default: 0] += 1 }
        }
        return tags
    }

    /// Voucher records from `HGETALL` replies of their keys: a sharded voucher's shards are read too (one
    /// more round trip for all of them) and summed. A shard missing, or of another generation, makes the
    /// record's generation say so: a sidecar then fails closed for the voucher.
    func withShards(_ ids: [String], _ replies: [RedisValue]) async throws(RedisError) -> [VoucherRecord?] {
        // An error reply (LOADING, CLUSTERDOWN, NOPERM…) is a failed read, never an absent voucher.
        for r in replies { if case .error(let e) = r { throw RedisError.server(e) } }
        var out = zip(ids, replies).map { Self.record(id: $0, $1) }
        var wanted: [(index: Int, tags: [String])] = []
        for (i, rec) in out.enumerated() {
            guard let rec else { continue }
            let tags = rec.shardTags.isEmpty ? [rec.id] : rec.shardTags
            shardCache.withLockedValue { $0[rec.id] = tags }
            if tags.count > 1 { wanted.append((i, tags)) }
        }
        guard !wanted.isEmpty else { return out }
        let rs = try await connection.send(batch: wanted.flatMap { w in w.tags.dropFirst().map { ["HGETALL", Self.meta($0)] } })
        for r in rs { if case .error(let e) = r { throw RedisError.server(e) } }
        var k = 0
        for w in wanted {
            var rec = out[w.index]!
            rec.shardPools = [rec.pool]
            rec.shardRecords = [rec]
            for tag in w.tags.dropFirst() {
                let f = Self.fields(rs[k])
                k += 1
                guard let sub = Self.record(id: rec.id, fields: f), f["shard_of"] == rec.id else {
                    rec.generation = "(shard \(tag) missing)"
                    rec.shardPools.append(0)
                    // Its place kept (records are indexed by shard): empty books, closed.
                    rec.shardRecords.append(Self.record(id: rec.id, fields: ["region": rec.region])!)
                    continue
                }
                rec.shardRecords.append(sub)
                if sub.generation != rec.generation { rec.generation = "(shard \(tag): \(sub.generation))" }
                rec.limit += sub.limit
                rec.pool += sub.pool
                rec.leased += sub.leased
                rec.returned += sub.returned
                rec.restocked += sub.restocked
                rec.archivedLeases += sub.archivedLeases
                rec.archivedGranted += sub.archivedGranted
                rec.archivedReturned += sub.archivedReturned
                rec.archivedRestocked += sub.archivedRestocked
                rec.starvedMs = max(rec.starvedMs, sub.starvedMs)
                if sub.recallMs > rec.recallMs {
                    rec.recallMs = sub.recallMs
                    rec.recallHost = sub.recallHost
                }
                if let a = rec.allocated ?? (rec.sent == 0 && rec.received == 0 ? rec.limit - sub.limit : nil) {
                    rec.allocated = a + (sub.allocated ?? sub.limit)
                }
                rec.sent += sub.sent
                rec.received += sub.received
                rec.shardPools.append(sub.pool)
            }
            out[w.index] = rec
        }
        return out
    }

    /// `HSET` fields on every shard of an existing voucher. False when the voucher does not exist.
    func setFields(_ voucher: String, _ fields: [String]) async throws(RedisError) -> Bool {
        let tags = try await shardTags(voucher)
        for tag in tags.dropFirst() { _ = try await eval(QuotaScripts.setFields, keys: [Self.meta(tag)], args: fields) }
        return try await eval(QuotaScripts.setFields, keys: [Self.meta(voucher)], args: fields).int == 1
    }

    /// LEASE on a sharded voucher: the home shard first, then the others in turn (see the type's notes).
    func shardedLease(voucher: String, tags: [String], host: String, req: String, want: Int, need: Int, ttl: Duration,
                      gen: String, durability: String, warmup: Duration, close: [ReturnRequest])
        async throws(RedisError) -> LeaseReply
    {
        let home = Self.homeShard(host: host, shards: tags.count)
        let order = (0..<tags.count).map { (home + $0) % tags.count }
        // Leases to close first: the home shard's ride on its LEASE call, the others' go now (returns are
        // cumulative: a retry changes nothing).
        var closeHome: [ReturnRequest] = []
        for c in close {
            let i = Self.shardIndex(ofLease: c.leaseId)
            guard i < tags.count else { throw Self.unknownShard(voucher, lease: c.leaseId, shards: tags.count) }
            if i == home {
                closeHome.append(c)
            } else {
                _ = try await giveBack(voucher: voucher, lease: c.leaseId, host: host, returnedTotal: c.returnedTotal,
                                       close: c.close, gen: gen)
            }
        }
        func call(_ s: Int, want: Int, need: Int) async throws(RedisError) -> LeaseReply {
            let c = s == home ? closeHome : []
            if s == home { closeHome = [] }
            return try await leaseOne(voucher: voucher, tag: tags[s], host: host, req: Self.variant(req, shard: s),
                                      want: want, need: need, ttl: ttl, gen: gen, durability: durability, warmup: warmup,
                                      recall: false, close: c)
        }
        var poolSum = 0, held = 0, abandoned = 0
        var holders: [Int] = []
        var grant: LeaseGrant?
        if want <= 0 {
            // Resolve: every shard's variant (each then final), the grant if one got it.
            for s in order {
                switch try await call(s, want: 0, need: 0) {
                case .granted(let g) where g.granted > 0:
                    if grant == nil {
                        grant = g
                    } else {
                        // Cannot happen (a request moves on only after a shard's final "nothing"), but a
                        // second grant must not stay outstanding: nothing was served from it.
                        _ = try await giveBack(voucher: voucher, lease: g.id, host: host, returnedTotal: g.granted,
                                               close: true, gen: gen)
                    }
                case .granted(let g): poolSum += g.poolAfter
                case .refused: break
                }
            }
            return .granted(grant ?? LeaseGrant(id: "", granted: 0, ttl: .zero, poolAfter: poolSum))
        }
        for s in order {
            let r = try await call(s, want: want, need: need)
            switch r {
            case .granted(let g) where g.granted > 0: return r
            case .granted(let g): poolSum += g.poolAfter  // this variant was resolved before: it gets nothing
            case .refused(.recalling(let h)):
                held += h
                holders.append(s)
            case .refused(.soldOut(let a)): abandoned += a
            case .refused: return r  // not active, outside the schedule, unknown: the same on every shard
            }
            if s == order.last { break }
            // Make this shard's "nothing" final for the request before asking the next shard.
            if case .granted(let g) = try await call(s, want: 0, need: 0), g.granted > 0 { return .granted(g) }
        }
        if poolSum > 0 { return .granted(LeaseGrant(id: "", granted: 0, ttl: .zero, poolAfter: poolSum)) }
        // Every shard is empty: recall, on each shard where other hosts hold leases, what they do not need
        // (only for claims waiting, as the LEASE script does). A failed recall is retried by the next poll.
        if need > 0 {
            for s in holders { _ = try? await eval(QuotaScripts.recall, keys: [Self.meta(tags[s])], args: [host]) }
        }
        return .refused(held > 0 ? .recalling(held: held) : .soldOut(abandoned: abandoned))
    }
}
