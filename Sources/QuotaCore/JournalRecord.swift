/// One record of the local journal. Claims are what gets shipped to Kafka; lease
/// records and the snapshot at the start of each segment let a restarted sidecar
/// know exactly how many tokens of each lease it served.
public enum JournalRecord: Sendable, Equatable {
    case claim(ClaimEvent)
    case leaseGranted(voucher: String, lease: String, granted: Int)
    /// Redis acknowledged the closing return of this lease.
    case leaseClosed(voucher: String, lease: String)
    /// Every open lease and what was served from it, at the start of a segment.
    case snapshot([OpenLease])

    public struct OpenLease: Sendable, Equatable, Hashable {
        public var voucher: String
        public var lease: String
        public var granted: Int
        public var served: Int
        public init(voucher: String, lease: String, granted: Int, served: Int) {
            self.voucher = voucher
            self.lease = lease
            self.granted = granted
            self.served = served
        }
    }
}

/// A granted claim (or a cancellation of one) as journaled and streamed to Kafka.
public struct ClaimEvent: Sendable, Equatable {
    /// `claimed` and `unclaimed` are shipped to Kafka; `intent` (a claim waiting for its per-user
    /// check) stays in the journal, so a crash between the check and the claim can be undone.
    public enum Kind: UInt8, Sendable { case claimed = 1, unclaimed = 2, intent = 3 }
    public var kind: Kind
    public var claimID: String
    public var voucher: String
    public var user: String
    public var qty: Int
    public var region: String
    public var host: String
    public var shares: [ClaimShare]
    public var tsMs: Int64
    /// The client's request id (`CLAIM … REQ id`), journal only.
    public var req: String?

    public init(kind: Kind = .claimed, claimID: String, voucher: String, user: String, qty: Int, region: String,
                host: String, shares: [ClaimShare], tsMs: Int64, req: String? = nil) {
        self.req = req
        self.kind = kind
        self.claimID = claimID
        self.voucher = voucher
        self.user = user
        self.qty = qty
        self.region = region
        self.host = host
        self.shares = shares
        self.tsMs = tsMs
    }

    /// The `unclaimed` event cancelling this claim, stamped `tsMs` (journal only: no request id).
    public func cancellation(tsMs: Int64) -> ClaimEvent {
        var c = self
        c.kind = .unclaimed
        c.tsMs = tsMs
        c.req = nil
        return c
    }

    /// The Kafka value (CONTRACT §4): one JSON object. `lease` names the lease the tokens came
    /// from (`a+b` when one claim spans two leases).
    public var kafkaValue: [UInt8] {
        var s = "{\"type\":\""
        s += kind == .claimed ? "claimed" : "unclaimed"
        s += "\",\"claim_id\":"
        JSON.append(claimID, to: &s)
        s += ",\"voucher\":"
        JSON.append(voucher, to: &s)
        s += ",\"user\":"
        JSON.append(user, to: &s)
        s += ",\"qty\":\(qty),\"region\":"
        JSON.append(region, to: &s)
        s += ",\"host\":"
        JSON.append(host, to: &s)
        s += ",\"lease\":"
        JSON.append(shares.map(\.leaseId).joined(separator: "+"), to: &s)
        s += ",\"ts_ms\":\(tsMs)}"
        return Array(s.utf8)
    }
}

enum JSON {
    static func append(_ v: String, to s: inout String) {
        s += "\""
        for u in v.unicodeScalars {
            switch u {
            case "\"": s += "\\\""
            case "\\": s += "\\\\"
            case "\n": s += "\\n"
            case "\r": s += "\\r"
            case "\t": s += "\\t"
            default:
                if u.value < 0x20 {
                    s += "\\u" + String(repeating: "0", count: 4 - String(u.value, radix: 16).count)
                        + String(u.value, radix: 16)
                } else {
                    s.unicodeScalars.append(u)
                }
            }
        }
        s += "\""
    }
}

/// The journal's binary framing: `[u32 length][u32 crc32c][type u8 + payload]`, little endian.
/// A record is trusted only if its whole frame is present and its checksum matches.
public enum JournalCodec {
    public static let headerBytes = 8
    /// Largest record accepted when reading (a corrupt length field cannot make us read garbage).
    public static let maxRecordBytes = 1 << 20

    public static func encode(_ r: JournalRecord, into out: inout [UInt8]) {
        var body: [UInt8] = []
        body.reserveCapacity(96)
        switch r {
        case .claim(let c):
            body.append(c.kind == .claimed ? 1 : c.kind == .unclaimed ? 5 : 6)
            put(c.claimID, &body)
            put(c.voucher, &body)
            put(c.user, &body)
            put(UInt64(c.qty), &body)
            put(c.region, &body)
            put(c.host, &body)
            put(UInt64(bitPattern: c.tsMs), &body)
            put(UInt64(c.shares.count), &body)
            for s in c.shares {
                put(s.leaseId, &body)
                put(UInt64(s.tokens), &body)
            }
            if let req = c.req {
                body.append(1)
                put(req, &body)
            } else {
                body.append(0)
            }
        case .leaseGranted(let v, let l, let g):
            body.append(2)
            put(v, &body)
            put(l, &body)
            put(UInt64(g), &body)
        case .leaseClosed(let v, let l):
            body.append(3)
            put(v, &body)
            put(l, &body)
        case .snapshot(let leases):
            body.append(4)
            put(UInt64(leases.count), &body)
            for o in leases {
                put(o.voucher, &body)
                put(o.lease, &body)
                put(UInt64(o.granted), &body)
                put(UInt64(o.served), &body)
            }
        }
        appendLE(UInt32(body.count), &out)
        appendLE(CRC32C.checksum(body), &out)
        out += body
    }

    /// The outcome of decoding at one offset.
    public enum Decoded: Equatable {
        case record(JournalRecord, next: Int)
        /// Not enough bytes for a whole frame (a torn tail if this is the end of the file).
        case incomplete
        /// A frame whose checksum or contents are wrong.
        case corrupt(String)
    }

    public static func decode(_ bytes: [UInt8], at offset: Int) -> Decoded {
        guard bytes.count - offset >= headerBytes else { return .incomplete }
        let len = Int(readLE(bytes, offset))
        let crc = readLE(bytes, offset + 4)
        guard len > 0, len <= maxRecordBytes else { return .corrupt("bad record length \(len)") }
        guard bytes.count - offset - headerBytes >= len else { return .incomplete }
        let body = Array(bytes[(offset + headerBytes)..<(offset + headerBytes + len)])
        guard CRC32C.checksum(body) == crc else { return .corrupt("checksum mismatch") }
        var r = Reader(bytes: body, at: 1)
        let record: JournalRecord?
        switch body[0] {
        case 1, 5, 6:
            record = r.claim(kind: body[0] == 1 ? .claimed : body[0] == 5 ? .unclaimed : .intent)
        case 2:
            if let v = r.string(), let l = r.string(), let g = r.int() {
                record = .leaseGranted(voucher: v, lease: l, granted: g)
            } else { record = nil }
        case 3:
            if let v = r.string(), let l = r.string() { record = .leaseClosed(voucher: v, lease: l) } else { record = nil }
        case 4:
            record = r.snapshot()
        default:
            record = nil
        }
        guard let record, r.atEnd else { return .corrupt("undecodable record of type \(body[0])") }
        return .record(record, next: offset + headerBytes + len)
    }

    private static func put(_ s: String, _ out: inout [UInt8]) {
        let u = Array(s.utf8)
        put(UInt64(u.count), &out)
        out += u
    }

    private static func put(_ v: UInt64, _ out: inout [UInt8]) {
        var v = v
        while v >= 0x80 {
            out.append(UInt8(v & 0x7f) | 0x80)
            v >>= 7
        }
        out.append(UInt8(v))
    }

    static func appendLE(_ v: UInt32, _ out: inout [UInt8]) {
        out += [UInt8(v & 0xff), UInt8((v >> 8) & 0xff), UInt8((v >> 16) & 0xff), UInt8(v >> 24)]
    }

    static func readLE(_ b: [UInt8], _ i: Int) -> UInt32 {
        UInt32(b[i]) | UInt32(b[i + 1]) << 8 | UInt32(b[i + 2]) << 16 | UInt32(b[i + 3]) << 24
    }

    struct Reader {
        let bytes: [UInt8]
        var at: Int
        var atEnd: Bool { at == bytes.count }

        mutating func varint() -> UInt64? {
            var v: UInt64 = 0
            var shift: UInt64 = 0
            while at < bytes.count, shift < 64 {
                let b = bytes[at]
                at += 1
                v |= UInt64(b & 0x7f) << shift
                if b < 0x80 { return v }
                shift += 7
            }
            return nil
        }

        mutating func int() -> Int? { varint().flatMap { $0 <= UInt64(Int.max) ? Int($0) : nil } }

        mutating func string() -> String? {
            guard let n = int(), n <= bytes.count - at else { return nil }
            defer { at += n }
            return String(decoding: bytes[at..<(at + n)], as: UTF8.self)
        }

        mutating func claim(kind: ClaimEvent.Kind) -> JournalRecord? {
            guard let id = string(), let v = string(), let u = string(), let q = int(), let rg = string(),
                let h = string(), let ts = varint(), let n = int(), n <= 64
            else { return nil }
            var shares: [ClaimShare] = []
            for _ in 0..<n {
                guard let l = string(), let t = int() else { return nil }
                shares.append(ClaimShare(leaseId: l, tokens: t))
            }
            guard at < bytes.count else { return nil }
            let hasReq = bytes[at]
            at += 1
            var req: String?
            if hasReq == 1 {
                guard let r = string() else { return nil }
                req = r
            } else if hasReq != 0 {
                return nil
            }
            return .claim(ClaimEvent(kind: kind, claimID: id, voucher: v, user: u, qty: q, region: rg, host: h,
                                     shares: shares, tsMs: Int64(bitPattern: ts), req: req))
        }

        mutating func snapshot() -> JournalRecord? {
            guard let n = int(), n <= 10_000_000 else { return nil }
            var out: [JournalRecord.OpenLease] = []
            for _ in 0..<n {
                guard let v = string(), let l = string(), let g = int(), let s = int() else { return nil }
                out.append(.init(voucher: v, lease: l, granted: g, served: s))
            }
            return .snapshot(out)
        }
    }
}

/// CRC-32C (Castagnoli), table driven.
public enum CRC32C {
    static let table: [UInt32] = (0..<256).map { i -> UInt32 in
        var c = UInt32(i)
        for _ in 0..<8 { c = c & 1 != 0 ? (c >> 1) ^ 0x82F6_3B78 : c >> 1 }
        return c
    }

    public static func checksum(_ bytes: [UInt8]) -> UInt32 {
        var c: UInt32 = 0xFFFF_FFFF
        for b in bytes { c = table[Int((c ^ UInt32(b)) & 0xff)] ^ (c >> 8) }
        return c ^ 0xFFFF_FFFF
    }
}
