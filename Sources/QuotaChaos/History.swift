import Foundation

/// One client operation as the client saw it: what it sent, when, and what came back.
public struct Op: Sendable, Codable, Equatable {
    public enum Kind: String, Sendable, Codable { case claim, unclaim }
    public enum Outcome: Sendable, Codable, Equatable {
        /// A claim id (CLAIM) or `+OK` (UNCLAIM).
        case ok
        /// An error reply: its first word.
        case error(String)
        /// No reply: the connection broke or was closed (`disconnect`), or the client gave up (`timeout`).
        case noReply(String)
    }

    public var kind: Kind
    public var client: Int
    /// Index of the sidecar the client talked to.
    public var host: Int
    public var voucher: String
    public var user: String
    public var qty: Int
    public var req: String?
    /// CLAIM: the claim id answered. UNCLAIM: the claim id cancelled.
    public var claimID: String?
    /// Seconds since the run started, on the client's clock: sent, and answered.
    public var t0: Double
    public var t1: Double?
    public var outcome: Outcome

    public init(kind: Kind, client: Int, host: Int, voucher: String, user: String, qty: Int, req: String?,
                claimID: String?, t0: Double, t1: Double?, outcome: Outcome) {
        self.kind = kind
        self.client = client
        self.host = host
        self.voucher = voucher
        self.user = user
        self.qty = qty
        self.req = req
        self.claimID = claimID
        self.t0 = t0
        self.t1 = t1
        self.outcome = outcome
    }

    /// One line of the compact history file (tab separated).
    public var line: String {
        let out: String
        switch outcome {
        case .ok: out = "ok"
        case .error(let c): out = "err:" + c
        case .noReply(let why): out = "none:" + why
        }
        return [kind.rawValue, String(client), String(host), voucher, user, String(qty), req ?? "-", claimID ?? "-",
                String(format: "%.4f", t0), t1.map { String(format: "%.4f", $0) } ?? "-", out].joined(separator: "\t")
    }

    /// Parse a line written by ``line``.
    public init?(line: String) {
        let f = line.split(separator: "\t", omittingEmptySubsequences: false).map(String.init)
        guard f.count == 11, let kind = Kind(rawValue: f[0]), let client = Int(f[1]), let host = Int(f[2]),
            let qty = Int(f[5]), let t0 = Double(f[8])
        else { return nil }
        let outcome: Outcome
        if f[10] == "ok" {
            outcome = .ok
        } else if f[10].hasPrefix("err:") {
            outcome = .error(String(f[10].dropFirst(4)))
        } else if f[10].hasPrefix("none:") {
            outcome = .noReply(String(f[10].dropFirst(5)))
        } else {
            return nil
        }
        self.init(kind: kind, client: client, host: host, voucher: f[3], user: f[4], qty: qty,
                  req: f[6] == "-" ? nil : f[6], claimID: f[7] == "-" ? nil : f[7], t0: t0,
                  t1: f[9] == "-" ? nil : Double(f[9]), outcome: outcome)
    }
}

/// A fault injected during a run, on one target, over a time window (seconds since the run started).
public struct FaultEvent: Sendable, Codable, Equatable {
    public enum Kind: String, Sendable, Codable, CaseIterable {
        case sidecarKill = "sidecar-kill"
        case sidecarStopPastExpiry = "sidecar-stop-past-expiry"
        case sidecarTerm = "sidecar-term"
        case sidecarDrain = "sidecar-drain"
        case redisStop = "redis-stop"
        case redisKill = "redis-kill"
        case redisSlow = "redis-slow"
        case brokerStop = "broker-stop"
        case brokerWipe = "broker-wipe"
        case diskFull = "disk-full"
        case clientDisconnect = "client-disconnect"

        /// Faults that can leave a client's request on that sidecar without an answer.
        public var silencesSidecar: Bool {
            switch self {
            case .sidecarKill, .sidecarStopPastExpiry, .sidecarTerm, .sidecarDrain, .clientDisconnect: return true
            default: return false
            }
        }
    }

    public var kind: Kind
    /// The sidecar index, or -1 for Redis / the broker.
    public var target: Int
    public var start: Double
    public var end: Double

    public init(kind: Kind, target: Int, start: Double, end: Double) {
        self.kind = kind
        self.target = target
        self.start = start
        self.end = end
    }
}

/// A claim-stream event read back from Kafka (or from a journal when the broker lost it).
public struct StreamEvent: Sendable, Equatable {
    public enum Kind: String, Sendable { case claimed, unclaimed, leaseClosed = "lease_closed" }
    public var kind: Kind
    public var claimID: String
    public var voucher: String
    public var user: String
    public var qty: Int
    /// The exact bytes, to tell a byte-identical re-send from two different events with one id.
    public var raw: [UInt8]
    /// Which lease served (or got back) how many tokens.
    public var shares: [(lease: String, qty: Int)]

    public init(kind: Kind, claimID: String, voucher: String, user: String, qty: Int, raw: [UInt8],
                shares: [(lease: String, qty: Int)] = []) {
        self.kind = kind
        self.claimID = claimID
        self.voucher = voucher
        self.user = user
        self.qty = qty
        self.raw = raw
        self.shares = shares
    }

    public static func == (a: StreamEvent, b: StreamEvent) -> Bool {
        a.kind == b.kind && a.claimID == b.claimID && a.voucher == b.voucher && a.user == b.user && a.qty == b.qty && a.raw == b.raw
    }

    /// Parse a Kafka value (CONTRACT §4); nil for anything else.
    public init?(json: [UInt8]) {
        guard let o = try? JSONSerialization.jsonObject(with: Data(json)) as? [String: Any],
            let t = (o["type"] as? String).flatMap(Kind.init(rawValue:)), let v = o["voucher"] as? String
        else { return nil }
        kind = t
        voucher = v
        claimID = o["claim_id"] as? String ?? ""
        user = o["user"] as? String ?? ""
        qty = o["qty"] as? Int ?? 0
        raw = json
        shares = (o["leases"] as? [[String: Any]] ?? []).compactMap { d in
            guard let id = d["id"] as? String, let q = d["qty"] as? Int else { return nil }
            return (id, q)
        }
    }
}
