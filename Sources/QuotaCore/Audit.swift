/// The accounting identity of one voucher in one region, checked (docs/accounting.md).
///
/// Redis alone must satisfy, at every moment:
/// - (R1) `pool + leased - returned - restocked == limit`, and `pool >= 0`;
/// - (R2) the lease records (open and closed) plus the archived counters sum to `leased`,
///   `returned` and `restocked`;
/// - (R3) per lease, `returned + restocked <= granted`.
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

    public var voucher: String
    public var limit: Int
    public var pool: Int
    public var leased: Int
    public var returned: Int
    public var restocked: Int
    public var archivedGranted: Int
    public var archivedReturned: Int
    public var archivedRestocked: Int
    public var leases: [Lease]

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
        return out
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
