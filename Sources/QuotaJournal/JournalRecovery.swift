import Foundation
import QuotaCore

/// What a journal directory says after a restart.
public struct JournalRecovery: Sendable {
    public struct SegmentContents: Sendable {
        public var id: UInt64
        public var path: String
        public var bytes: Int
        /// Claim records (and cancellations) to ship again, in order.
        public var claims: [ClaimEvent]
        /// Kafka acknowledged every claim of this segment (a `.shipped` marker exists): not shipped again.
        public var shipped: Bool = false
    }

    /// Claims waiting for their per-user check when the process stopped: their user counts must be released.
    public var orphanIntents: [ClaimEvent] = []
    /// Every claim and cancellation found, in order (to rebuild the UNCLAIM and REQ tables).
    public var history: [ClaimEvent] = []

    public var segments: [SegmentContents] = []
    /// Leases open at the end of the journal, with what was served from each.
    public var openLeases: [JournalRecord.OpenLease] = []
    /// False when the newest segment is corrupt before its end: served counts may be too low,
    /// so no lease may be returned on the journal's word.
    public var leaseStateTrusted = true
    /// Problems found: `file at offset N: message`.
    public var issues: [String] = []
    /// A torn last record was dropped (normal after a crash).
    public var tornTails: [String] = []

    static func path(dir: String, id: UInt64) -> String {
        let digits = String(id)
        return "\(dir)/seg-\(String(repeating: "0", count: max(0, 16 - digits.count)))\(digits).qj"
    }

    /// Read every segment of `dir` (a missing directory is an empty journal). Never throws on
    /// bad data: corruption is reported in `issues` with the file and offset, and nothing after a
    /// corrupt record in that segment is trusted.
    public static func read(dir: String) -> JournalRecovery {
        var out = JournalRecovery()
        let names = (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []
        let ids = names.compactMap { n -> UInt64? in
            guard n.hasPrefix("seg-"), n.hasSuffix(".qj"), n.count == 23 else { return nil }
            return UInt64(n.dropFirst(4).dropLast(3))
        }.sorted()
        var leases: [String: JournalRecord.OpenLease] = [:]
        var intents: [String: ClaimEvent] = [:]
        for (i, id) in ids.enumerated() {
            let p = path(dir: dir, id: id)
            guard let data = FileManager.default.contents(atPath: p) else {
                out.issues.append("\(p): cannot read")
                continue
            }
            let bytes = [UInt8](data)
            let newest = i == ids.count - 1
            var seg = SegmentContents(id: id, path: p, bytes: bytes.count, claims: [])
            seg.shipped = FileManager.default.fileExists(atPath: p + ".shipped")
            var offset = 0
            var first = true
            scan: while offset < bytes.count {
                switch JournalCodec.decode(bytes, at: offset) {
                case .record(let r, let next):
                    switch r {
                    case .snapshot(let open) where first:
                        // The newest readable snapshot is the base of the lease state.
                        leases = Dictionary(open.map { ("\($0.voucher)\u{0}\($0.lease)", $0) }, uniquingKeysWith: { a, _ in a })
                    case .snapshot:
                        break
                    case .leaseGranted(let v, let l, let g):
                        leases["\(v)\u{0}\(l)"] = .init(voucher: v, lease: l, granted: g, served: 0)
                    case .leaseClosed(let v, let l):
                        leases.removeValue(forKey: "\(v)\u{0}\(l)")
                    case .claim(let e) where e.kind == .intent:
                        intents[e.claimID] = e
                    case .claim(let e):
                        seg.claims.append(e)
                        out.history.append(e)
                        intents.removeValue(forKey: e.claimID)
                        for s in e.shares { leases["\(e.voucher)\u{0}\(s.leaseId)"]?.served += e.kind == .claimed ? s.tokens : -s.tokens }
                    }
                    first = false
                    offset = next
                case .incomplete:
                    out.tornTails.append("\(p) at offset \(offset): torn last record (\(bytes.count - offset) bytes) dropped")
                    break scan
                case .corrupt(let why):
                    out.issues.append("\(p) at offset \(offset): \(why); the rest of this segment is not trusted")
                    if newest { out.leaseStateTrusted = false }
                    break scan
                }
            }
            if first && bytes.count > 0 && newest { out.leaseStateTrusted = false }
            out.segments.append(seg)
        }
        out.openLeases = leases.values.sorted { ($0.voucher, $0.lease) < ($1.voucher, $1.lease) }
        out.orphanIntents = intents.values.sorted { $0.claimID < $1.claimID }
        return out
    }
}
