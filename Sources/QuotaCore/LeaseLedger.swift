/// One host's books, folded from its journal: for every lease it holds, what was granted, what was
/// served from it (net of cancellations that went back to it), and what cancellations gave to the
/// pool instead; which lease requests may have been granted without the answer being seen; and the
/// Redis work it still owes (restocks of cancellations, releases of per-user counts). All of it is in
/// every segment's snapshot, so deleting old segments never loses it.
///
/// This is the only fold of journal records into lease state: the journal writer keeps one to
/// start each segment with a snapshot, recovery keeps one to learn what to give back, and
/// `quotactl audit --journal` keeps one to check a host against Redis. See docs/accounting.md.
///
/// Per lease, at every step:  `0 <= served <= granted`, `restocked <= served`, and the lease's
/// closing return is `granted - served` (cumulative, so repeating it changes nothing).
public struct LeaseLedger: Sendable, Equatable {
    public struct Key: Hashable, Sendable {
        public var voucher: String
        public var lease: String
        public init(voucher: String, lease: String) {
            self.voucher = voucher
            self.lease = lease
        }
    }

    /// One lease held open by this host.
    public struct Account: Sendable, Equatable, Hashable {
        public var voucher: String
        public var lease: String
        public var granted: Int
        /// Tokens of journaled claims, minus cancellations that went back to this lease.
        public var served: Int
        /// Tokens of cancelled claims of this lease that went to the pool (restocks by claim id).
        public var restocked: Int
        /// Written under `durability: journal|kafka`: `served` is exact. Under `none` it may be low.
        public var trusted: Bool

        public init(voucher: String, lease: String, granted: Int, served: Int, restocked: Int = 0, trusted: Bool = true) {
            self.voucher = voucher
            self.lease = lease
            self.granted = granted
            self.served = served
            self.restocked = restocked
            self.trusted = trusted
        }

        /// What the lease's closing return gives back: every token not served.
        public var unserved: Int {
            // (Saturating: a served count from absurd journal values must not trap here.)
            let (d, over) = granted.subtractingReportingOverflow(served)
            return over ? (served < 0 ? Int.max : Int.min) : d
        }
    }

    /// A lease request whose answer the journal has not seen.
    public struct Request: Sendable, Equatable, Hashable {
        public var voucher: String
        public var req: String
        public init(voucher: String, req: String) {
            self.voucher = voucher
            self.req = req
        }
    }

    /// A per-user count that must be released in Redis.
    public struct Release: Sendable, Equatable, Hashable {
        public var voucher: String
        public var user: String
        public var claimID: String
        public init(voucher: String, user: String, claimID: String) {
            self.voucher = voucher
            self.user = user
            self.claimID = claimID
        }
    }

    /// The ledger as written at the start of each segment.
    public struct Snapshot: Sendable, Equatable {
        public var generation: String?
        public var accounts: [Account]
        public var requests: [Request]
        public var owedRestocks: [ClaimEvent]
        public var owedReleases: [Release]
        public init(generation: String?, accounts: [Account], requests: [Request], owedRestocks: [ClaimEvent] = [],
                    owedReleases: [Release] = []) {
            self.generation = generation
            self.accounts = accounts
            self.requests = requests
            self.owedRestocks = owedRestocks
            self.owedReleases = owedReleases
        }
    }

    public private(set) var accounts: [Key: Account] = [:]
    /// Lease requests not yet answered in the journal: request id → voucher.
    public private(set) var requests: [String: String] = [:]
    /// The region generation last adopted.
    public private(set) var generation: String?
    /// Cancellations whose pool shares Redis has not taken yet, by claim id.
    public private(set) var owedRestocks: [String: ClaimEvent] = [:]
    /// Per-user counts that may have been taken and must be released, by claim id: intents of claims not
    /// (yet) recorded, and counts of cancelled claims.
    public private(set) var owedReleases: [String: Release] = [:]
    /// Releases an `UNCLAIM` journaled before its cancellation, by claim id: owed only once the cancellation
    /// follows (then moved to `owedReleases`). A cancellation that failed (its write did not reach the disk) leaves
    /// the claim standing, and its release here, never released (found by the chaos checker: a user's count
    /// released for a claim that stood, and a third claim under a limit of 2). Not in snapshots: the journal
    /// writes them again as `releaseOwed` records after each segment's snapshot.
    public private(set) var releasesAwaitingCancel: [String: Release] = [:]
    /// Records that break the identity (never expected; reported by audit and recovery).
    public private(set) var anomalies: [String] = []
    /// The account the last claim changed, by key and index: the claims of a journal batch mostly name the
    /// same lease, and a lookup hashes two strings (issue 13). Forgotten wherever a key is added or removed
    /// (``forgetLast()``); entries are changed only through their index, in place, which keeps every index
    /// valid (a keyed `accounts[key]?.x = …` is not used: on a missing key it may grow the table, which
    /// moves every entry; a stale index then traps). Not part of the ledger's value.
    private var last = LastAccount()

    private struct LastAccount: Sendable, Equatable {
        var key: Key?
        var index: Dictionary<Key, Account>.Index?
        static func == (_: Self, _: Self) -> Bool { true }
    }

    public init() {}

    public init(_ s: Snapshot) {
        restore(s)
    }

    /// Fold one record.
    public mutating func apply(_ r: JournalRecord) {
        switch r {
        case .claim(let e):
            // (In a function of its own: with the claim's fold inline here, the record was copied on entry (a retain
            // and a release of the event) for every claim the journal writer folds; issue 13.)
            applyClaim(e)
        case .intentResolved(_, let c):
            owedReleases.removeValue(forKey: c)
            releasesAwaitingCancel.removeValue(forKey: c)
        case .releaseOwed(let v, let u, let c):
            releasesAwaitingCancel[c] = Release(voucher: v, user: u, claimID: c)
        case .restocked(_, let c):
            owedRestocks.removeValue(forKey: c)
        case .boot:
            break
        case .leaseRequested(let v, let req):
            requests[req] = v
        case .leaseGranted(let g):
            requests.removeValue(forKey: g.req)
            let key = Key(voucher: g.voucher, lease: g.lease)
            if accounts[key] != nil { anomalies.append("lease \(g.voucher)/\(g.lease) granted twice") }
            forgetLast()
            accounts[key] = Account(voucher: g.voucher, lease: g.lease, granted: g.granted, served: 0, trusted: g.trusted)
        case .leaseAnswered(_, let req):
            requests.removeValue(forKey: req)
        case .leaseClosed(let c):
            let key = Key(voucher: c.voucher, lease: c.lease)
            forgetLast()
            // A lease Redis said was gone (closed or reclaimed elsewhere) leaves the books as it is.
            if let a = accounts.removeValue(forKey: key), a.trusted, !c.gone,
                a.served != c.served || a.granted != c.granted || c.returned != a.unserved
            {
                anomalies.append(
                    "lease \(c.voucher)/\(c.lease) closed as granted \(c.granted) served \(c.served) returned \(c.returned), "
                        + "but the journal says granted \(a.granted) served \(a.served)")
            }
        case .generation(let g):
            generation = g
        case .snapshot(let s):
            restore(s)
        }
    }

    private mutating func applyClaim(_ e: ClaimEvent) {
        switch e.kind {
        case .intent:
            owedReleases[e.claimID] = Release(voucher: e.voucher, user: e.user, claimID: e.claimID)
        case .claimed:
            // The claim exists: its intent's count is the claim's own, nothing to release.
            if !owedReleases.isEmpty { owedReleases.removeValue(forKey: e.claimID) }
            e.withShares { for s in $0 { change(e.voucher, s.leaseId, claim: e.claimID, served: s.tokens) } }
        case .unclaimed:
            if e.toPool != 0 { owedRestocks[e.claimID] = e }
            if let r = releasesAwaitingCancel.removeValue(forKey: e.claimID) { owedReleases[e.claimID] = r }
            for (i, s) in e.shares.enumerated() {
                let key = Key(voucher: e.voucher, lease: s.leaseId)
                if e.sharesToPool(i) {
                    // The lease may be closed and gone from the books: the restock stands on its own.
                    // (Through its index: `accounts[key]?.…` on a missing key may grow the table to make
                    // room for an insert that never comes, which moves every entry: see `last`.)
                    if let a = accounts.index(forKey: key) {
                        let (sum, over) = accounts.values[a].restocked.addingReportingOverflow(s.tokens)
                        if over {
                            anomalies.append("lease \(e.voucher)/\(s.leaseId): restock of \(s.tokens) by claim \(e.claimID) overflows")
                        } else {
                            accounts.values[a].restocked = sum
                        }
                    }
                } else {
                    change(e.voucher, s.leaseId, claim: e.claimID, served: -s.tokens)
                }
            }
        }
    }

    /// Add `delta` to the lease's `served`. Values come from the journal's bytes: an absurd one (a record
    /// quotad would never write, but whose checksum holds) is an anomaly, never an overflow trap.
    private mutating func change(_ voucher: String, _ lease: String, claim: @autoclosure () -> String, served delta: Int) {
        // One lookup (the entry is changed in place by its index), not a read and a write: the journal writer
        // folds every claim through here, and each lookup hashes two strings (issue 13).
        let key = Key(voucher: voucher, lease: lease)
        let i: Dictionary<Key, Account>.Index
        if let k = last.key, k == key, let cached = last.index {
            i = cached
        } else {
            guard let found = accounts.index(forKey: key) else {
                anomalies.append("claim \(claim()) names lease \(voucher)/\(lease), which this journal does not hold")
                return
            }
            i = found
            last = LastAccount(key: key, index: found)
        }
        // In place, in one access: each `accounts.values[i]` read was a copy of the account (its two strings
        // retained and released), three a claim (~300 instructions; issue 13).
        switch Self.serve(delta, &accounts.values[i]) {
        case .overflow:
            anomalies.append("lease \(voucher)/\(lease): \(delta) served by claim \(claim()) overflows its count")
        case .outOfRange(let served, let granted):
            anomalies.append("lease \(voucher)/\(lease) served \(served) of \(granted) after claim \(claim())")
        case .ok:
            break
        }
    }

    private enum Served { case ok, overflow, outOfRange(served: Int, granted: Int) }

    /// Add `delta` to the account's served count, unless it overflows (then nothing changes).
    @inline(__always)
    private static func serve(_ delta: Int, _ a: inout Account) -> Served {
        let (sum, over) = a.served.addingReportingOverflow(delta)
        if over { return .overflow }
        a.served = sum
        return sum < 0 || sum > a.granted ? .outOfRange(served: sum, granted: a.granted) : .ok
    }

    private mutating func forgetLast() { last = LastAccount() }

    private mutating func restore(_ s: Snapshot) {
        forgetLast()
        releasesAwaitingCancel = [:]
        accounts = Dictionary(s.accounts.map { (Key(voucher: $0.voucher, lease: $0.lease), $0) }, uniquingKeysWith: { a, _ in a })
        requests = Dictionary(s.requests.map { ($0.req, $0.voucher) }, uniquingKeysWith: { a, _ in a })
        generation = s.generation
        owedRestocks = Dictionary(s.owedRestocks.map { ($0.claimID, $0) }, uniquingKeysWith: { a, _ in a })
        owedReleases = Dictionary(s.owedReleases.map { ($0.claimID, $0) }, uniquingKeysWith: { a, _ in a })
    }

    /// Keep every lease, but as untrusted: their served counts can no longer be proven (the journal
    /// was found corrupt), so they are never returned on this journal's word; reconciliation decides.
    public mutating func distrustAll() {
        forgetLast()
        for k in accounts.keys { accounts[k]!.trusted = false }
    }

    /// The state to write at the start of a segment (sorted, so equal ledgers write equal bytes).
    public var snapshot: Snapshot {
        Snapshot(
            generation: generation,
            accounts: accounts.values.sorted { ($0.voucher, $0.lease) < ($1.voucher, $1.lease) },
            requests: requests.map { Request(voucher: $0.value, req: $0.key) }.sorted { $0.req < $1.req },
            owedRestocks: owedRestocks.values.sorted { $0.claimID < $1.claimID },
            owedReleases: owedReleases.values.sorted { $0.claimID < $1.claimID })
    }

    /// Open leases, sorted by voucher and lease id.
    public var openAccounts: [Account] { snapshot.accounts }
}
