import Foundation
import Logging
import NIOConcurrencyHelpers
import QuotaCore

/// What Redis knows of one voucher in one region.
public struct VoucherRecord: Sendable, Equatable {
    public var id: String
    /// This region's allocation.
    public var limit: Int
    /// Unleased tokens in this region's pool.
    public var pool: Int
    public var status: VoucherStatus
    /// 0 = no per-user limit.
    public var perUser: Int
    /// The voucher's limit across all regions.
    public var totalLimit: Int
    public var region: String
    /// Tokens ever leased, returned by leases, and restocked by cancellations (audit counters).
    public var leased: Int
    public var returned: Int
    public var restocked: Int
    /// Closed leases archived out of the lease hash, and their sums.
    public var archivedLeases: Int
    public var archivedGranted: Int
    public var archivedReturned: Int
    public var archivedRestocked: Int
    /// The last lease id handed out.
    public var leaseSeq: Int
    /// The voucher's generation: set at creation, checked by every sidecar script.
    public var generation: String
    /// When a lease last found the pool empty with no lease held anywhere (Redis ms), or 0.
    public var starvedMs: Int
    /// When a lease last found the pool empty while leases were held, and recalled them (Redis ms), or 0.
    public var recallMs: Int
    /// The host that recalled at `recallMs`.
    public var recallHost: String = ""
    /// The sale's schedule on Redis's clock (ms; 0: none).
    public var startMs: Int64
    public var endMs: Int64
    public var policy: LeasePolicyOverride
    /// The allocation this region was created with (nil: not recorded, for vouchers created before
    /// transfers existed and never moved), and the quota moved out of and into it by transfers
    /// (`quotactl rebalance`): `limit == allocated - sent + received`.
    public var allocated: Int? = nil
    public var sent: Int = 0
    public var received: Int = 0
    /// Hot-key shards (`voucher create --shards K`): the hash tags of the voucher's sub-pools, index 0 the
    /// voucher id itself, and each one's pool. Empty for an unsharded voucher. The counters above are the
    /// sums over the shards; `leaseSeq` is shard 0's.
    public var shardTags: [String] = []
    public var shardPools: [Int] = []
    /// Each shard's own record (index 0: the voucher's key), as read.
    public var shardRecords: [VoucherRecord] = []

    /// What the claim lifecycle needs of it (the schedule is placed on the host's clock by the caller).
    public var info: VoucherRecordInfo {
        VoucherRecordInfo(status: status, pool: pool, perUser: perUser, recallMs: recallMs, recallHost: recallHost)
    }
}

/// A lease as recorded in Redis.
public struct LeaseRecord: Sendable, Equatable {
    public enum State: String, Sendable { case open = "o", closed = "c", reclaimed = "x" }
    public var id: String
    public var host: String
    public var granted: Int
    public var returned: Int
    public var restocked: Int
    public var expiresMs: Int
    public var state: State
    /// The durability its host answers claims under: `kafka`, `journal`, `none`, or "" (unknown).
    public var durability: String
    /// The request id it was granted to.
    public var req: String

    /// Tokens of the lease not given back: held by its host (open) or sold (closed).
    public var outstanding: Int { granted - returned - restocked }

    static let modes = ["k": "kafka", "j": "journal", "n": "none"]
    /// The one-letter form of a durability mode, as lease records keep it.
    public static func modeLetter(_ durability: String) -> String { modes.first { $0.value == durability }?.key ?? "" }

    /// Parse `host|granted|returned|restocked|expiry|state|mode|req`.
    static func parse(id: String, _ v: String) -> LeaseRecord? {
        let p = v.split(separator: "|", maxSplits: 7, omittingEmptySubsequences: false)
        guard p.count == 8, let g = Int(p[1]), let r = Int(p[2]), let k = Int(p[3]), let e = Int(p[4]),
            let st = State(rawValue: String(p[5]))
        else { return nil }
        return LeaseRecord(id: id, host: String(p[0]), granted: g, returned: r, restocked: k, expiresMs: e, state: st,
                           durability: modes[String(p[6])] ?? "", req: String(p[7]))
    }
}

/// A transfer of unleased quota between regions, as one region records it (`quotactl rebalance`).
public struct TransferRecord: Sendable, Equatable, Codable {
    public enum Direction: String, Sendable, Codable { case out, `in` }
    public enum State: String, Sendable, Codable { case taken = "t", done = "d" }
    public var id: String
    /// `out`: this region gave it (the source's record); `in`: this region received it.
    public var direction: Direction
    /// The other region: the destination of an `out` record, the source of an `in` one.
    public var peer: String
    public var amount: Int
    /// `taken`: taken from the source, not yet confirmed delivered; `done`. `in` records are always done.
    public var state: State
    /// When this region recorded it (Redis ms).
    public var tsMs: Int
    /// On an `out` record: the destination voucher's generation when the transfer was taken.
    public var peerGeneration: String

    /// Parse `dir|peer|amount|state|ms|peer gen`.
    public static func parse(id: String, _ v: String) -> TransferRecord? {
        let p = v.split(separator: "|", maxSplits: 5, omittingEmptySubsequences: false)
        guard p.count == 6, let dir = Direction(rawValue: String(p[0])), let n = Int(p[2]),
            let st = State(rawValue: String(p[3])), let ts = Int(p[4])
        else { return nil }
        return TransferRecord(id: id, direction: dir, peer: String(p[1]), amount: n, state: st, tsMs: ts,
                              peerGeneration: String(p[5]))
    }

    /// Transfer ids: 1–64 of `A-Z a-z 0-9 _ . : -`.
    public static func isValidID(_ id: String) -> Bool { QuotaStore.isValidVoucherID(id) }
}

/// Answer of a transfer step (`quotactl rebalance`).
public enum TransferReply: Sendable, Equatable {
    /// Applied now; the record as written.
    case applied(TransferRecord)
    /// Applied before (same transfer id): nothing changed; the record as it stands.
    case already(TransferRecord)
    /// Step 1 only: the pool holds fewer tokens than asked (this many): nothing changed.
    case poolTooSmall(Int)
    /// Step 3 only: the source has no such outgoing transfer.
    case unknown
    /// Steps 1 and 2: the region records the transfer id otherwise (this record: the id used the other
    /// way, or to another region or amount): nothing changed.
    case conflict(TransferRecord)
}

/// Answer of the LEASE script.
public enum LeaseReply: Sendable, Equatable {
    case granted(LeaseGrant)
    case refused(LeaseRefusal)
}

/// Answer of a return.
public enum ReturnReply: Sendable, Equatable {
    /// Applied: this many tokens went back to the pool now.
    case applied(Int)
    /// The lease is already closed, reclaimed or unknown: nothing changed.
    case gone
    /// The lease belongs to another host: nothing changed.
    case notOurs
}

/// Answer of a restock.
public enum RestockReply: Sendable, Equatable {
    case applied(Int)
    case alreadyDone
    /// The claim was cancelled longer ago than the restock horizon: left to reconciliation.
    case tooOld
}

/// The quota authority of one region: typed calls over the Lua scripts.
///
/// Key layout (one hash tag per voucher): `quota:{ID}` (hash: limit, pool, state,
/// per_user, lease_seq, leased, returned, lease overrides), `quota:{ID}:leases`
/// (hash of lease records), `quota:{ID}:exp` (zset of lease expiries),
/// `quota:vouchers` (set of ids), `quota:policy` (hash: region lease defaults), `quota:{region}:hosts`
/// (zset: live sidecars by last heartbeat; expires a day after the last), `quota:{region}:warm` (zset:
/// vouchers to warm, by when; owned by `quotactl voucher warm`, entries pruned after a day, expires),
/// `quota:{ID}:rates` (hash: each host's claim rate, for `quotactl lease advise`; expires after 60 s).
///
/// On a Redis Cluster (`redis-cluster://` URLs) every script's keys share one slot: a voucher's keys
/// its `{ID}` tag, a per-user group's its `{ID:g}` tag, the region's hosts and warm list `{region}`;
/// a per-user batch is split by slot (one script call per slot, pipelined per node).
public final class QuotaStore: Sendable {
    public let connection: RedisClient
    private let shas = ScriptCache()
    /// Each voucher's shard tags as last read from Redis (`[id]`: unsharded).
    let shardCache = NIOLockedValueBox<[String: [String]]>([:])

    public init(client: RedisClient) {
        self.connection = client
    }

    public convenience init(connection: HiredisConnection) {
        self.init(client: RedisClient(connection))
    }

    public convenience init(url: String, timeout: Duration = .seconds(1), logger: Logger) throws(RedisError) {
        self.init(client: RedisClient(endpoint: try RedisEndpoint(url: url), timeout: timeout, logger: logger))
    }

    // MARK: Keys

    static func meta(_ id: String) -> String { "quota:{\(id)}" }
    static func leases(_ id: String) -> String { "quota:{\(id)}:leases" }
    static func exp(_ id: String) -> String { "quota:{\(id)}:exp" }
    static func closed(_ id: String) -> String { "quota:{\(id)}:closed" }
    static func reqs(_ id: String) -> String { "quota:{\(id)}:reqs" }
    static func restocked(_ id: String) -> String { "quota:{\(id)}:restocked" }
    static let vouchers = "quota:vouchers"
    static let policy = "quota:policy"
    static let hosts = "quota:{region}:hosts"
    static let warmList = "quota:{region}:warm"
    static func rates(_ id: String) -> String { "quota:{\(id)}:rates" }
    static func transfers(_ id: String) -> String { "quota:{\(id)}:transfers" }
    /// The channel the LEASE script publishes recalls on (the message: the voucher's meta key).
    public static let recallChannel = "quota:recall"

    /// The voucher id and the recalling host of a recall message (`quota:{ID}|host`, `quota:{ID#s…}|host`
    /// from a shard; `quota:{ID}` from older sidecars), or nil.
    public static func recall(ofMessage message: String) -> (voucher: String, from: String?)? {
        guard message.hasPrefix("quota:{") else { return nil }
        let body = message.dropFirst(7)
        guard let close = body.lastIndex(of: "}") else { return nil }
        let rest = body[body.index(after: close)...]
        if !rest.isEmpty && !rest.hasPrefix("|") { return nil }
        // A shard's key (`quota:{ID#s…}`) recalls for its voucher.
        let tag = body[..<close]
        let voucher = tag.firstIndex(of: "#").map { tag[..<$0] } ?? tag
        return (String(voucher), rest.isEmpty ? nil : String(rest.dropFirst()))
    }
    /// The region marker: its generation, created with the region's first voucher.
    public static let region = "quota:region"
    /// How long a restock marker is kept (and how late a restock is still accepted). Default one day.
    public static let restockHorizon: Duration = .seconds(86_400)
    /// How long closed lease records are kept before they are archived into counters. Default a week.
    public static let closedRetention: Duration = .seconds(7 * 86_400)

    /// Voucher ids: 1–64 of `A-Z a-z 0-9 _ . : -` (no braces, so the hash tag is exact).
    public static func isValidVoucherID(_ id: String) -> Bool {
        guard !id.isEmpty, id.utf8.count <= 64 else { return false }
        return id.utf8.allSatisfy { c in
            (c >= 48 && c <= 57) || (c >= 65 && c <= 90) || (c >= 97 && c <= 122) || c == 95 || c == 46 || c == 58
                || c == 45
        }
    }

    /// The group (0 ..< `groups`) of `user`'s per-user count: FNV-1a of the user id.
    public static func userGroup(user: String, groups: Int) -> Int {
        var h: UInt32 = 2_166_136_261
        for b in user.utf8 {
            h ^= UInt32(b)
            h = h &* 16_777_619
        }
        return Int(h % UInt32(max(1, groups)))
    }

    /// The per-user count hash of group `group` of `voucher`: one hash slot per group.
    public static func userGroupKey(voucher: String, group: Int) -> String { "quota:u:{\(voucher):\(group)}" }

    /// The per-user count hash of `user` for `voucher`.
    public static func userGroupKey(voucher: String, user: String, groups: Int) -> String {
        userGroupKey(voucher: voucher, group: userGroup(user: user, groups: groups))
    }

    // MARK: Scripts

    /// The script's SHA1, loading it first (on a cluster: on every master; a node that lacks it later,
    /// a promoted replica or a new master, answers `NOSCRIPT` and gets the script by `EVAL`).
    private func scriptSHA(_ script: String) async throws(RedisError) -> String {
        if let cached = shas.get(script) { return cached }
        if connection.isCluster {
            var firstError: RedisError?
            var sha: String?
            for (_, r) in try await connection.sendToMasters(["SCRIPT", "LOAD", script]) {
                switch r {
                case .success(let v):
                    if let s = v.string { sha = s } else if firstError == nil { firstError = .badReply("SCRIPT LOAD: \(v)") }
                case .failure(let e): if firstError == nil { firstError = e }
                }
            }
            guard let sha else { throw firstError ?? RedisError.badReply("SCRIPT LOAD: no master") }
            shas.set(script, sha)
            return sha
        }
        let r = try await connection.send(["SCRIPT", "LOAD", script])
        guard let s = r.string else { throw RedisError.badReply("SCRIPT LOAD: \(r)") }
        shas.set(script, s)
        return s
    }

    /// Several calls of one script, pipelined (on a cluster: one pipeline per node); per call in order,
    /// its reply or its own failure (an error reply is a `.server` failure). On a cluster the calls on a
    /// node that failed fail while the others keep their replies.
    private func evalEach(_ script: String, calls: [(keys: [String], args: [String])]) async -> [Result<RedisValue, RedisError>] {
        let sha: String
        do throws(RedisError) { sha = try await scriptSHA(script) } catch { return calls.map { _ in .failure(error) } }
        let tails = calls.map { [String($0.keys.count)] + $0.keys + $0.args }
        var replies = await connection.sendEach(batch: tails.map { ["EVALSHA", sha] + $0 })
        for i in replies.indices {
            if case .success(.error(let e)) = replies[i], e.hasPrefix("NOSCRIPT") {
                do throws(RedisError) { replies[i] = .success(try await connection.send(["EVAL", script] + tails[i])) } catch {
                    replies[i] = .failure(error)
                }
            }
            if case .success(.error(let e)) = replies[i] { replies[i] = .failure(.server(e)) }
        }
        return replies
    }

    func eval(_ script: String, keys: [String], args: [String]) async throws(RedisError) -> RedisValue {
        let sha = try await scriptSHA(script)
        let tail = [String(keys.count)] + keys + args
        var reply = try await connection.send(["EVALSHA", sha] + tail)
        if case .error(let e) = reply, e.hasPrefix("NOSCRIPT") {
            reply = try await connection.send(["EVAL", script] + tail)
        }
        if case .error(let e) = reply { throw RedisError.server(e) }
        return reply
    }

    func voucherKeys(_ id: String) -> [String] {
        [Self.meta(id), Self.leases(id), Self.exp(id), Self.closed(id), Self.reqs(id)]
    }

    /// A script reply that says the voucher's generation is not the one the caller knew.
    static func generationError(_ a: [RedisValue], known: String, voucher: String) -> RedisError? {
        switch a.first?.int {
        case -3: return .generation("voucher '\(voucher)' has generation \(a.count > 1 ? a[1].string ?? "?" : "?") in Redis, this host knew \(known)")
        case -5 where !known.isEmpty: return .generation("voucher '\(voucher)' (generation \(known)) is gone from Redis")
        default: return nil
        }
    }

    // MARK: Region

    /// The region's generation, creating the marker with `proposed` if there is none yet.
    public func ensureRegion(proposed: String) async throws(RedisError) -> String {
        let r = try await eval(QuotaScripts.region, keys: [Self.region], args: [proposed])
        guard let g = r.string, !g.isEmpty else { throw RedisError.badReply("REGION: \(r)") }
        return g
    }

    /// The region's generation, or nil when Redis has no region marker (a new region, or one that lost its data).
    public func regionGeneration() async throws(RedisError) -> String? {
        let r = try await connection.send(["HGET", Self.region, "gen"])
        return r.string
    }

    /// Set the region marker to a new generation that succeeds `previous` (after a rehydration): sidecars
    /// that ran on `previous` adopt it; any other generation still fails them closed.
    public func setRegion(generation: String, previous: String) async throws(RedisError) {
        _ = try await connection.send(["HSET", Self.region, "gen", generation, "prev", previous,
                                       "rehydrated_ms", String(Int(Date().timeIntervalSince1970 * 1000))])
    }

    /// The region marker's generation and the one it succeeded (if it was rehydrated).
    public func regionMarker() async throws(RedisError) -> (generation: String?, previous: String?) {
        // An error reply (-LOADING while Redis reloads its AOF, -WRONGTYPE, an ACL refusal) is not "no marker":
        // read as one, a host would conclude that Redis lost its data and fail closed for good.
        let reply = try await connection.send(["HGETALL", Self.region])
        if case .error(let e) = reply { throw RedisError.server(e) }
        guard reply.array != nil else { throw RedisError.badReply("HGETALL \(Self.region): \(reply)") }
        let f = Self.fields(reply)
        return (f["gen"], f["prev"])
    }

    /// A voucher rebuilt from the ledger: its meta fields and the leases open when Redis lost them.
    public struct RehydratedVoucher: Sendable {
        public var id: String
        public var fields: [String: String]
        public var openLeases: [(id: String, host: String, granted: Int, restocked: Int, durability: String)]
        public init(id: String, fields: [String: String],
                    openLeases: [(id: String, host: String, granted: Int, restocked: Int, durability: String)]) {
            self.id = id
            self.fields = fields
            self.openLeases = openLeases
        }
    }

    /// Write a rebuilt voucher (refused if it exists). Returns false if it existed.
    public func rehydrate(_ v: RehydratedVoucher) async throws(RedisError) -> Bool {
        let payload: [String: Any] = [
            "fields": v.fields,
            "leases": v.openLeases.map {
                ["id": $0.id, "host": $0.host, "granted": $0.granted, "restocked": $0.restocked,
                 "mode": LeaseRecord.modeLetter($0.durability)] as [String: Any]
            },
        ]
        guard let data = try? JSONSerialization.data(withJSONObject: payload) else { throw RedisError.badReply("rehydrate payload") }
        let r = try await eval(QuotaScripts.rehydrate, keys: [Self.meta(v.id), Self.leases(v.id), Self.exp(v.id), Self.reqs(v.id)],
                               args: [String(decoding: data, as: UTF8.self)])
        guard r.int == 1 else { return false }
        _ = try await connection.send(["SADD", Self.vouchers, v.id])
        return true
    }

    /// Rebuild per-user counts (user → tokens held) and claim markers (claim id → qty) of a voucher.
    public func rehydrateUsers(voucher: String, groups: Int, counts: [String: Int], markers: [(claimID: String, user: String, qty: Int)])
        async throws(RedisError)
    {
        var cmds: [[String]] = []
        for (u, n) in counts where n > 0 {
            cmds.append(["HSET", Self.userGroupKey(voucher: voucher, user: u, groups: groups), u, String(n)])
        }
        for m in markers {
            let g = Self.userGroup(user: m.user, groups: groups)
            cmds.append(["HSET", Self.userMarkersKey(voucher: voucher, group: g), m.claimID, String(m.qty)])
        }
        var i = 0
        while i < cmds.count {
            _ = try await connection.send(batch: Array(cmds[i..<min(cmds.count, i + 1000)]))
            i += 1000
        }
    }

    /// A new random generation id.
    public static func newGeneration() -> String {
        (0..<4).map { _ in String(UInt32.random(in: 0...UInt32.max), radix: 16) }.joined()
    }

    /// `(setting, value)` pairs that make Redis forget acknowledged writes after a crash, or none.
    /// quotad needs `appendonly yes` and `appendfsync always` (docs/accounting.md).
    /// On a cluster every master and every replica is asked (a replica is promoted with its own settings
    /// when its master fails); the value then names the node. A replica that does not answer is not a
    /// problem here (its master's answer stands; it is asked again at the next start).
    public func durabilityProblems() async throws(RedisError) -> [(String, String)] {
        var out: [(String, String)] = []
        for (key, want) in [("appendonly", "yes"), ("appendfsync", "always")] {
            let replies = try await connection.sendToMasters(["CONFIG", "GET", key]).map { ($0.node, $0.reply, false) }
                + connection.sendToReplicas(["CONFIG", "GET", key]).map { ($0.node, $0.reply, true) }
            for (node, reply, isReplica) in replies {
                if isReplica, case .failure = reply { continue }
                let r = try reply.get()
                let a = r.array ?? []
                let v = a.count == 2 ? a[1].string ?? "" : "?"
                if v != want { out.append((key, connection.isCluster ? "\(v) on \(isReplica ? "replica " : "")\(node)" : v)) }
            }
        }
        return out
    }

    // MARK: Vouchers

    /// Create a voucher's pool in this region (and the region marker if there is none). Returns false if
    /// it exists already. With `regionGeneration` (the marker's, read by the caller) no marker is created;
    /// `status` and `policy` are written by the same script (never briefly active when created paused).
    public func createVoucher(id: String, limit: Int, perUser: Int, totalLimit: Int, region: String,
                              closedRetention: Duration = QuotaStore.closedRetention, startMs: Int64 = 0,
                              endMs: Int64 = 0, status: VoucherStatus = .active,
                              policy: LeasePolicyOverride = LeasePolicyOverride(),
                              regionGeneration: String? = nil, shards: Int = 1) async throws(RedisError) -> Bool {
        let gen: String
        if let regionGeneration { gen = regionGeneration } else { gen = try await ensureRegion(proposed: Self.newGeneration()) }
        func args(_ n: Int) -> [String] {
            [String(n), String(perUser), String(totalLimit), region, gen, String(closedRetention.milliseconds),
             String(startMs), String(endMs), status.rawValue] + Self.policyFields(policy)
        }
        guard shards > 1 else {
            let r = try await eval(QuotaScripts.create, keys: [Self.meta(id)], args: args(limit))
            guard r.array?.first?.int == 1 else { return false }
            _ = try await connection.send(["SADD", Self.vouchers, id])
            return true
        }
        if try await connection.send(["EXISTS", Self.meta(id)]).int == 1 { return false }
        let tags = try await placeShards(id: id, shards: shards)
        let parts = Self.split(limit, into: shards)
        // A sub-pool key that exists must be this create's own, left by a run cut short: checked for all of
        // them before anything is written.
        let found = try await connection.send(batch: tags.dropFirst().map { ["HGETALL", Self.meta($0)] })
        for (s, r) in zip(1..., found) {
            if case .error(let e) = r { throw RedisError.server(e) }
            let f = Self.fields(r)
            guard f.isEmpty || (f["shard_of"] == id && f["limit"] == String(parts[s]) && f["gen"] == gen && f["lease_seq"] == "0")
            else {
                throw RedisError.badReply("shard \(s) of voucher '\(id)' (\(Self.meta(tags[s]))) exists with other "
                                          + "contents; delete that key or create the voucher with the same limit and shards")
            }
        }
        // The sub-pools first, the voucher's own key last: until it exists the voucher does not (a create
        // cut short leaves sub-pools nobody reads, taken over by the re-run).
        for s in 1..<shards {
            let r = try await eval(QuotaScripts.create, keys: [Self.meta(tags[s])],
                                   args: args(parts[s]) + ["shard_of", id, "lease_prefix", "\(s)."])
            if r.array?.first?.int == 1 { continue }
            let f = Self.fields(try await connection.send(["HGETALL", Self.meta(tags[s])]))
            guard f["shard_of"] == id, f["limit"] == String(parts[s]), f["gen"] == gen, f["lease_seq"] == "0" else {
                throw RedisError.badReply("shard \(s) of voucher '\(id)' (\(Self.meta(tags[s]))) exists with other "
                                          + "contents; delete that key or create the voucher with the same limit and shards")
            }
        }
        let r = try await eval(QuotaScripts.create, keys: [Self.meta(id)],
                               args: args(parts[0]) + ["shards", String(shards),
                                                       "shard_tags", tags.dropFirst().joined(separator: ",")])
        guard r.array?.first?.int == 1 else { return false }
        shardCache.withLockedValue { $0[id] = tags }
        _ = try await connection.send(["SADD", Self.vouchers, id])
        return true
    }

    public func voucher(_ id: String) async throws(RedisError) -> VoucherRecord? {
        let r = try await connection.send(["HGETALL", Self.meta(id)])
        return try await withShards([id], [r])[0]
    }

    /// Several vouchers in one pipeline (nil for unknown ids).
    public func vouchers(_ ids: [String]) async throws(RedisError) -> [VoucherRecord?] {
        let rs = try await connection.send(batch: ids.map { ["HGETALL", Self.meta($0)] })
        return try await withShards(ids, rs)
    }

    /// Several vouchers and Redis's clock in one round trip (the clock read right after the records),
    /// recording this host's claim rate of each voucher in `rates` for the lease advisor.
    public func vouchersWithClock(_ ids: [String], host: String = "", rates: [String: Double] = [:])
        async throws(RedisError) -> (records: [VoucherRecord?], nowMs: Int64)
    {
        var batch = ids.map { ["HGETALL", Self.meta($0)] }
        batch.append(["TIME"])
        let rateIDs = rates.keys.sorted()
        if !host.isEmpty {
            for id in rateIDs {
                batch.append(["HSET", Self.rates(id), host, "\(Int(min(max(rates[id]!, 0), 1e15).rounded()))"])
                batch.append(["PEXPIRE", Self.rates(id), "60000"])
            }
        }
        let rs = try await connection.send(batch: batch)
        guard rs.count == batch.count, let t = rs[ids.count].array, t.count == 2, let sec = t[0].int, let us = t[1].int else {
            throw RedisError.badReply("TIME: \(rs.last ?? .null)")
        }
        return (try await withShards(ids, Array(rs.prefix(ids.count))), Int64(sec) * 1000 + Int64(us) / 1000)
    }

    /// A sidecar's heartbeat: Redis's clock, the live hosts of the region, the vouchers to warm now.
    public func heartbeat(host: String, warmup: Duration) async throws(RedisError)
        -> (nowMs: Int64, hosts: Int, warm: [String])
    {
        let r = try await eval(QuotaScripts.heartbeat, keys: [Self.hosts, Self.warmList],
                               args: [host, String(warmup.milliseconds)])
        guard let a = r.array, a.count == 3, let now = a[0].int, let hosts = a[1].int else {
            throw RedisError.badReply("HEARTBEAT: \(r)")
        }
        return (Int64(now), hosts, (a[2].array ?? []).compactMap(\.string))
    }

    /// Live sidecars of the region (heartbeat within 30 s).
    public func liveHosts() async throws(RedisError) -> Int {
        let now = try await nowMs()
        return try await connection.send(["ZCOUNT", Self.hosts, String(now - 30000), "+inf"]).int ?? 0
    }

    /// Put a voucher on the region's warm list: sidecars take its opening lease in the warm-up window
    /// before `atMs` (0: now). Returns when it is listed for.
    @discardableResult
    public func warm(voucher: String, atMs: Int64) async throws(RedisError) -> Int64 {
        let r = try await eval(QuotaScripts.warmAdd, keys: [Self.warmList], args: [voucher, String(atMs)])
        return Int64(r.int ?? 0)
    }

    /// Change a voucher's schedule (nil keeps a field; 0 clears it). A listed warm entry follows the start.
    /// Returns false for an unknown voucher.
    public func setSchedule(voucher: String, startMs: Int64?, endMs: Int64?) async throws(RedisError) -> Bool {
        var fields: [String] = []
        if let startMs { fields += ["start_ms", String(startMs)] }
        if let endMs { fields += ["end_ms", String(endMs)] }
        guard !fields.isEmpty else { return try await self.voucher(voucher) != nil }
        guard try await setFields(voucher, fields) else { return false }
        if let startMs, startMs > 0 {
            _ = try await connection.send(["ZADD", Self.warmList, "XX", String(startMs), voucher])
        }
        return true
    }

    /// Each host's recent claim rate of a voucher (tokens/s), as their sidecars last reported it.
    public func claimRates(voucher: String) async throws(RedisError) -> [String: Double] {
        Self.fields(try await connection.send(["HGETALL", Self.rates(voucher)])).compactMapValues { Double($0) }
    }

    public func voucherIDs() async throws(RedisError) -> [String] {
        let r = try await connection.send(["SMEMBERS", Self.vouchers])
        return (r.array ?? []).compactMap(\.string).sorted()
    }

    /// An `HGETALL` reply as a field → value map.
    public static func fields(_ r: RedisValue) -> [String: String] {
        let a = r.array ?? []
        var f: [String: String] = [:]
        var i = 0
        while i + 1 < a.count {
            if let k = a[i].string, let v = a[i + 1].string { f[k] = v }
            i += 2
        }
        return f
    }

    /// The lease policy fields of a voucher hash or of the region policy hash.
    static func policy(_ f: [String: String]) -> LeasePolicyOverride {
        LeasePolicyOverride(
            min: f["lease_min"].flatMap { Int($0) }, max: f["lease_max"].flatMap { Int($0) },
            targetSeconds: f["lease_target_seconds"].flatMap { Double($0) },
            ttlSeconds: f["lease_ttl"].flatMap { Double($0) }, opening: f["lease_opening"].flatMap { Int($0) })
    }

    static func record(id: String, _ r: RedisValue) -> VoucherRecord? { record(id: id, fields: fields(r)) }

    /// A voucher hash's fields as a record (nil: no fields, no voucher). `shardTags` is the voucher's shard
    /// tags (its own id first) when its hash lists sub-pools, else empty; the counters are this hash's own.
    static func record(id: String, fields f: [String: String]) -> VoucherRecord? {
        guard !f.isEmpty else { return nil }
        func int(_ k: String) -> Int { f[k].flatMap { Int($0) } ?? 0 }
        return VoucherRecord(
            id: id, limit: int("limit"), pool: int("pool"),
            status: f["state"].flatMap(VoucherStatus.init(rawValue:)) ?? .closed,
            perUser: int("per_user"), totalLimit: int("total_limit"), region: f["region"] ?? "",
            leased: int("leased"), returned: int("returned"), restocked: int("restocked"),
            archivedLeases: int("archived_leases"), archivedGranted: int("archived_granted"),
            archivedReturned: int("archived_returned"), archivedRestocked: int("archived_restocked"),
            leaseSeq: int("lease_seq"), generation: f["gen"] ?? "", starvedMs: int("starved_ms"),
            recallMs: int("recall_ms"), recallHost: f["recall_host"] ?? "", startMs: Int64(int("start_ms")),
            endMs: Int64(int("end_ms")), policy: policy(f), allocated: f["allocated"].flatMap { Int($0) },
            sent: int("sent"), received: int("received"),
            shardTags: f["shard_tags"].map { tags(id, $0) } ?? [])
    }

    /// Set a voucher's state. Returns false for an unknown voucher.
    public func setStatus(_ id: String, _ status: VoucherStatus) async throws(RedisError) -> Bool {
        try await setFields(id, ["state", status.rawValue])
    }

    // MARK: Lease policy

    static func policyFields(_ p: LeasePolicyOverride) -> [String] {
        var a: [String] = []
        if let v = p.min { a += ["lease_min", String(v)] }
        if let v = p.max { a += ["lease_max", String(v)] }
        if let v = p.targetSeconds { a += ["lease_target_seconds", String(v)] }
        if let v = p.ttlSeconds { a += ["lease_ttl", String(v)] }
        if let v = p.opening { a += ["lease_opening", String(v)] }
        return a
    }

    /// Region default (voucher nil) or per-voucher override. Returns false for an unknown voucher.
    public func setPolicy(_ p: LeasePolicyOverride, voucher: String?) async throws(RedisError) -> Bool {
        let fields = Self.policyFields(p)
        guard !fields.isEmpty else { return true }
        if let voucher {
            return try await setFields(voucher, fields)
        }
        _ = try await connection.send(["HSET", Self.policy] + fields)
        return true
    }

    public func regionPolicy() async throws(RedisError) -> LeasePolicyOverride {
        Self.policy(Self.fields(try await connection.send(["HGETALL", Self.policy])))
    }

    // MARK: Leases

    /// Take a lease for request `req` of up to `want` tokens (at least `need` if the pool has them),
    /// closing this host's leases `close` first, in the same round trip. The same `req` always gets
    /// the same lease (or nothing); `want` 0 only learns what `req` got.
    /// Throws ``RedisError/generation(_:)`` when Redis does not hold generation `gen` of the voucher.
    public func lease(voucher: String, host: String, req: String, want: Int, need: Int, ttl: Duration, gen: String,
                      durability: String = "", warmup: Duration = .seconds(10), close: [ReturnRequest] = [])
        async throws(RedisError) -> LeaseReply
    {
        let tags = try await shardTags(voucher)
        if tags.count > 1 {
            return try await shardedLease(voucher: voucher, tags: tags, host: host, req: req, want: want, need: need,
                                          ttl: ttl, gen: gen, durability: durability, warmup: warmup, close: close)
        }
        return try await leaseOne(voucher: voucher, tag: voucher, host: host, req: req, want: want, need: need, ttl: ttl,
                                  gen: gen, durability: durability, warmup: warmup, recall: true, close: close)
    }

    /// One LEASE script call on one pool (`tag`: the voucher id, or one of its shards' tags).
    func leaseOne(voucher: String, tag: String, host: String, req: String, want: Int, need: Int, ttl: Duration,
                  gen: String, durability: String, warmup: Duration, recall: Bool, close: [ReturnRequest])
        async throws(RedisError) -> LeaseReply
    {
        var args = [host, String(want), String(need), String(ttl.milliseconds), String(LeasePolicy.exhaustionFraction),
                    req, gen, LeaseRecord.modeLetter(durability), String(warmup.milliseconds), recall ? "1" : "0"]
        for c in close { args += [c.leaseId, String(c.returnedTotal)] }
        let r = try await eval(QuotaScripts.lease, keys: voucherKeys(tag), args: args)
        guard let a = r.array, let status = a.first?.int else { throw RedisError.badReply("LEASE: \(r)") }
        if let e = Self.generationError(a, known: gen, voucher: voucher) { throw e }
        switch status {
        case 1:
            guard a.count >= 5, let n = a[1].int, let id = a[2].string, let pool = a[3].int, let ttlMs = a[4].int else {
                throw RedisError.badReply("LEASE: \(r)")
            }
            return .granted(LeaseGrant(id: id, granted: n, ttl: .milliseconds(ttlMs), poolAfter: pool))
        case 0:
            let pool = a.count > 3 ? a[3].int ?? 0 : 0
            if pool > 0 || want == 0 { return .granted(LeaseGrant(id: "", granted: 0, ttl: .zero, poolAfter: pool)) }
            let held = a.count > 4 ? a[4].int ?? 0 : 0
            let abandoned = a.count > 5 ? a[5].int ?? 0 : 0
            return .refused(held > 0 ? .recalling(held: held) : .soldOut(abandoned: abandoned))
        case -5: return .refused(.unknownVoucher)
        case -6:
            let at = a.count > 2 ? Int64(a[2].int ?? 0) : 0
            let now = a.count > 3 ? Int64(a[3].int ?? 0) : 0
            if a.count > 1, a[1].string == "ended" {
                return .refused(.schedule("sale ended at \(formatUTC(ms: at)) (Redis time)"))
            }
            return .refused(.schedule("sale not started: opens at \(formatUTC(ms: at)) (Redis time), in "
                                      + formatSeconds(.milliseconds(at - now))))
        default:
            let s = a.count > 1 ? a[1].string.flatMap(VoucherStatus.init(rawValue:)) ?? .closed : .closed
            return .refused(.inactive(s))
        }
    }

    public func renew(voucher: String, lease: String, host: String, ttl: Duration, gen: String)
        async throws(RedisError) -> RenewOutcome
    {
        let r = try await eval(
            QuotaScripts.renew, keys: Array(voucherKeys(try await shardTag(voucher, lease: lease)).prefix(3)),
            args: [lease, String(ttl.milliseconds), host, gen])
        if let a = r.array, let e = Self.generationError(a, known: gen, voucher: voucher) { throw e }
        switch r.array?.first?.int {
        case 1: return .renewed(ttl: ttl)
        case -1: return .expired
        case 0: return .gone
        case -5: throw RedisError.badReply("RENEW: no voucher '\(voucher)'")
        default: throw RedisError.badReply("RENEW: \(r)")
        }
    }

    /// Give back a lease's unused tokens; `returnedTotal` is cumulative, so a retry changes nothing.
    public func giveBack(voucher: String, lease: String, host: String, returnedTotal: Int, close: Bool, gen: String)
        async throws(RedisError) -> ReturnReply
    {
        let r = try await eval(
            QuotaScripts.giveBack, keys: Array(voucherKeys(try await shardTag(voucher, lease: lease)).prefix(4)),
            args: [lease, String(returnedTotal), close ? "1" : "0", host, gen])
        if let a = r.array, let e = Self.generationError(a, known: gen, voucher: voucher) { throw e }
        guard let a = r.array, a.count == 2, let status = a[0].int, let applied = a[1].int else {
            throw RedisError.badReply("RETURN: \(r)")
        }
        switch status {
        case 1: return .applied(applied)
        case -1: return .notOurs
        case -5: throw RedisError.badReply("RETURN: no voucher '\(voucher)'")
        default: return .gone
        }
    }

    /// Put a cancelled claim's pool shares back into the pool through their leases' records, once per
    /// claim id. `tsMs` is when the claim was cancelled (restocks older than the horizon are refused).
    public func restock(voucher: String, claimID: String, tsMs: Int64, host: String, gen: String,
                        shares: [ClaimShare], horizon: Duration = QuotaStore.restockHorizon) async throws(RedisError)
        -> RestockReply
    {
        let tags = try await shardTags(voucher)
        if tags.count > 1 {
            // Per shard, once per claim id each: a restock cut short between shards is finished by its retry.
            var byShard: [Int: [ClaimShare]] = [:]
            for s in shares { byShard[Self.shardIndex(ofLease: s.leaseId), default: []].append(s) }
            var total = 0, applied = false, tooOld = false
            for (i, part) in byShard.sorted(by: { $0.key < $1.key }) {
                guard i < tags.count else { throw Self.unknownShard(voucher, lease: part[0].leaseId, shards: tags.count) }
                switch try await restockOne(voucher: voucher, tag: tags[i], claimID: claimID, tsMs: tsMs, host: host, gen: gen,
                                            shares: part, horizon: horizon) {
                case .applied(let n): total += n; applied = true
                case .alreadyDone: break
                case .tooOld: tooOld = true
                }
            }
            if applied { return .applied(total) }
            return tooOld ? .tooOld : .alreadyDone
        }
        return try await restockOne(voucher: voucher, tag: voucher, claimID: claimID, tsMs: tsMs, host: host, gen: gen,
                                    shares: shares, horizon: horizon)
    }

    private func restockOne(voucher: String, tag: String, claimID: String, tsMs: Int64, host: String, gen: String,
                            shares: [ClaimShare], horizon: Duration) async throws(RedisError) -> RestockReply {
        var args = [claimID, String(tsMs), String(horizon.milliseconds), host, gen]
        for s in shares { args += [s.leaseId, String(s.tokens)] }
        let r = try await eval(QuotaScripts.restock, keys: [Self.meta(tag), Self.leases(tag), Self.restocked(tag)],
                               args: args)
        guard let a = r.array, let status = a.first?.int else { throw RedisError.badReply("RESTOCK: \(r)") }
        if let e = Self.generationError(a, known: gen, voucher: voucher) { throw e }
        switch status {
        case 1: return .applied(a.count > 1 ? a[1].int ?? 0 : 0)
        case 0: return .alreadyDone
        case -5: throw RedisError.badReply("RESTOCK: no voucher '\(voucher)'")
        default: return .tooOld
        }
    }

    /// What a reclaim did.
    public enum ReclaimReply: Sendable, Equatable {
        /// Reclaimed: this many tokens went back to the pool.
        case reclaimed(Int)
        /// Not open any more (closed by its host, or reclaimed already): nothing changed.
        case notOpen(String)
        /// Its expiry plus the grace has not passed yet (Redis's clock): wait this long.
        case notDue(Duration)
        /// The sold count given is more than the lease can have sold (at most this): refused.
        case soldTooHigh(Int)
        case unknown
    }

    /// Reclaim an open, expired lease (reconciliation): give back `granted − restocked − sold`, or with
    /// `forfeit` nothing, and mark it reclaimed. `sold` must be proven complete by the caller.
    public func reclaim(voucher: String, lease: String, sold: Int, grace: Duration, forfeit: Bool) async throws(RedisError)
        -> ReclaimReply
    {
        let r = try await eval(QuotaScripts.reclaim, keys: Array(voucherKeys(try await shardTag(voucher, lease: lease)).prefix(4)),
                               args: [lease, String(sold), String(grace.milliseconds), forfeit ? "1" : "0"])
        guard let a = r.array, let st = a.first?.int else { throw RedisError.badReply("RECLAIM: \(r)") }
        switch st {
        case 1: return .reclaimed(a.count > 1 ? a[1].int ?? 0 : 0)
        case 0: return .notOpen(a.count > 1 ? a[1].string ?? "" : "")
        case -1: return .notDue(.milliseconds(a.count > 1 ? a[1].int ?? 0 : 0))
        case -2: return .soldTooHigh(a.count > 1 ? a[1].int ?? 0 : 0)
        default: return .unknown
        }
    }

    /// Redis's clock, in milliseconds.
    public func nowMs() async throws(RedisError) -> Int {
        let r = try await connection.send(["TIME"])
        guard let a = r.array, a.count == 2, let s = a[0].int, let us = a[1].int else { throw RedisError.badReply("TIME: \(r)") }
        return s * 1000 + us / 1000
    }

    // MARK: Per-user limits

    /// One per-user check.
    public struct UserCheck: Sendable {
        public var voucher: String
        public var group: Int
        public var limit: Int
        public var user: String
        public var qty: Int
        public var claimID: String
        public init(voucher: String, group: Int, limit: Int, user: String, qty: Int, claimID: String) {
            self.voucher = voucher
            self.group = group
            self.limit = limit
            self.user = user
            self.qty = qty
            self.claimID = claimID
        }
    }

    /// Decimal strings of small numbers, made once (limits, quantities and key indexes repeat).
    private static let smallNumbers: [String] = (0...1024).map { String($0) }
    private static func decimal(_ n: Int) -> String { n >= 0 && n <= 1024 ? smallNumbers[n] : String(n) }

    /// The claim markers of a user group: which claims were counted, and for how much.
    public static func userMarkersKey(voucher: String, group: Int) -> String { "quota:u:{\(voucher):\(group)}:m" }

    /// The outcome of one per-user check.
    public enum UserCheckOutcome: Sendable, Equatable {
        case counted
        case overLimit
        /// The claim's count was released before this check ran: it is never counted.
        case released
    }

    /// Check many claims at once, in one script call (one round trip). On a Redis Cluster the keys of
    /// one call must share a slot: there the batch is split by the slot of each check's group (one call
    /// per slot, pipelined per node, the nodes in parallel). Returns, per check in order, its outcome;
    /// throws when any check failed: `.unreachable` only when none was sent (``checkEachUser(_:)`` gives
    /// the checks that ran their answers when another part failed).
    public func checkUsers(_ checks: [UserCheck]) async throws(RedisError) -> [UserCheckOutcome] {
        let results = await checkEachUser(checks)
        var out: [UserCheckOutcome] = []
        var notSent: RedisError?
        var mayHaveRun: RedisError?
        for r in results {
            switch r {
            case .success(let o): out.append(o)
            case .failure(let e) where e.wasNotSent: if notSent == nil { notSent = e }
            case .failure(let e): if mayHaveRun == nil { mayHaveRun = e }
            }
        }
        if let mayHaveRun { throw mayHaveRun }
        if let notSent {
            if out.isEmpty { throw notSent }
            throw RedisError.timedOut("per-user checks: \(out.count) of \(checks.count) ran, the rest were not sent: \(notSent)")
        }
        return out
    }

    /// ``checkUsers(_:)``, per check: its outcome, or its own failure. On a Redis Cluster the checks of a
    /// master that failed fail (`.unreachable` if they were not sent, the connection's error if they may
    /// have run) while the checks that ran on the other masters keep their outcomes.
    public func checkEachUser(_ checks: [UserCheck]) async -> [Result<UserCheckOutcome, RedisError>] {
        guard !checks.isEmpty else { return [] }
        func one(_ checks: [UserCheck]) async -> [Result<UserCheckOutcome, RedisError>] {
            do throws(RedisError) { return try await checkUsersInOneCall(checks).map { .success($0) } } catch {
                return checks.map { _ in .failure(error) }
            }
        }
        guard connection.isCluster else { return await one(checks) }
        var bySlot: [Int: [Int]] = [:]
        var slots: [Int] = []
        for (i, c) in checks.enumerated() {
            let s = ClusterSlot.of(Self.userGroupKey(voucher: c.voucher, group: c.group))
            if bySlot[s] == nil { slots.append(s) }
            bySlot[s, default: []].append(i)
        }
        if slots.count == 1 { return await one(checks) }
        let parts = slots.map { bySlot[$0]!.map { checks[$0] } }
        let calls = parts.map(Self.userCheckCall)
        let replies = await evalEach(QuotaScripts.userCheck, calls: calls)
        var out = [Result<UserCheckOutcome, RedisError>](repeating: .failure(.badReply("USERCHECK: no reply")), count: checks.count)
        for (k, r) in replies.enumerated() {
            let outcomes: [Result<UserCheckOutcome, RedisError>]
            do throws(RedisError) { outcomes = try Self.userOutcomes(r.get(), count: parts[k].count).map { .success($0) } } catch {
                outcomes = parts[k].map { _ in .failure(error) }
            }
            for (j, i) in bySlot[slots[k]]!.enumerated() { out[i] = outcomes[j] }
        }
        return out
    }

    private func checkUsersInOneCall(_ checks: [UserCheck]) async throws(RedisError) -> [UserCheckOutcome] {
        let call = Self.userCheckCall(checks)
        let r = try await eval(QuotaScripts.userCheck, keys: call.keys, args: call.args)
        return try Self.userOutcomes(r, count: checks.count)
    }

    private static func userOutcomes(_ r: RedisValue, count: Int) throws(RedisError) -> [UserCheckOutcome] {
        guard let a = r.array, a.count == count else { throw RedisError.badReply("USERCHECK: \(r)") }
        return a.map {
            switch $0.int {
            case 1: return .counted
            case 2: return .released
            default: return .overLimit
            }
        }
    }

    /// The keys and arguments of one USERCHECK call over `checks`.
    private static func userCheckCall(_ checks: [UserCheck]) -> (keys: [String], args: [String]) {
        struct GroupID: Hashable {
            var voucher: String
            var group: Int
        }
        var keyIndex: [GroupID: Int] = [:]
        // A batch is nearly always one voucher's: its groups are looked up by number, without hashing
        // the voucher's name per check.
        let first = checks.first?.voucher
        var firstIndex: [Int: Int] = [:]
        var keys: [String] = []
        var args: [String] = []
        args.reserveCapacity(checks.count * 5)
        for c in checks {
            let idx: Int
            if c.voucher == first, let i = firstIndex[c.group] {
                idx = i
            } else if c.voucher != first, let i = keyIndex[GroupID(voucher: c.voucher, group: c.group)] {
                idx = i
            } else {
                keys.append(Self.userGroupKey(voucher: c.voucher, group: c.group))
                keys.append(Self.userMarkersKey(voucher: c.voucher, group: c.group))
                idx = keys.count / 2
                if c.voucher == first { firstIndex[c.group] = idx } else { keyIndex[GroupID(voucher: c.voucher, group: c.group)] = idx }
            }
            args.append(Self.decimal(idx))
            args.append(Self.decimal(c.limit))
            args.append(c.user)
            args.append(Self.decimal(c.qty))
            args.append(c.claimID)
        }
        return (keys, args)
    }

    /// Undo a claim's per-user count; returns the quantity released (0: nothing was counted).
    public func releaseUser(voucher: String, user: String, claimID: String, groups: Int) async throws(RedisError) -> Int {
        let g = Self.userGroup(user: user, groups: groups)
        return try await eval(QuotaScripts.userRelease,
                              keys: [Self.userGroupKey(voucher: voucher, group: g), Self.userMarkersKey(voucher: voucher, group: g)],
                              args: [user, claimID]).int ?? 0
    }

    /// A user's count for a voucher (what the per-user limit is checked against).
    public func userCount(voucher: String, user: String, groups: Int) async throws(RedisError) -> Int {
        try await connection.send(["HGET", Self.userGroupKey(voucher: voucher, user: user, groups: groups), user]).int ?? 0
    }

    // MARK: Transfers between regions

    private func transferReply(_ r: RedisValue, id: String, gen: String, voucher: String, what: String)
        throws(RedisError) -> TransferReply
    {
        guard let a = r.array, let st = a.first?.int else { throw RedisError.badReply("\(what): \(r)") }
        if let e = Self.generationError(a, known: gen.isEmpty ? "?" : gen, voucher: voucher) { throw e }
        func rec() throws(RedisError) -> TransferRecord {
            guard a.count > 1, let v = a[1].string, let t = TransferRecord.parse(id: id, v) else {
                throw RedisError.badReply("\(what): \(r)")
            }
            return t
        }
        switch st {
        case 1 where a.count > 1: return .applied(try rec())
        case 1: return .applied(TransferRecord(id: id, direction: .out, peer: "", amount: 0, state: .done, tsMs: 0, peerGeneration: ""))
        case 2: return .already(try rec())
        case 0: return .already(TransferRecord(id: id, direction: .out, peer: "", amount: 0, state: .done, tsMs: 0, peerGeneration: ""))
        case -7: return .poolTooSmall(a.count > 1 ? a[1].int ?? 0 : 0)
        case -4: return .unknown
        case -8: return .conflict(try rec())
        default: throw RedisError.badReply("\(what): \(r)")
        }
    }

    /// Step 1 of a transfer, in the source region: take `amount` from the pool and the allocation and
    /// record it `taken` (once per transfer id). `gen` is the voucher's generation here (checked). A
    /// sharded voucher's transfer is taken from shard `shard` (its record is kept with that shard's books).
    public func takeTransfer(voucher: String, id: String, to: String, amount: Int, gen: String, toGeneration: String,
                             shard: Int = 0) async throws(RedisError) -> TransferReply
    {
        var tag = voucher
        if shard > 0 {
            let tags = try await shardTags(voucher)
            guard shard < tags.count else { throw RedisError.badReply("voucher '\(voucher)' has no shard \(shard)") }
            tag = tags[shard]
        }
        let r = try await eval(QuotaScripts.transferTake, keys: [Self.meta(tag), Self.transfers(tag)],
                               args: [id, to, String(amount), gen, toGeneration])
        return try transferReply(r, id: id, gen: gen, voucher: voucher, what: "TRANSFER TAKE")
    }

    /// Step 2 of a transfer, in the destination region: add `amount` to the pool and the allocation and
    /// record it received (once per transfer id).
    public func giveTransfer(voucher: String, id: String, from: String, amount: Int, gen: String)
        async throws(RedisError) -> TransferReply
    {
        let r = try await eval(QuotaScripts.transferGive, keys: [Self.meta(voucher), Self.transfers(voucher)],
                               args: [id, from, String(amount), gen])
        return try transferReply(r, id: id, gen: gen, voucher: voucher, what: "TRANSFER GIVE")
    }

    /// Step 3 of a transfer, in the source region: mark it done.
    public func finishTransfer(voucher: String, id: String, gen: String) async throws(RedisError) -> TransferReply {
        let tag = try await transferShard(voucher: voucher, id: id) ?? voucher
        let r = try await eval(QuotaScripts.transferDone, keys: [Self.meta(tag), Self.transfers(tag)], args: [id, gen])
        return try transferReply(r, id: id, gen: gen, voucher: voucher, what: "TRANSFER DONE")
    }

    /// This region's transfer records of a voucher (oldest first).
    /// (Every shard's, for a sharded voucher.)
    public func transfers(voucher: String) async throws(RedisError) -> [TransferRecord] {
        let rs = try await connection.send(batch: try await shardTags(voucher).map { ["HGETALL", Self.transfers($0)] })
        var out: [TransferRecord] = []
        for r in rs {
            if case .error(let e) = r { throw RedisError.server(e) }
            out += Self.fields(r).compactMap { TransferRecord.parse(id: $0.key, $0.value) }
        }
        return out.sorted { ($0.tsMs, $0.id) < ($1.tsMs, $1.id) }
    }

    /// One transfer record of a voucher in this region, or nil.
    public func transfer(voucher: String, id: String) async throws(RedisError) -> TransferRecord? {
        guard let tag = try await transferShard(voucher: voucher, id: id) else { return nil }
        let r = try await connection.send(["HGET", Self.transfers(tag), id])
        if case .error(let e) = r { throw RedisError.server(e) }
        return r.string.flatMap { TransferRecord.parse(id: id, $0) }
    }

    /// The tag of the shard whose books record transfer `id` (nil: none does).
    private func transferShard(voucher: String, id: String) async throws(RedisError) -> String? {
        for tag in try await shardTags(voucher) {
            let r = try await connection.send(["HEXISTS", Self.transfers(tag), id])
            if case .error(let e) = r { throw RedisError.server(e) }
            if r.int == 1 { return tag }
        }
        return nil
    }

    /// A voucher's lease records (of every shard), by shard and lease number.
    public func leases(voucher: String) async throws(RedisError) -> [LeaseRecord] {
        let tags = try await shardTags(voucher)
        let rs = try await connection.send(batch: tags.map { ["HGETALL", Self.leases($0)] })
        return rs.flatMap { Self.fields($0).compactMap { LeaseRecord.parse(id: $0.key, $0.value) } }
            .sorted { Self.leaseOrder($0.id) < Self.leaseOrder($1.id) }
    }
}

/// Script SHA1s as returned by `SCRIPT LOAD`, shared by all callers of one store.
private final class ScriptCache: Sendable {
    private let box = NIOLockedValueBox<[String: String]>([:])
    func get(_ s: String) -> String? { box.withLockedValue { $0[s] } }
    func set(_ s: String, _ sha: String) { box.withLockedValue { $0[s] = sha } }
}

extension VoucherAudit {
    /// The books of a voucher as Redis holds them.
    /// With `transfers` (this region's transfer records), R5 checks them against `sent`/`received`; without,
    /// only R4 (`limit == allocated - sent + received`) is checked of the transfers.
    public init(record r: VoucherRecord, leases: [LeaseRecord], transfers: [TransferRecord]? = nil) {
        self.init(
            voucher: r.id, limit: r.limit, pool: r.pool, leased: r.leased, returned: r.returned, restocked: r.restocked,
            archivedGranted: r.archivedGranted, archivedReturned: r.archivedReturned, archivedRestocked: r.archivedRestocked,
            leases: leases.map {
                VoucherAudit.Lease(id: $0.id, host: $0.host, granted: $0.granted, returned: $0.returned,
                                   restocked: $0.restocked, state: $0.state.rawValue)
            })
        allocated = r.allocated
        sent = r.sent
        received = r.received
        totalLimit = r.totalLimit
        shards = r.shardRecords.enumerated().map { i, sub in
            VoucherAudit(record: sub, leases: leases.filter { QuotaStore.shardIndex(ofLease: $0.id) == i })
        }
        self.transfers = transfers?.map {
            VoucherAudit.Transfer(id: $0.id, outgoing: $0.direction == .out, peer: $0.peer, amount: $0.amount,
                                  done: $0.state == .done)
        }
    }
}
