import QuotaCore

/// Configuration of one `quotad`, from one YAML file plus flag overrides.
/// Every property documents its YAML key and default.
public struct SidecarConfig: Sendable {
    /// `host_id`: this host's id in leases and claim ids. Default: the machine's hostname.
    public var hostID: String
    /// `region`: the region this host leases from. Required.
    public var region: String
    /// `regions.<name>.redis`: each region's Redis URL. The own region's is required.
    public var regions: [String: String]
    public var socket: Socket
    /// `durability`: `journal` (default: reply after the local fsync), `kafka` (reply after Kafka
    /// acknowledged with acks=all), `none` (reply at once; unsafe: a crash can lose answered claims).
    public var durability: Durability
    public var journal: JournalSettings
    public var kafka: KafkaSettings
    public var perUser: PerUserSettings
    /// `metrics.listen`: `HOST:PORT` of the Prometheus endpoint (`GET /metrics`). Default: off.
    public var metricsListen: (host: String, port: Int)?
    public var claims: ClaimSettings
    /// `lease.*`: this host's default lease policy (Redis region defaults and per-voucher overrides win).
    public var lease: LeasePolicy
    public var limits: Limits
    /// `redis_timeout_ms`: timeout of every Redis call. Default 1000.
    public var redisTimeout: Duration
    /// `redis.require_durable`: refuse to start unless the region's Redis has `appendonly yes` and
    /// `appendfsync always` (a Redis that can forget leases can oversell). Default true.
    public var requireDurableRedis = true
    /// `borrow`: when this region's pool of a voucher is exhausted (no host holds stock to recall), move
    /// unleased quota from other configured regions that still have some (`regions.<r>.redis`), in
    /// amounts bounded by the lease size, as transfer records (`quotactl rebalance`'s). Default false.
    public var borrow = false
    /// `avail_refresh`: seconds between refreshes of the pool size and voucher state. Default 1.
    public var availRefresh: Duration
    /// `policy_refresh`: seconds between refreshes of lease policy from Redis. Default 2.
    public var policyRefresh: Duration
    /// `event_loops`: threads serving the socket. Default: number of cores.
    public var eventLoops: Int
    /// `log_level`: trace|debug|info|notice|warning|error|critical. Default info.
    public var logLevel: String
    public var ledger: LedgerSettings

    /// `ledger.*`: what `quota-ledger` (and `quotactl reconcile|rehydrate`) use; quotad ignores it.
    public struct LedgerSettings: Sendable {
        /// `ledger.db`: `sqlite:///PATH` (embedded, the default) or `postgres://USER@HOST:PORT/DB`.
        /// Default `sqlite:///var/lib/quotad/ledger.db`.
        public var db = "sqlite:///var/lib/quotad/ledger.db"
        /// `ledger.batch`: messages written per transaction at most. Default 1000.
        public var batch = 1000
        /// `ledger.metrics_listen`: `HOST:PORT` of quota-ledger's Prometheus endpoint. Default: off.
        public var metricsListen: (host: String, port: Int)?
    }

    public typealias Durability = QuotaCore.Durability

    public struct Socket: Sendable {
        /// `socket.path`. Default `/run/quotad/quotad.sock`.
        public var path: String = "/run/quotad/quotad.sock"
        /// `socket.mode`: file mode, octal. Default 0660.
        public var mode: Int = 0o660
        /// `socket.allowed_uids`: peers allowed to connect (SO_PEERCRED); empty = any uid. Default [].
        public var allowedUIDs: [UInt32] = []
        /// `socket.allowed_gids`: peers' gids allowed to connect; empty = any gid. Default [].
        public var allowedGIDs: [UInt32] = []
        /// `socket.admin_uids`: uids allowed `DRAIN` besides root and quotad's own uid. Default [].
        public var adminUIDs: [UInt32] = []
        /// `socket.password`: when set, clients must `AUTH` (or `HELLO … AUTH`) with it before any command
        /// but `PING`-less setup (`HELLO`, `AUTH`, `QUIT`). Default: none (`AUTH` is accepted as is).
        public var password: String? = nil
    }

    public struct JournalSettings: Sendable {
        /// `journal.dir`. Default `/var/lib/quotad/journal`; optional with `durability: none`.
        public var dir: String? = nil
        /// `journal.max_bytes`: bound on unshipped journal bytes; over it claims get UNAVAILABLE. Default 1 GiB.
        public var maxBytes = 1 << 30
        /// `journal.segment_bytes`: roll segments past this size. Default 4 MiB.
        public var segmentBytes = 4 << 20
    }

    public struct KafkaSettings: Sendable {
        /// `kafka.brokers`: bootstrap servers. Required with `durability: kafka`; without it, `journal`
        /// keeps claims in the journal only (nothing is shipped, and the backlog bound applies).
        public var brokers: String? = nil
        /// `kafka.topic`. Default `quota.claims`.
        public var topic = "quota.claims"
        /// `kafka.properties`: any librdkafka property, passed through (idempotence and acks=all are forced).
        public var properties: [String: String] = [:]
        /// `kafka.unavailable_after_ms`: with no delivery progress for this long Kafka counts as down
        /// (`durability: kafka` then answers UNAVAILABLE). Default 2000.
        public var unavailableAfter: Duration = .seconds(2)
        /// `kafka.flush_timeout_ms`: how long shutdown waits for Kafka. Default 10000.
        public var flushTimeout: Duration = .seconds(10)
    }

    public struct PerUserSettings: Sendable {
        public typealias Mode = ClaimRules.PerUserMode
        public typealias OnUnavailable = ClaimRules.OnUnavailable
        /// `per_user.mode`: `central` (checked atomically in Redis across all hosts, default) or `local`
        /// (this host's own record only: for deployments that route each user to one host).
        public var mode: Mode = .central
        /// `per_user.on_unavailable`: when Redis cannot be asked, `fail-closed` (UNAVAILABLE, default) or
        /// `local` (this host's record only: a user may then exceed the limit across hosts).
        public var onUnavailable: OnUnavailable = .failClosed
        /// `per_user.groups`: hash slots a voucher's user counts are spread over. Default 64.
        public var groups = 64
    }

    public struct ClaimSettings: Sendable {
        /// `claims.dedupe_window_seconds`: `CLAIM … REQ id` answers are kept this long (and shipped journal
        /// segments with them, so they survive a restart). Default 60.
        public var dedupeWindow: Duration = .seconds(60)
        /// `claims.max_tracked`: claims remembered for `UNCLAIM` (oldest forgotten first). Default 1,000,000.
        public var maxTracked = 1_000_000
        /// `claims.require_req`: refuse `CLAIM` without `REQ` (a retried claim without a request id is a
        /// second claim). Default false.
        public var requireReq = false
        /// `claims.max_dedupe_entries`: `REQ` answers kept at most, over all vouchers. When it is full of
        /// answers still within their window, a new request id gets BUSY (a known one is still answered);
        /// answers past their window are forgotten first. Default 1,000,000.
        public var maxDedupeEntries = 1_000_000
        /// `claims.max_dedupe_bytes`: the same bound in bytes (request id + 160 per entry, estimated).
        /// Default 256 MiB.
        public var maxDedupeBytes = 256 << 20
    }

    public struct Limits: Sendable {
        /// `limits.max_connections`. Default 10000.
        public var maxConnections = 10_000
        /// `limits.max_pending_per_connection`: unanswered pipelined commands per connection before
        /// reading pauses. Default 1024.
        public var maxPendingPerConnection = 1024
        /// `limits.max_waiting_claims`: claims per voucher parked waiting for a lease; more get BUSY. Default 10000.
        public var maxWaitingClaims = 10_000
        /// `limits.claim_timeout_ms`: longest a claim waits for a lease before UNAVAILABLE. Default 2000.
        public var claimTimeout: Duration = .seconds(2)
        /// `limits.tail_wait_ms`: at the end of a sale, longest a claim waits for stock recalled from other
        /// hosts before UNAVAILABLE (it is never told SOLDOUT while another host may hold stock). Default 1000.
        public var tailWait: Duration = .seconds(1)
        /// `limits.max_qty`: largest QTY of one claim. Default 1000.
        public var maxQty = 1000
        /// `limits.max_vouchers`: vouchers tracked by this host. Default 100000.
        public var maxVouchers = 100_000
        /// `limits.max_unknown_vouchers`: unknown voucher ids remembered (for 1 s each, taking no voucher
        /// slot) so that repeated requests for them are answered NOVOUCHER without asking Redis. Default 10000.
        public var maxUnknownVouchers = 10_000
        /// `limits.max_output_bytes`: replies written to a connection and not yet taken by the peer; over it,
        /// quotad stops reading that connection until the peer has read half of it. Default 1 MiB.
        public var maxOutputBytes = 1 << 20
        /// `limits.max_background_jobs`: owed Redis work (restocks of cancellations, per-user releases) that
        /// piles up while Redis is unreachable; at this many, CLAIM and UNCLAIM get BUSY until Redis takes
        /// some (owed work is never dropped). Default 100000.
        public var maxBackgroundJobs = 100_000
        /// `limits.max_arguments`, `limits.max_argument_bytes`, `limits.max_frame_bytes`: RESP frame limits.
        /// Defaults 32, 4096, 65536.
        public var maxArguments = 32
        public var maxArgumentBytes = 4096
        public var maxFrameBytes = 65536
    }

    public init(hostID: String, region: String, regions: [String: String]) {
        self.hostID = hostID
        self.region = region
        self.regions = regions
        self.socket = Socket()
        self.durability = .journal
        self.journal = JournalSettings()
        self.kafka = KafkaSettings()
        self.perUser = PerUserSettings()
        self.metricsListen = nil
        self.claims = ClaimSettings()
        self.lease = LeasePolicy()
        self.limits = Limits()
        self.redisTimeout = .seconds(1)
        self.availRefresh = .seconds(1)
        self.policyRefresh = .seconds(2)
        self.eventLoops = 0
        self.logLevel = "info"
        self.ledger = LedgerSettings()
    }

    /// The own region's Redis URL.
    public var redisURL: String { regions[region] ?? "" }

    static let notBuilt: [String: String] = [:]

    static func hostPort(_ v: String, key: String) throws(ConfigError) -> (String, Int) {
        guard let colon = v.lastIndex(of: ":"), let port = Int(v[v.index(after: colon)...]), port > 0, port < 65536,
            colon > v.startIndex
        else { throw ConfigError(key: key, "must be HOST:PORT, e.g. 127.0.0.1:9464, got '\(v)'") }
        return (String(v[..<colon]), port)
    }

    /// Parse YAML text, apply `overrides` (dotted key → value), validate.
    public static func load(yaml: String, overrides: [(String, String)] = [], defaultHostID: String)
        throws(ConfigError) -> SidecarConfig
    {
        var root = try ConfigNode.parse(yaml: yaml)
        for (k, v) in overrides {
            let parts = k.split(separator: ".").map(String.init)
            guard !parts.isEmpty else { throw ConfigError(key: k, "empty key in override") }
            // A flow list (`--set socket.allowed_uids=[1000,1001]`) is a list; anything else a scalar.
            var value = ConfigNode.scalar(v)
            if v.hasPrefix("["), case .list(let items)? = try? ConfigNode.parse(yaml: v) { value = .list(items) }
            try root.set(path: parts, value: value)
        }
        return try decode(root, defaultHostID: defaultHostID)
    }

    static func decode(_ root: ConfigNode, defaultHostID: String) throws(ConfigError) -> SidecarConfig {
        var r = try ConfigReader(root)
        guard let region = try r.string("region"), !region.isEmpty else {
            throw ConfigError(key: "region", "is required (the region this host leases from)")
        }
        // The region opens every claim id (`region.host.boot.seq`), which `UNCLAIM` takes up to 256 bytes, and
        // is written into Redis records and Kafka events: the host id's alphabet and bound.
        guard region.utf8.count <= 64, region.utf8.allSatisfy(Self.isIDByte) else {
            throw ConfigError(key: "region", "must be 1-64 of A-Z a-z 0-9 _ . : - (got '\(region.prefix(80))')")
        }
        var regions: [String: String] = [:]
        var rr = try r.child("regions")
        for name in rr.keys {
            var one = try rr.child(name)
            guard let url = try one.string("redis"), !url.isEmpty else {
                throw ConfigError(key: one.key("redis"), "is required")
            }
            let tcp = url.hasPrefix("redis://") && url.count > "redis://".count
            let unix = (url.hasPrefix("unix:///") && url.count > "unix:///".count) || (url.hasPrefix("/") && url.count > 1)
            // A Redis Cluster: seed nodes, each HOST:PORT, unix:///PATH or /PATH.
            let cluster = url.hasPrefix("redis-cluster://")
                && url.dropFirst("redis-cluster://".count).split(separator: ",", omittingEmptySubsequences: false).allSatisfy {
                    let seed = String($0.filter { $0 != " " })
                    if seed.hasPrefix("/") || seed.hasPrefix("unix:///") { return seed.count > 1 && seed != "unix:///" }
                    let hp = seed.split(separator: ":", omittingEmptySubsequences: false)
                    return hp.count == 2 && !hp[0].isEmpty && (Int(hp[1]).map { $0 > 0 && $0 < 65536 } ?? false)
                }
            guard tcp || unix || cluster else {
                throw ConfigError(key: one.key("redis"),
                                  "must be redis://HOST:PORT, unix:///PATH or redis-cluster://HOST:PORT,HOST:PORT,…, got '\(url)'")
            }
            regions[name] = url
            try one.finish()
        }
        try rr.finish()
        guard regions[region] != nil else {
            throw ConfigError(key: "regions.\(region).redis", "is required: the Redis of this host's region '\(region)'")
        }
        let host = try r.string("host_id") ?? defaultHostID
        // The id is written into Redis records (`host|…`), recall messages (`quota:{ID}|host`) and claim
        // ids (`host.boot.seq`): the characters of a voucher id keep every one of them parseable.
        guard !host.isEmpty, host.utf8.count <= 64, host.utf8.allSatisfy(Self.isIDByte) else {
            throw ConfigError(key: "host_id", "must be 1-64 of A-Z a-z 0-9 _ . : - (got '\(host.prefix(80))')")
        }
        var c = SidecarConfig(hostID: host, region: region, regions: regions)

        var s = try r.child("socket")
        if let p = try s.string("path") {
            guard p.hasPrefix("/"), p.utf8.count < 108 else {
                throw ConfigError(key: "socket.path", "must be an absolute path shorter than 108 bytes")
            }
            c.socket.path = p
        }
        if let m = try s.string("mode") {
            guard let v = Int(m.hasPrefix("0o") ? String(m.dropFirst(2)) : m, radix: 8), v >= 0, v <= 0o777 else {
                throw ConfigError(key: "socket.mode", "must be an octal file mode like 0660, got '\(m)'")
            }
            c.socket.mode = v
        }
        c.socket.allowedUIDs = try s.intList("allowed_uids") ?? []
        c.socket.allowedGIDs = try s.intList("allowed_gids") ?? []
        c.socket.adminUIDs = try s.intList("admin_uids") ?? []
        if let v = try s.string("password") {
            guard !v.isEmpty, v.utf8.count <= 512 else { throw ConfigError(key: "socket.password", "must be 1-512 bytes") }
            c.socket.password = v
        }
        try s.finish()

        if let d = try r.string("durability") {
            guard let v = Durability(rawValue: d) else {
                throw ConfigError(key: "durability", "must be one of journal, kafka, none; got '\(d)'")
            }
            c.durability = v
        }
        var j = try r.child("journal")
        if let v = try j.string("dir") {
            guard v.hasPrefix("/") else { throw ConfigError(key: "journal.dir", "must be an absolute path") }
            c.journal.dir = v
        }
        if let v = try j.int("max_bytes", min: 4096) { c.journal.maxBytes = v }
        if let v = try j.int("segment_bytes", min: 4096, max: 1 << 30) { c.journal.segmentBytes = v }
        try j.finish()
        if c.durability != .none && c.journal.dir == nil { c.journal.dir = "/var/lib/quotad/journal" }
        var k = try r.child("kafka")
        if let v = try k.string("brokers") {
            guard !v.isEmpty else { throw ConfigError(key: "kafka.brokers", "must not be empty") }
            c.kafka.brokers = v
        }
        if let v = try k.string("topic") {
            guard !v.isEmpty, v.count <= 249 else { throw ConfigError(key: "kafka.topic", "must be 1-249 characters") }
            c.kafka.topic = v
        }
        if let node = k.node("properties") {
            guard case .map(let m) = node else { throw ConfigError(key: "kafka.properties", "must be a mapping") }
            for (pk, pv) in m {
                guard case .scalar(let sv) = pv else {
                    throw ConfigError(key: "kafka.properties.\(pk)", "must be a string")
                }
                c.kafka.properties[pk] = sv
            }
        }
        if let v = try k.int("unavailable_after_ms", min: 100) { c.kafka.unavailableAfter = .milliseconds(v) }
        if let v = try k.int("flush_timeout_ms", min: 0) { c.kafka.flushTimeout = .milliseconds(v) }
        try k.finish()

        var l = try r.child("lease")
        var p = LeasePolicy()
        if let v = try l.int("min", min: 1) { p.min = v }
        if let v = try l.int("max", min: 1) { p.max = v }
        if let v = try l.double("target_seconds", min: 0.001) { p.targetSeconds = v }
        var marginSet = false
        if let v = try l.double("ttl", min: 1, max: 3600) { p.ttl = .milliseconds(Int64(v * 1000)) }
        if let v = try l.double("safety_margin", min: 0.01) {
            p.safetyMargin = .milliseconds(Int64(v * 1000))
            marginSet = true
        }
        if !marginSet { p.safetyMargin = LeasePolicy.defaultMargin(ttl: p.ttl) }
        if let v = try l.double("low_watermark", min: 0, max: 0.99) { p.lowWatermark = v }
        if let v = try l.double("idle_return_seconds", min: 0.1) { p.idleReturn = .milliseconds(Int64(v * 1000)) }
        if let v = try l.double("warmup_seconds", min: 0, max: 3600) { p.warmup = .milliseconds(Int64(v * 1000)) }
        if let v = try l.int("opening", min: 1) { p.opening = v }
        try l.finish()
        guard p.max >= p.min else { throw ConfigError(key: "lease.max", "must be >= lease.min (\(p.min))") }
        guard p.safetyMargin < p.ttl else { throw ConfigError(key: "lease.safety_margin", "must be < lease.ttl") }
        c.lease = p

        var lim = try r.child("limits")
        if let v = try lim.int("max_connections", min: 1) { c.limits.maxConnections = v }
        if let v = try lim.int("max_pending_per_connection", min: 1) { c.limits.maxPendingPerConnection = v }
        if let v = try lim.int("max_waiting_claims", min: 0) { c.limits.maxWaitingClaims = v }
        if let v = try lim.int("claim_timeout_ms", min: 1) { c.limits.claimTimeout = .milliseconds(v) }
        if let v = try lim.int("tail_wait_ms", min: 0, max: 60_000) { c.limits.tailWait = .milliseconds(v) }
        if let v = try lim.int("max_qty", min: 1) { c.limits.maxQty = v }
        if let v = try lim.int("max_vouchers", min: 1) { c.limits.maxVouchers = v }
        if let v = try lim.int("max_unknown_vouchers", min: 0, max: 10_000_000) { c.limits.maxUnknownVouchers = v }
        if let v = try lim.int("max_output_bytes", min: 4096, max: 1 << 30) { c.limits.maxOutputBytes = v }
        if let v = try lim.int("max_background_jobs", min: 1) { c.limits.maxBackgroundJobs = v }
        if let v = try lim.int("max_arguments", min: 4, max: 1024) { c.limits.maxArguments = v }
        if let v = try lim.int("max_argument_bytes", min: 64, max: 1 << 20) { c.limits.maxArgumentBytes = v }
        if let v = try lim.int("max_frame_bytes", min: 256, max: 16 << 20) { c.limits.maxFrameBytes = v }
        try lim.finish()

        var pu = try r.child("per_user")
        if let v = try pu.string("mode") {
            guard let m = PerUserSettings.Mode(rawValue: v) else {
                throw ConfigError(key: "per_user.mode", "must be central or local, got '\(v)'")
            }
            c.perUser.mode = m
        }
        if let v = try pu.string("on_unavailable") {
            guard let m = PerUserSettings.OnUnavailable(rawValue: v) else {
                throw ConfigError(key: "per_user.on_unavailable", "must be fail-closed or local, got '\(v)'")
            }
            c.perUser.onUnavailable = m
        }
        if let v = try pu.int("groups", min: 1, max: 16384) { c.perUser.groups = v }
        try pu.finish()
        var mt = try r.child("metrics")
        if let v = try mt.string("listen") { c.metricsListen = try hostPort(v, key: "metrics.listen") }
        try mt.finish()
        var lg = try r.child("ledger")
        if let v = try lg.string("db") {
            let sqlite = v.hasPrefix("sqlite:///") && v.count > "sqlite:///".count
            let pg = v.hasPrefix("postgres://") || v.hasPrefix("postgresql://")
            guard sqlite || pg else {
                throw ConfigError(key: "ledger.db", "must be sqlite:///ABSOLUTE/PATH or postgres://USER@HOST:PORT/DB, got '\(v)'")
            }
            c.ledger.db = v
        }
        if let v = try lg.int("batch", min: 1, max: 100_000) { c.ledger.batch = v }
        if let v = try lg.string("metrics_listen") { c.ledger.metricsListen = try hostPort(v, key: "ledger.metrics_listen") }
        try lg.finish()
        var cl = try r.child("claims")
        if let v = try cl.double("dedupe_window_seconds", min: 0, max: 86400) {
            c.claims.dedupeWindow = .milliseconds(Int64(v * 1000))
        }
        if let v = try cl.int("max_tracked", min: 0) { c.claims.maxTracked = v }
        if let v = try cl.bool("require_req") { c.claims.requireReq = v }
        if let v = try cl.int("max_dedupe_entries", min: 1) { c.claims.maxDedupeEntries = v }
        if let v = try cl.int("max_dedupe_bytes", min: 4096) { c.claims.maxDedupeBytes = v }
        try cl.finish()
        if let v = try r.int("redis_timeout_ms", min: 10, max: 60_000) { c.redisTimeout = .milliseconds(v) }
        if let v = try r.bool("borrow") { c.borrow = v }
        var rd = try r.child("redis")
        if let v = try rd.bool("require_durable") { c.requireDurableRedis = v }
        try rd.finish()
        if let v = try r.double("avail_refresh", min: 0.05, max: 60) { c.availRefresh = .milliseconds(Int64(v * 1000)) }
        if let v = try r.double("policy_refresh", min: 0.1, max: 600) {
            c.policyRefresh = .milliseconds(Int64(v * 1000))
        }
        if let v = try r.int("event_loops", min: 0, max: 256) { c.eventLoops = v }
        if let v = try r.string("log_level") {
            let levels = ["trace", "debug", "info", "notice", "warning", "error", "critical"]
            guard levels.contains(v) else {
                throw ConfigError(key: "log_level", "must be one of \(levels.joined(separator: ", "))")
            }
            c.logLevel = v
        }
        try r.finish(notBuilt: notBuilt)
        if c.borrow && !c.regions.contains(where: { $0.key != c.region && $0.value != c.redisURL }) {
            throw ConfigError(key: "borrow", "needs another region with its own Redis under regions to borrow from")
        }
        if c.durability == .kafka && c.kafka.brokers == nil {
            throw ConfigError(key: "kafka.brokers", "is required with durability: kafka")
        }
        return c
    }
}

extension SidecarConfig {
    /// A byte allowed in a host id: A-Z a-z 0-9 _ . : - (the voucher id alphabet).
    static func isIDByte(_ c: UInt8) -> Bool {
        (c >= 48 && c <= 57) || (c >= 65 && c <= 90) || (c >= 97 && c <= 122) || c == 95 || c == 46 || c == 58 || c == 45
    }
}
