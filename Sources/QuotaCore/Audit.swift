/// The accounting identity of one voucher in one region, checked (docs/accounting.md).
///
/// Redis alone must satisfy, at every moment:
/// - (R1) `pool + leased - returned - restocked == limit`, and `pool >= 0`;
/// - (R2) the lease records (open and closed) plus the archived counters sum to `leased`,
///   `returned` and `restocked`;
/// - (R3) per lease, `returned + restocked <= granted`.
///
/// With transfers between regions (`quotactl rebalance`; the region's allocation is `limit`):
/// - (R4) `limit == allocated - sent + received` (the allocation it was created with, less what it sent,
///   plus what it received);
/// - (R5) this region's transfer records sum to `sent` (outgoing) and `received` (incoming).
///
/// Across the regions of a voucher (``globalProblems(_:)``), a transfer taken from its source and not yet
/// received by its destination is *in flight*:
/// - (G1) `Σ region allocations + in flight == the voucher's limit` (`total_limit`);
/// - (G2) every received transfer was taken from its source with the same amount, and every transfer its
///   source marked done was received.
///
/// With a host's journal (its ``LeaseLedger`` folded to the end):
/// - (J1) every lease the journal holds open exists in Redis, is this host's, with the same `granted`;
/// - (J2) a lease the journal holds open that Redis has closed was closed with `returned == granted - served`
///   (the journal's `leaseClosed` record may not have been written before a crash);
/// - (J3) when the host is stopped, no lease of it is still open in Redis unless its journal says why
///   (written under `durability: none`, or recovery has not run yet): otherwise its tokens are stranded.
///
/// With the claims (net tokens claimed, from Kafka or the journals) and no host running:
/// - (C1) `net claimed <= sold through closed leases + outstanding in open ones` (nothing created:
///   never oversold), and `net claimed >= sold through closed leases` (nothing lost); with every lease
///   closed, `pool + net claimed == limit`.
public struct VoucherAudit: Sendable {
    public struct Lease: Sendable, Equatable {
        public var id: String
        public var host: String
        public var granted: Int
        public var returned: Int
        public var restocked: Int
        /// `o` open, `c` closed by its host, `x` reclaimed.
        public var state: String
        public init(id: String, host: String, granted: Int, returned: Int, restocked: Int, state: String) {
            self.id = id
            self.host = host
            self.granted = granted
            self.returned = returned
            self.restocked = restocked
            self.state = state
        }
        /// Tokens that left the pool through this lease and did not come back.
        public var outstanding: Int { granted - returned - restocked }
    }

    /// A transfer record of this region (R5, G1, G2).
    public struct Transfer: Sendable, Equatable {
        public var id: String
        /// This region gave it (its source's record); else received it.
        public var outgoing: Bool
        /// The other region.
        public var peer: String
        public var amount: Int
        /// An outgoing transfer marked done by its source (incoming records are always done).
        public var done: Bool
        public init(id: String, outgoing: Bool, peer: String, amount: Int, done: Bool) {
            self.id = id
            self.outgoing = outgoing
            self.peer = peer
            self.amount = amount
            self.done = done
        }
    }

    public var voucher: String
    /// This region's allocation.
    public var limit: Int
    public var pool: Int
    public var leased: Int
    public var returned: Int
    public var restocked: Int
    public var archivedGranted: Int
    public var archivedReturned: Int
    public var archivedRestocked: Int
    public var leases: [Lease]
    /// The allocation the region was created with (nil: not recorded; then no transfer may have touched it).
    public var allocated: Int?
    /// Quota sent to / received from other regions by transfers.
    public var sent = 0
    public var received = 0
    /// The voucher's limit across all regions (0: unknown).
    public var totalLimit = 0
    /// This region's transfer records; nil when not read (R5 is then not checked).
    public var transfers: [Transfer]?
    /// A sharded voucher's books per shard (each must balance by itself, not only their sums).
    public var shards: [VoucherAudit] = []

    public init(voucher: String, limit: Int, pool: Int, leased: Int, returned: Int, restocked: Int,
                archivedGranted: Int = 0, archivedReturned: Int = 0, archivedRestocked: Int = 0, leases: [Lease]) {
        self.voucher = voucher
        self.limit = limit
        self.pool = pool
        self.leased = leased
        self.returned = returned
        self.restocked = restocked
        self.archivedGranted = archivedGranted
        self.archivedReturned = archivedReturned
        self.archivedRestocked = archivedRestocked
        self.leases = leases
    }

    /// Tokens in open leases not given back (held by hosts, served or not).
    public var openOutstanding: Int { leases.filter { $0.state == "o" }.reduce(0) { $0 + $1.outstanding } }
    /// Tokens that left the pool for good through closed or reclaimed leases: what was sold through them.
    public var closedOutstanding: Int {
        leases.filter { $0.state != "o" }.reduce(0) { $0 + $1.outstanding }
            + archivedGranted - archivedReturned - archivedRestocked
    }

    /// Problems with Redis's own books (R1–R3); empty when they balance.
    public func redisProblems() -> [String] {
        var out: [String] = []
        if pool < 0 { out.append("R1 \(voucher): pool is negative (\(pool))") }
        let sum = pool + leased - returned - restocked
        if sum != limit {
            out.append("R1 \(voucher): pool \(pool) + leased \(leased) - returned \(returned) - restocked \(restocked) = \(sum), limit is \(limit)")
        }
        let g = leases.reduce(0) { $0 + $1.granted } + archivedGranted
        let r = leases.reduce(0) { $0 + $1.returned } + archivedReturned
        let k = leases.reduce(0) { $0 + $1.restocked } + archivedRestocked
        if g != leased { out.append("R2 \(voucher): lease records grant \(g), but leased is \(leased)") }
        if r != returned { out.append("R2 \(voucher): lease records returned \(r), but returned is \(returned)") }
        if k != restocked { out.append("R2 \(voucher): lease records restocked \(k), but restocked is \(restocked)") }
        for l in leases where l.returned + l.restocked > l.granted || l.returned < 0 || l.restocked < 0 {
            out.append("R3 \(voucher) lease \(l.id): returned \(l.returned) + restocked \(l.restocked) > granted \(l.granted)")
        }
        out += transferProblems()
        for (i, s) in shards.enumerated() { out += s.redisProblems().map { "shard \(i): \($0)" } }
        return out
    }

    /// R4 and R5: the allocation against what it was created with and what transfers moved.
    public func transferProblems() -> [String] {
        var out: [String] = []
        if let allocated {
            if allocated - sent + received != limit {
                out.append("R4 \(voucher): allocation \(limit), but created \(allocated) - sent \(sent) + received \(received) "
                    + "= \(allocated - sent + received)")
            }
        } else if sent != 0 || received != 0 {
            out.append("R4 \(voucher): transfers moved quota (sent \(sent), received \(received)) but the created allocation is not recorded")
        }
        if let transfers {
            let o = transfers.filter(\.outgoing).reduce(0) { $0 + $1.amount }
            let i = transfers.filter { !$0.outgoing }.reduce(0) { $0 + $1.amount }
            if o != sent { out.append("R5 \(voucher): outgoing transfer records sum to \(o), but sent is \(sent)") }
            if i != received { out.append("R5 \(voucher): incoming transfer records sum to \(i), but received is \(received)") }
        }
        return out
    }

    /// Outgoing transfers of this region that its destination has not received (`received`: the ids each
    /// region has received, by region name; a destination not in it is treated as not having received).
    public func inFlight(received: [String: Set<String>]) -> [Transfer] {
        (transfers ?? []).filter { $0.outgoing && !(received[$0.peer]?.contains($0.id) ?? false) }
    }

    /// G1 and G2 across every region of a voucher (each with its transfer records read). Returns the tokens
    /// in flight (taken from a source, not yet received) and the problems; empty when the regions balance.
    public static func globalProblems(_ regions: [(region: String, books: VoucherAudit)]) -> (inFlight: Int, problems: [String]) {
        guard let first = regions.first else { return (0, []) }
        let voucher = first.books.voucher
        var out: [String] = []
        let byName = Dictionary(regions.map { ($0.region, $0.books) }, uniquingKeysWith: { a, _ in a })
        var receivedIDs: [String: Set<String>] = [:]
        for (name, b) in regions { receivedIDs[name] = Set((b.transfers ?? []).filter { !$0.outgoing }.map(\.id)) }
        var inFlight = 0
        for (name, b) in regions {
            for t in b.inFlight(received: receivedIDs) {
                inFlight += t.amount
                if t.done { out.append("G2 \(voucher) transfer \(t.id): \(name) marked it done, but \(t.peer) never received it (\(t.amount) lost)") }
                if byName[t.peer] == nil { out.append("G2 \(voucher) transfer \(t.id): \(name) sent \(t.amount) to \(t.peer), a region not configured here") }
            }
            for t in b.transfers ?? [] where !t.outgoing {
                guard let src = byName[t.peer] else {
                    out.append("G2 \(voucher) transfer \(t.id): \(name) received \(t.amount) from \(t.peer), a region not configured here")
                    continue
                }
                let o = src.transfers?.first { $0.id == t.id && $0.outgoing }
                if let o {
                    if o.amount != t.amount || o.peer != name {
                        out.append("G2 \(voucher) transfer \(t.id): \(t.peer) sent \(o.amount) to \(o.peer), \(name) received \(t.amount)")
                    }
                } else {
                    out.append("G2 \(voucher) transfer \(t.id): \(name) received \(t.amount) from \(t.peer), which never took it (created)")
                }
            }
        }
        let totals = Set(regions.map(\.books.totalLimit).filter { $0 > 0 })
        if totals.count > 1 {
            out.append("G1 \(voucher): the regions disagree on the voucher's limit: \(totals.sorted())")
        } else if let total = totals.first {
            let sum = regions.reduce(0) { $0 + $1.books.limit }
            if sum + inFlight != total {
                out.append("G1 \(voucher): region allocations \(sum) + in flight \(inFlight) = \(sum + inFlight), but the limit is \(total)")
            }
        }
        return (inFlight, out)
    }

    /// Problems between Redis and one host's journal (J1–J3). `hostStopped`: the host is not running.
    public func journalProblems(host: String, ledger: LeaseLedger, hostStopped: Bool) -> [String] {
        var out: [String] = []
        let byID = Dictionary(leases.map { ($0.id, $0) }, uniquingKeysWith: { a, _ in a })
        let mine = ledger.openAccounts.filter { $0.voucher == voucher }
        for a in mine {
            guard let l = byID[a.lease] else {
                out.append("J1 \(voucher) lease \(a.lease): open in \(host)'s journal, unknown to Redis")
                continue
            }
            if l.host != host { out.append("J1 \(voucher) lease \(a.lease): journal of \(host), Redis says host \(l.host)") }
            if l.granted != a.granted {
                out.append("J1 \(voucher) lease \(a.lease): journal says granted \(a.granted), Redis \(l.granted)")
            }
            if l.state == "c" && a.trusted && l.returned != a.unserved {
                out.append("J2 \(voucher) lease \(a.lease): closed in Redis with returned \(l.returned), the journal says "
                    + "granted \(a.granted) served \(a.served) (\(a.unserved) unserved)")
            }
            if hostStopped && l.state == "o" && a.trusted {
                out.append("J3 \(voucher) lease \(a.lease): \(host) stopped, but \(l.outstanding) tokens are still leased to it "
                    + "(recovery returns them at its next start)")
            }
        }
        if hostStopped {
            let known = Set(mine.map(\.lease))
            for l in leases where l.host == host && l.state == "o" && !known.contains(l.id) {
                out.append("J3 \(voucher) lease \(l.id): open in Redis for stopped host \(host), not in its journal: stranded")
            }
        }
        return out
    }

    /// (C1) with every host stopped: `netClaimed` tokens sold (claims minus cancellations).
    public func claimProblems(netClaimed: Int) -> [String] {
        var out: [String] = []
        if netClaimed > closedOutstanding + openOutstanding {
            out.append("C1 \(voucher): OVERSOLD: net claimed \(netClaimed) > \(closedOutstanding) sold through closed leases "
                + "+ \(openOutstanding) still leased (pool \(pool), limit \(limit))")
        }
        if netClaimed < closedOutstanding {
            out.append("C1 \(voucher): LOST: closed leases took \(closedOutstanding) tokens from the pool, "
                + "but only \(netClaimed) were claimed (net)")
        }
        return out
    }
}
