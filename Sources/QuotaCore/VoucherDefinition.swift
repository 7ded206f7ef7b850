import Foundation

/// What a region's allocation of a voucher is (written by `quotactl` and by a borrowing sidecar, kept by the ledger).
public struct VoucherDefinition: Sendable, Equatable, Codable {
    public var voucher: String
    public var region: String
    public var limit: Int
    public var totalLimit: Int
    public var perUser: Int
    public var state: String
    /// The region's Redis generation the voucher was defined in.
    public var generation: String
    public var tsMs: Int64

    public init(voucher: String, region: String, limit: Int, totalLimit: Int, perUser: Int, state: String,
                generation: String = "", tsMs: Int64) {
        self.voucher = voucher
        self.region = region
        self.limit = limit
        self.totalLimit = totalLimit
        self.perUser = perUser
        self.state = state
        self.generation = generation
        self.tsMs = tsMs
    }

    /// The Kafka value of a `voucher_defined` event.
    public var kafkaValue: [UInt8] {
        let o: [String: Any] = ["type": "voucher_defined", "voucher": voucher, "region": region, "limit": limit,
                                "total_limit": totalLimit, "per_user": perUser, "state": state, "gen": generation,
                                "ts_ms": tsMs]
        return Array((try? JSONSerialization.data(withJSONObject: o, options: [.sortedKeys])) ?? Data())
    }
}

