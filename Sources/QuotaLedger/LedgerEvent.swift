import Foundation
@_exported import struct QuotaCore.VoucherDefinition

/// One event of the claim stream (CONTRACT §4, and the events quotactl writes), as the ledger keeps it.
public enum LedgerEvent: Sendable, Equatable {
    public struct Share: Sendable, Equatable {
        public var lease: String
        public var qty: Int
        /// Cancellations only: the share went to the pool (a restock), not back to its lease.
        public var toPool: Bool
        public init(lease: String, qty: Int, toPool: Bool = false) {
            self.lease = lease
            self.qty = qty
            self.toPool = toPool
        }
    }

    case claimed(claimID: String, voucher: String, user: String, qty: Int, region: String, host: String,
                 shares: [Share], tsMs: Int64)
    case unclaimed(claimID: String, voucher: String, region: String, shares: [Share], tsMs: Int64)
    case leaseGranted(voucher: String, region: String, host: String, lease: String, granted: Int, durability: String,
                      tsMs: Int64)
    case leaseClosed(voucher: String, region: String, host: String, lease: String, granted: Int, served: Int,
                     returned: Int, gone: Bool, tsMs: Int64)
    /// `quotactl voucher create` (and state changes): what a region's allocation of a voucher is.
    case voucherDefined(VoucherDefinition)
    /// `quotactl journal ship`: a host's journal was read to its end and streamed; what each lease of it
    /// served is proven (one event per voucher, after that voucher's events, on its partition).
    case journalShipped(host: String, region: String, voucher: String, leases: [ShippedLease], requests: [String], tsMs: Int64)

    public struct ShippedLease: Sendable, Equatable {
        public var lease: String
        public var granted: Int
        public var served: Int
        public init(lease: String, granted: Int, served: Int) {
            self.lease = lease
            self.granted = granted
            self.served = served
        }
    }

    /// Parse one Kafka value; nil for anything the ledger does not keep.
    public init?(json: [UInt8]) {
        guard let o = try? JSONSerialization.jsonObject(with: Data(json)) as? [String: Any], let type = o["type"] as? String
        else { return nil }
        func s(_ k: String) -> String? { o[k] as? String }
        func i(_ k: String) -> Int? { (o[k] as? NSNumber)?.intValue }
        let ts = Int64(i("ts_ms") ?? 0)
        func shares(pool: Bool) -> [Share]? {
            guard let a = o["leases"] as? [[String: Any]] else { return nil }
            var out: [Share] = []
            for d in a {
                guard let id = d["id"] as? String, let q = (d["qty"] as? NSNumber)?.intValue else { return nil }
                out.append(Share(lease: id, qty: q, toPool: pool && (d["to"] as? String) == "pool"))
            }
            return out
        }
        switch type {
        case "claimed":
            guard let id = s("claim_id"), let v = s("voucher"), let u = s("user"), let q = i("qty"), let r = s("region"),
                let h = s("host"), let sh = shares(pool: false)
            else { return nil }
            self = .claimed(claimID: id, voucher: v, user: u, qty: q, region: r, host: h, shares: sh, tsMs: ts)
        case "unclaimed":
            guard let id = s("claim_id"), let v = s("voucher"), let r = s("region"), let sh = shares(pool: true) else { return nil }
            self = .unclaimed(claimID: id, voucher: v, region: r, shares: sh, tsMs: ts)
        case "lease_granted":
            guard let v = s("voucher"), let r = s("region"), let h = s("host"), let l = s("lease"), let g = i("granted"),
                let d = s("durability")
            else { return nil }
            self = .leaseGranted(voucher: v, region: r, host: h, lease: l, granted: g, durability: d, tsMs: ts)
        case "lease_closed":
            guard let v = s("voucher"), let r = s("region"), let h = s("host"), let l = s("lease"), let g = i("granted"),
                let sv = i("served"), let rt = i("returned")
            else { return nil }
            self = .leaseClosed(voucher: v, region: r, host: h, lease: l, granted: g, served: sv, returned: rt,
                                gone: (o["gone"] as? Bool) ?? false, tsMs: ts)
        case "voucher_defined":
            guard let v = s("voucher"), let r = s("region"), let l = i("limit"), let st = s("state") else { return nil }
            self = .voucherDefined(VoucherDefinition(
                voucher: v, region: r, limit: l, totalLimit: i("total_limit") ?? l, perUser: i("per_user") ?? 0, state: st,
                generation: s("gen") ?? "", tsMs: ts))
        case "journal_shipped":
            guard let h = s("host"), let r = s("region"), let v = s("voucher"), let a = o["leases"] as? [[String: Any]]
            else { return nil }
            var ls: [ShippedLease] = []
            for d in a {
                guard let id = d["id"] as? String, let g = (d["granted"] as? NSNumber)?.intValue,
                    let sv = (d["served"] as? NSNumber)?.intValue
                else { return nil }
                ls.append(ShippedLease(lease: id, granted: g, served: sv))
            }
            self = .journalShipped(host: h, region: r, voucher: v, leases: ls, requests: o["requests"] as? [String] ?? [], tsMs: ts)
        default:
            return nil
        }
    }
}

/// The Kafka value of a `journal_shipped` event: the host's open leases with what they served, and its
/// lease requests never seen answered (a lease Redis granted to one of them served nothing: nothing is
/// served from a lease before its grant is on disk).
public func journalShippedValue(host: String, region: String, voucher: String, leases: [LedgerEvent.ShippedLease],
                                requests: [String], tsMs: Int64) -> [UInt8] {
    let o: [String: Any] = [
        "type": "journal_shipped", "host": host, "region": region, "voucher": voucher, "ts_ms": tsMs, "requests": requests,
        "leases": leases.map { ["id": $0.lease, "granted": $0.granted, "served": $0.served] as [String: Any] },
    ]
    return Array((try? JSONSerialization.data(withJSONObject: o, options: [.sortedKeys])) ?? Data())
}
