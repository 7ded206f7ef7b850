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
    /// Tokens ever leased and ever returned (audit counters).
    public var leased: Int
    public var returned: Int
    /// When a lease last found the pool empty (Redis ms), or 0.
    public var starvedMs: Int
    public var policy: LeasePolicyOverride
}

/// A lease as recorded in Redis.
public struct LeaseRecord: Sendable, Equatable {
    public var id: String
    public var host: String
    public var granted: Int
    public var returned: Int
    public var expiresMs: Int
}

/// Answer of the LEASE script.
public enum LeaseReply: Sendable, Equatable {
    case granted(LeaseGrant)
    case refused(LeaseRefusal)
}

/// The quota authority of one region: typed calls over the Lua scripts.
///
/// Key layout (one hash tag per voucher): `quota:{ID}` (hash: limit, pool, state,
/// per_user, lease_seq, leased, returned, lease overrides), `quota:{ID}:leases`
/// (hash of lease records), `quota:{ID}:exp` (zset of lease expiries),
/// `quota:vouchers` (set of ids), `quota:policy` (hash: region lease defaults).
public final class QuotaStore: Sendable {
    public let connection: HiredisConnection
    private let shas = ScriptCache()

    public init(connection: HiredisConnection) {
        self.connection = connection
    }

    public convenience init(url: String, timeout: Duration = .seconds(1), logger: Logger) throws(RedisError) {
        self.init(connection: HiredisConnection(endpoint: try RedisEndpoint(url: url), timeout: timeout, logger: logger))
    }

    // MARK: Keys

    static func meta(_ id: String) -> String { "quota:{\(id)}" }
    static func leases(_ id: String) -> String { "quota:{\(id)}:leases" }
    static func exp(_ id: String) -> String { "quota:{\(id)}:exp" }
    static let vouchers = "quota:vouchers"
    static let policy = "quota:policy"

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

    private func scriptSHA(_ script: String) async throws(RedisError) -> String {
        if let cached = shas.get(script) { return cached }
        let r = try await connection.send(["SCRIPT", "LOAD", script])
        guard let s = r.string else { throw RedisError.badReply("SCRIPT LOAD: \(r)") }
        shas.set(script, s)
        return s
    }

    private func eval(_ script: String, keys: [String], args: [String]) async throws(RedisError) -> RedisValue {
        let sha = try await scriptSHA(script)
        let tail = [String(keys.count)] + keys + args
        var reply = try await connection.send(["EVALSHA", sha] + tail)
        if case .error(let e) = reply, e.hasPrefix("NOSCRIPT") {
            reply = try await connection.send(["EVAL", script] + tail)
        }
        if case .error(let e) = reply { throw RedisError.server(e) }
        return reply
    }

    private func voucherKeys(_ id: String) -> [String] { [Self.meta(id), Self.leases(id), Self.exp(id)] }

    // MARK: Vouchers

    /// Create a voucher's pool in this region. Returns false if it exists already.
    public func createVoucher(id: String, limit: Int, perUser: Int, totalLimit: Int, region: String)
        async throws(RedisError) -> Bool
    {
        let r = try await eval(
            QuotaScripts.create, keys: [Self.meta(id)],
            args: [String(limit), String(perUser), String(totalLimit), region])
        guard r.array?.first?.int == 1 else { return false }
        _ = try await connection.send(["SADD", Self.vouchers, id])
        return true
    }

    public func voucher(_ id: String) async throws(RedisError) -> VoucherRecord? {
        let r = try await connection.send(["HGETALL", Self.meta(id)])
        return Self.record(id: id, r)
    }

    /// Several vouchers in one pipeline (nil for unknown ids).
    public func vouchers(_ ids: [String]) async throws(RedisError) -> [VoucherRecord?] {
        let rs = try await connection.send(batch: ids.map { ["HGETALL", Self.meta($0)] })
        return zip(ids, rs).map { Self.record(id: $0, $1) }
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
            ttlSeconds: f["lease_ttl"].flatMap { Double($0) })
    }

    static func record(id: String, _ r: RedisValue) -> VoucherRecord? {
        let f = fields(r)
        guard !f.isEmpty else { return nil }
        func int(_ k: String) -> Int { f[k].flatMap { Int($0) } ?? 0 }
        return VoucherRecord(
            id: id, limit: int("limit"), pool: int("pool"),
            status: f["state"].flatMap(VoucherStatus.init(rawValue:)) ?? .closed,
            perUser: int("per_user"), totalLimit: int("total_limit"), region: f["region"] ?? "",
            leased: int("leased"), returned: int("returned"), starvedMs: int("starved_ms"),
            policy: policy(f))
    }

    /// Set a voucher's state. Returns false for an unknown voucher.
    public func setStatus(_ id: String, _ status: VoucherStatus) async throws(RedisError) -> Bool {
        try await eval(QuotaScripts.setFields, keys: [Self.meta(id)], args: ["state", status.rawValue]).int == 1
    }

    // MARK: Lease policy

    static func policyFields(_ p: LeasePolicyOverride) -> [String] {
        var a: [String] = []
        if let v = p.min { a += ["lease_min", String(v)] }
        if let v = p.max { a += ["lease_max", String(v)] }
        if let v = p.targetSeconds { a += ["lease_target_seconds", String(v)] }
        if let v = p.ttlSeconds { a += ["lease_ttl", String(v)] }
        return a
    }

    /// Region default (voucher nil) or per-voucher override. Returns false for an unknown voucher.
    public func setPolicy(_ p: LeasePolicyOverride, voucher: String?) async throws(RedisError) -> Bool {
        let fields = Self.policyFields(p)
        guard !fields.isEmpty else { return true }
        if let voucher {
            return try await eval(QuotaScripts.setFields, keys: [Self.meta(voucher)], args: fields).int == 1
        }
        _ = try await connection.send(["HSET", Self.policy] + fields)
        return true
    }

    public func regionPolicy() async throws(RedisError) -> LeasePolicyOverride {
        Self.policy(Self.fields(try await connection.send(["HGETALL", Self.policy])))
    }

    // MARK: Leases

    /// Take a lease of up to `want` tokens (at least `need` if the pool has them), closing the
    /// fully served leases `close` in the same round trip.
    public func lease(voucher: String, host: String, want: Int, need: Int, ttl: Duration, close: [String] = [])
        async throws(RedisError) -> LeaseReply
    {
        let r = try await eval(
            QuotaScripts.lease, keys: voucherKeys(voucher),
            args: [host, String(want), String(need), String(ttl.milliseconds), String(LeasePolicy.exhaustionFraction)]
                + close)
        guard let a = r.array, let status = a.first?.int else { throw RedisError.badReply("LEASE: \(r)") }
        switch status {
        case 1:
            guard a.count >= 5, let n = a[1].int, let id = a[2].string, let pool = a[3].int, let ttlMs = a[4].int else {
                throw RedisError.badReply("LEASE: \(r)")
            }
            return .granted(LeaseGrant(id: id, granted: n, ttl: .milliseconds(ttlMs), poolAfter: pool))
        case 0: return .refused(.soldOut)
        case -1: return .refused(.unknownVoucher)
        default:
            let s = a.count > 1 ? a[1].string.flatMap(VoucherStatus.init(rawValue:)) ?? .closed : .closed
            return .refused(.inactive(s))
        }
    }

    public func renew(voucher: String, lease: String, host: String, ttl: Duration) async throws(RedisError)
        -> RenewOutcome
    {
        let r = try await eval(
            QuotaScripts.renew, keys: voucherKeys(voucher), args: [lease, String(ttl.milliseconds), host])
        switch r.array?.first?.int {
        case 1: return .renewed(ttl: ttl)
        case -1: return .expired
        case 0: return .gone
        default: throw RedisError.badReply("RENEW: \(r)")
        }
    }

    /// Give back a lease's unused tokens; `returnedTotal` is cumulative. Returns the tokens put back now.
    public func giveBack(voucher: String, lease: String, host: String, returnedTotal: Int, close: Bool)
        async throws(RedisError) -> Int
    {
        let r = try await eval(
            QuotaScripts.giveBack, keys: voucherKeys(voucher),
            args: [lease, String(returnedTotal), close ? "1" : "0", host])
        guard let a = r.array, a.count == 2, let applied = a[1].int else { throw RedisError.badReply("RETURN: \(r)") }
        return applied
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

    /// Check many claims at once, in one script call (one round trip). On Redis Cluster the keys of
    /// one call must share a slot: there the batch would be split per slot (not built: single node).
    /// Returns, per check in order, whether it was counted (false: the user is at the limit).
    public func checkUsers(_ checks: [UserCheck]) async throws(RedisError) -> [Bool] {
        guard !checks.isEmpty else { return [] }
        struct GroupID: Hashable {
            var voucher: String
            var group: Int
        }
        var keyIndex: [GroupID: Int] = [:]
        var keys: [String] = []
        var args: [String] = []
        args.reserveCapacity(checks.count * 5)
        for c in checks {
            let g = GroupID(voucher: c.voucher, group: c.group)
            let idx: Int
            if let i = keyIndex[g] {
                idx = i
            } else {
                keys.append(Self.userGroupKey(voucher: c.voucher, group: c.group))
                idx = keys.count
                keyIndex[g] = idx
            }
            args += [Self.decimal(idx), Self.decimal(c.limit), c.user, Self.decimal(c.qty), c.claimID]
        }
        let r = try await eval(QuotaScripts.userCheck, keys: keys, args: args)
        guard let a = r.array, a.count == checks.count else { throw RedisError.badReply("USERCHECK: \(r)") }
        return a.map { $0.int == 1 }
    }

    /// Undo a claim's per-user count; returns the quantity released (0: nothing was counted).
    public func releaseUser(groupKey: String, user: String, claimID: String) async throws(RedisError) -> Int {
        try await eval(QuotaScripts.userRelease, keys: [groupKey], args: [user, claimID]).int ?? 0
    }

    /// Put a cancelled claim's tokens back into the pool (once per claim id).
    public func restock(voucher: String, claimID: String, qty: Int) async throws(RedisError) -> Int {
        try await eval(QuotaScripts.restock, keys: [Self.meta(voucher), "quota:{\(voucher)}:restocked"],
                       args: [claimID, String(qty)]).int ?? 0
    }

    public func leases(voucher: String) async throws(RedisError) -> [LeaseRecord] {
        let r = try await connection.send(["HGETALL", Self.leases(voucher)])
        var out: [LeaseRecord] = []
        for (id, v) in Self.fields(r) {
            let parts = v.split(separator: "|", omittingEmptySubsequences: false)
            if parts.count >= 4, let g = Int(parts[parts.count - 3]), let rt = Int(parts[parts.count - 2]),
                let e = Int(parts[parts.count - 1])
            {
                out.append(LeaseRecord(id: id, host: parts.dropLast(3).joined(separator: "|"), granted: g,
                                       returned: rt, expiresMs: e))
            }
        }
        return out.sorted { (Int($0.id) ?? 0) < (Int($1.id) ?? 0) }
    }
}

/// Script SHA1s as returned by `SCRIPT LOAD`, shared by all callers of one store.
private final class ScriptCache: Sendable {
    private let box = NIOLockedValueBox<[String: String]>([:])
    func get(_ s: String) -> String? { box.withLockedValue { $0[s] } }
    func set(_ s: String, _ sha: String) { box.withLockedValue { $0[s] = sha } }
}
