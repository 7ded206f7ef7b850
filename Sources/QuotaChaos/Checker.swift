import QuotaCore

/// One broken invariant found in a run.
public struct Violation: Sendable, Equatable, CustomStringConvertible {
    public var invariant: String
    public var detail: String
    public init(_ invariant: String, _ detail: String) {
        self.invariant = invariant
        self.detail = detail
    }
    public var description: String { "\(invariant): \(detail)" }
}

/// What a run's vouchers were.
public struct VoucherSpec: Sendable, Codable, Equatable {
    public var id: String
    public var limit: Int
    /// 0: none.
    public var perUser: Int
    public var maxQty: Int
    public init(id: String, limit: Int, perUser: Int, maxQty: Int) {
        self.id = id
        self.limit = limit
        self.perUser = perUser
        self.maxQty = maxQty
    }
}

/// Everything a run produced, for the checks.
public struct RunRecord: Sendable {
    public var vouchers: [VoucherSpec]
    public var ops: [Op]
    public var faults: [FaultEvent]
    /// The claim stream as read back from Kafka at the end.
    public var stream: [StreamEvent]
    /// Events of the hosts' journals (claims and cancellations), for what a wiped broker lost.
    public var journals: [StreamEvent]
    /// Redis's books per voucher, after every sidecar stopped.
    public var books: [String: VoucherAudit]
    /// Problems the per-journal audit (J1–J3) found.
    public var journalProblems: [String]
    /// How long a request may go unanswered before it counts as a hang (no fault on its sidecar).
    public var replyBound: Double

    public init(vouchers: [VoucherSpec], ops: [Op], faults: [FaultEvent], stream: [StreamEvent], journals: [StreamEvent],
                books: [String: VoucherAudit], journalProblems: [String], replyBound: Double) {
        self.vouchers = vouchers
        self.ops = ops
        self.faults = faults
        self.stream = stream
        self.journals = journals
        self.books = books
        self.journalProblems = journalProblems
        self.replyBound = replyBound
    }
}

/// Checks a run's history against every invariant (issue 9, docs/accounting.md):
///
/// - `never-oversell`: at every point of the clients' history, net claims answered ≤ limit;
/// - `books`: Redis's identity (R1–R3), each host journal against Redis (J1–J3), the claims on the
///   stream against the books (C1: nothing created, nothing lost), and per lease (C2): what a closed
///   lease took from the pool for good (`granted − returned − restocked`) is exactly the net tokens the
///   stream says it served;
/// - `durable`: every claim answered with an id is on Kafka (or, after a broker lost its data, in its
///   host's journal), and one claim id never carries two different events;
/// - `explained`: every claim on Kafka was answered, cancelled, or was in flight when something failed;
/// - `per-user`: no user holds more than the voucher's per-user limit;
/// - `req-once`: a request id got at most one claim id;
/// - `unclaim-once`: an acknowledged `UNCLAIM` is on the stream, once per claim id;
/// - `bounded`: every request was answered within its bound, or a fault on its sidecar explains why not,
///   and only with documented error codes.
public enum ChaosChecker {
    public static let documentedCodes: Set<String> = [
        "SOLDOUT", "USERLIMIT", "UNAVAILABLE", "NOVOUCHER", "INACTIVE", "BUSY", "NOPERM", "ERR",
    ]

    public static func check(_ run: RunRecord) -> [Violation] {
        var out: [Violation] = []
        let spec = Dictionary(run.vouchers.map { ($0.id, $0) }, uniquingKeysWith: { a, _ in a })
        let acked = ackedClaims(run.ops)

        // never-oversell, in the clients' own order of replies.
        var events: [(t: Double, voucher: String, delta: Int)] = []
        var counted = Set<String>()
        for op in run.ops where op.outcome == .ok {
            guard let t = op.t1, let id = op.claimID else { continue }
            if op.kind == .claim, counted.insert(id).inserted { events.append((t, op.voucher, op.qty)) }
        }
        var unclaimedOnce = Set<String>()
        for op in run.ops where op.kind == .unclaim && op.outcome == .ok {
            guard let t = op.t1, let id = op.claimID, let claim = acked[id], unclaimedOnce.insert(id).inserted else { continue }
            events.append((t, claim.voucher, -claim.qty))
        }
        var net: [String: Int] = [:]
        var worst: [String: Int] = [:]
        for e in events.sorted(by: { $0.t < $1.t }) {
            net[e.voucher, default: 0] += e.delta
            worst[e.voucher] = max(worst[e.voucher] ?? 0, net[e.voucher]!)
        }
        for (v, w) in worst.sorted(by: { $0.key < $1.key }) where w > (spec[v]?.limit ?? .max) {
            out.append(Violation("never-oversell", "\(v): \(w) claims held at once by clients, limit \(spec[v]!.limit)"))
        }

        // The stream (Kafka, plus what a wiped broker lost, from the journals).
        let wiped = run.faults.contains { $0.kind == .brokerWipe }
        var bodies: [String: Set<[UInt8]>] = [:]
        var claimed: [String: StreamEvent] = [:]
        var unclaimed: [String: StreamEvent] = [:]
        for e in run.stream + (wiped ? run.journals : []) {
            switch e.kind {
            case .claimed:
                claimed[e.claimID] = e
                bodies["c:" + e.claimID, default: []].insert(e.raw)
            case .unclaimed:
                unclaimed[e.claimID] = e
                bodies["u:" + e.claimID, default: []].insert(e.raw)
            case .leaseClosed:
                break
            }
        }
        if !wiped {
            // Journal and Kafka carry the same bytes for one event.
            for e in run.journals where e.kind != .leaseClosed {
                let k = (e.kind == .claimed ? "c:" : "u:") + e.claimID
                if bodies[k] != nil { bodies[k]!.insert(e.raw) }
            }
        }
        for (k, b) in bodies.sorted(by: { $0.key < $1.key }) where b.count > 1 {
            out.append(Violation("durable", "\(k.dropFirst(2)) has \(b.count) different \(k.hasPrefix("c:") ? "claim" : "cancellation") events"))
        }

        // durable: every answered claim is on the stream.
        for (id, op) in acked.sorted(by: { $0.key < $1.key }) where claimed[id] == nil {
            out.append(Violation("durable", "claim \(id) (\(op.voucher), answered at \(op.t1 ?? -1)s) is not on Kafka\(wiped ? " nor in a journal" : "")"))
        }

        // unclaim-once: an acknowledged UNCLAIM is on the stream.
        for op in run.ops where op.kind == .unclaim && op.outcome == .ok {
            guard let id = op.claimID, acked[id] != nil else { continue }
            if unclaimed[id] == nil { out.append(Violation("unclaim-once", "UNCLAIM \(id) was answered +OK but is not on the stream")) }
        }

        // explained: claims on the stream that nobody was told about.
        var budget: [String: Int] = [:]
        for op in run.ops where op.kind == .claim && op.outcome != .ok {
            budget["\(op.voucher)|\(op.user)|\(op.qty)", default: 0] += 1
        }
        for (id, e) in claimed.sorted(by: { $0.key < $1.key }) where acked[id] == nil && unclaimed[id] == nil {
            let k = "\(e.voucher)|\(e.user)|\(e.qty)"
            if (budget[k] ?? 0) > 0 {
                budget[k]! -= 1
            } else {
                out.append(Violation("explained", "claim \(id) (\(e.voucher), user \(e.user), qty \(e.qty)) is on Kafka, "
                    + "but no request for it went unanswered"))
            }
        }

        // per-user: net per user on the stream.
        var perUser: [String: Int] = [:]
        for (id, e) in claimed where (spec[e.voucher]?.perUser ?? 0) > 0 && unclaimed[id] == nil {
            perUser["\(e.voucher)|\(e.user)", default: 0] += e.qty
        }
        for (k, n) in perUser.sorted(by: { $0.key < $1.key }) {
            let v = String(k.prefix { $0 != "|" })
            if let lim = spec[v]?.perUser, n > lim {
                out.append(Violation("per-user", "\(k): holds \(n), the limit is \(lim)"))
            }
        }

        // req-once.
        var byReq: [String: Set<String>] = [:]
        for op in run.ops where op.kind == .claim && op.outcome == .ok {
            if let r = op.req, let id = op.claimID { byReq["\(op.voucher)|\(r)", default: []].insert(id) }
        }
        for (r, ids) in byReq.sorted(by: { $0.key < $1.key }) where ids.count > 1 {
            out.append(Violation("req-once", "request \(r) got \(ids.count) claim ids: \(ids.sorted())"))
        }

        // books: Redis, journals, and the stream's net against Redis.
        for v in run.vouchers {
            guard let b = run.books[v.id] else {
                out.append(Violation("books", "\(v.id): no books read from Redis"))
                continue
            }
            for p in b.redisProblems() { out.append(Violation("books", p)) }
            let netClaimed = claimed.values.filter { $0.voucher == v.id }.reduce(0) { $0 + $1.qty }
                - unclaimed.values.filter { $0.voucher == v.id && claimed[$0.claimID] != nil }.reduce(0) { $0 + $1.qty }
            for p in b.claimProblems(netClaimed: netClaimed) { out.append(Violation("books", p)) }
        }
        for p in run.journalProblems { out.append(Violation("books", p)) }

        // C2, per lease: net tokens served through it on the stream == what it kept from the pool.
        var servedByLease: [String: Int] = [:]
        for (id, e) in claimed {
            for s in e.shares { servedByLease["\(e.voucher)|\(s.lease)", default: 0] += s.qty }
            if let u = unclaimed[id] {
                for s in u.shares { servedByLease["\(u.voucher)|\(s.lease)", default: 0] -= s.qty }
            }
        }
        for v in run.vouchers {
            guard let b = run.books[v.id] else { continue }
            for l in b.leases {
                let served = servedByLease["\(v.id)|\(l.id)", default: 0]
                if l.state != "o" && served != l.outstanding {
                    out.append(Violation("books", "C2 \(v.id) lease \(l.id) (\(l.host), \(l.state == "c" ? "closed" : "reclaimed")): "
                        + "granted \(l.granted) - returned \(l.returned) - restocked \(l.restocked) = \(l.outstanding), "
                        + "but the stream says it served \(served) net"))
                } else if l.state == "o" && served > l.outstanding {
                    out.append(Violation("books", "C2 \(v.id) open lease \(l.id): served \(served) > \(l.outstanding) it holds"))
                }
            }
        }

        // bounded: answered in time, or a fault explains it; documented codes only.
        for op in run.ops {
            switch op.outcome {
            case .error(let code) where !documentedCodes.contains(code):
                out.append(Violation("bounded", "undocumented error code \(code) for \(op.kind) \(op.req ?? op.claimID ?? "")"))
            case .noReply(let why):
                let explained = run.faults.contains {
                    $0.kind.silencesSidecar && ($0.target == op.host || $0.target == -1)
                        && $0.start <= op.t0 + run.replyBound && $0.end + 1 >= op.t0
                }
                if !explained {
                    out.append(Violation("bounded", "\(op.kind) by client \(op.client) on sidecar \(op.host) at \(op.t0)s "
                        + "got no reply (\(why)) and no fault on that sidecar explains it"))
                }
            default:
                break
            }
            if let t1 = op.t1, t1 - op.t0 > run.replyBound {
                let explained = run.faults.contains {
                    ($0.target == op.host || $0.target == -1) && $0.start <= t1 && $0.end + 1 >= op.t0
                }
                if !explained {
                    out.append(Violation("bounded", "\(op.kind) on sidecar \(op.host) took \(t1 - op.t0)s with no fault to explain it"))
                }
            }
        }
        return out
    }

    /// Claims answered with an id, first answer wins (a REQ retry answers the same id again).
    static func ackedClaims(_ ops: [Op]) -> [String: Op] {
        var out: [String: Op] = [:]
        for op in ops where op.kind == .claim && op.outcome == .ok {
            if let id = op.claimID, out[id] == nil { out[id] = op }
        }
        return out
    }
}
