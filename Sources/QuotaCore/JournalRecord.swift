import CCRC32C
/// One record of the local journal. Claims, cancellations and lease closes are what gets shipped
/// to Kafka; the other records let a restarted sidecar know exactly what each lease of a previous
/// run served, which lease requests may have been granted unseen, and under which durability mode
/// and region generation it ran. The fold of these records is ``LeaseLedger`` (one place).
///
/// (The cases whose payloads are large, one per lease or per boot, are `indirect`: boxed, so a record is a few
/// words. Inline, they made every record ~130 bytes: copied through an outlined copy of the whole enum (~145
/// instructions) wherever a switch or a call took one, once per claim in `LeaseLedger.apply` alone; issue 13.)
public enum JournalRecord: Sendable, Equatable {
    /// A granted claim, a cancellation (with where each share went) or a per-user intent.
    case claim(ClaimEvent)
    /// A per-user count owed for release was released in Redis (or never taken): the intent of a claim
    /// given up, or the count of a cancelled claim.
    case intentResolved(voucher: String, claimID: String)
    /// A cancelled claim's per-user count must be released (written with the cancellation).
    case releaseOwed(voucher: String, user: String, claimID: String)
    /// Redis took a cancellation's restock (or refused it for good): it is owed no more.
    case restocked(voucher: String, claimID: String)
    /// A `LEASE` with this request id is about to be sent (made durable before it is).
    case leaseRequested(voucher: String, req: String)
    /// Redis granted a lease (shipped as `lease_granted`). Written under `durability: journal|kafka`
    /// (`trusted`), every answered claim is in the journal before its reply, so the served count is exact.
    indirect case leaseGranted(LeaseGrantRecord)
    /// Redis answered request `req` without a lease (sold out, inactive, unknown).
    case leaseAnswered(voucher: String, req: String)
    /// Redis acknowledged the closing return of a lease (shipped as a `lease_closed` event).
    indirect case leaseClosed(LeaseClose)
    /// A process started on this journal.
    indirect case boot(JournalBoot)
    /// The region's Redis generation this host adopted (see docs/accounting.md, "Redis that forgets").
    case generation(String)
    /// The ledger's state at the start of a segment, so older segments can be deleted.
    indirect case snapshot(LeaseLedger.Snapshot)
}

/// Who wrote the records that follow: one per process start.
public struct JournalBoot: Sendable, Equatable {
    public var boot: String
    public var host: String
    /// `journal`, `kafka` or `none`: whether served counts written from here on can be trusted.
    public var durability: String
    public var tsMs: Int64
    public init(boot: String, host: String, durability: String, tsMs: Int64) {
        self.boot = boot
        self.host = host
        self.durability = durability
        self.tsMs = tsMs
    }
}

/// The journal's binary framing: `[u32 length][u32 crc32c][type u8 + payload]`, little endian.
/// A record is trusted only if its whole frame is present and its checksum matches.
///
/// Format 2: every segment starts with a snapshot record (type 12) that carries the format version;
/// segments of format 1 (snapshot type 4) are reported as undecodable, never misread.
public enum JournalCodec {
    public static let headerBytes = 8
    public static let formatVersion: UInt64 = 2
    /// Largest record accepted when reading (a corrupt length field cannot make us read garbage).
    public static let maxRecordBytes = 64 << 20

    public static func encode(_ r: JournalRecord, into out: inout [UInt8]) {
        // The frame is written in place: a header of zeros (length, checksum), the body after it, then the
        // header filled in. (A body array of its own, and the header's bytes as arrays, were three allocations
        // and a copy per record.)
        let start = out.count
        out.append(contentsOf: repeatElement(0, count: headerBytes))   // (not a static array: a retain and a release)
        switch r {
        case .claim(let c):
            encodeClaim(c, &out)
        case .intentResolved(let v, let c):
            out.append(13)
            put(v, &out)
            put(c, &out)
        case .releaseOwed(let v, let u, let c):
            out.append(15)
            put(v, &out)
            put(u, &out)
            put(c, &out)
        case .restocked(let v, let c):
            out.append(16)
            put(v, &out)
            put(c, &out)
        case .leaseRequested(let v, let req):
            out.append(7)
            put(v, &out)
            put(req, &out)
        case .leaseGranted(let g):
            out.append(8)
            put(g.voucher, &out)
            put(g.lease, &out)
            put(UInt64(g.granted), &out)
            put(g.req, &out)
            put(g.region, &out)
            put(g.host, &out)
            put(g.durability, &out)
            put(UInt64(bitPattern: g.tsMs), &out)
        case .leaseAnswered(let v, let req):
            out.append(9)
            put(v, &out)
            put(req, &out)
        case .leaseClosed(let c):
            out.append(10)
            put(c.voucher, &out)
            put(c.lease, &out)
            put(c.region, &out)
            put(c.host, &out)
            put(UInt64(c.granted), &out)
            put(UInt64(c.served), &out)
            put(UInt64(c.returned), &out)
            put(UInt64(bitPattern: c.tsMs), &out)
            out.append(c.gone ? 1 : 0)
        case .boot(let b):
            out.append(11)
            put(b.boot, &out)
            put(b.host, &out)
            put(b.durability, &out)
            put(UInt64(bitPattern: b.tsMs), &out)
        case .generation(let g):
            out.append(14)
            put(g, &out)
        case .snapshot(let s):
            out.append(12)
            put(formatVersion, &out)
            put(s.generation ?? "", &out)
            put(UInt64(s.accounts.count), &out)
            for a in s.accounts {
                put(a.voucher, &out)
                put(a.lease, &out)
                put(UInt64(a.granted), &out)
                put(UInt64(a.served), &out)
                put(UInt64(a.restocked), &out)
                out.append(a.trusted ? 1 : 0)
            }
            put(UInt64(s.requests.count), &out)
            for q in s.requests {
                put(q.voucher, &out)
                put(q.req, &out)
            }
            put(UInt64(s.owedRestocks.count), &out)
            for e in s.owedRestocks { encodeClaim(e, &out) }
            put(UInt64(s.owedReleases.count), &out)
            for r in s.owedReleases {
                put(r.voucher, &out)
                put(r.user, &out)
                put(r.claimID, &out)
            }
        }
        let length = out.count - start - headerBytes
        out.withUnsafeMutableBytes { raw in
            let crc = CRC32C.update(0xFFFF_FFFF, UnsafeRawBufferPointer(rebasing: raw[(start + headerBytes)...])) ^ 0xFFFF_FFFF
            raw.storeBytes(of: UInt32(length).littleEndian, toByteOffset: start, as: UInt32.self)
            raw.storeBytes(of: crc.littleEndian, toByteOffset: start + 4, as: UInt32.self)
        }
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
        let start = offset + headerBytes
        guard CRC32C.checksum(bytes[start..<(start + len)]) == crc else { return .corrupt("checksum mismatch") }
        let body = Array(bytes[start..<(start + len)])
        var r = Reader(bytes: body, at: 1)
        let record: JournalRecord?
        switch body[0] {
        case 1, 5, 6:
            record = r.claim(kind: body[0] == 1 ? .claimed : body[0] == 5 ? .unclaimed : .intent)
        case 13:
            if let v = r.string(), let c = r.string() { record = .intentResolved(voucher: v, claimID: c) } else { record = nil }
        case 15:
            if let v = r.string(), let u = r.string(), let c = r.string() {
                record = .releaseOwed(voucher: v, user: u, claimID: c)
            } else { record = nil }
        case 16:
            if let v = r.string(), let c = r.string() { record = .restocked(voucher: v, claimID: c) } else { record = nil }
        case 7:
            if let v = r.string(), let q = r.string() { record = .leaseRequested(voucher: v, req: q) } else { record = nil }
        case 8:
            if let v = r.string(), let l = r.string(), let g = r.int(), let q = r.string(), let rg = r.string(),
                let h = r.string(), let d = r.string(), let ts = r.varint()
            {
                record = .leaseGranted(LeaseGrantRecord(voucher: v, lease: l, granted: g, req: q, region: rg, host: h,
                                                        durability: d, tsMs: Int64(bitPattern: ts)))
            } else { record = nil }
        case 9:
            if let v = r.string(), let q = r.string() { record = .leaseAnswered(voucher: v, req: q) } else { record = nil }
        case 10:
            if let v = r.string(), let l = r.string(), let rg = r.string(), let h = r.string(), let g = r.int(),
                let s = r.int(), let rt = r.int(), let ts = r.varint(), let gone = r.flag()
            {
                record = .leaseClosed(LeaseClose(voucher: v, lease: l, region: rg, host: h, granted: g, served: s,
                                                 returned: rt, tsMs: Int64(bitPattern: ts), gone: gone))
            } else { record = nil }
        case 11:
            if let b = r.string(), let h = r.string(), let d = r.string(), let ts = r.varint() {
                record = .boot(JournalBoot(boot: b, host: h, durability: d, tsMs: Int64(bitPattern: ts)))
            } else { record = nil }
        case 14:
            record = r.string().map { .generation($0) }
        case 12:
            record = r.snapshot()
        default:
            record = nil
        }
        guard let record, r.atEnd else { return .corrupt("undecodable record of type \(body[0])") }
        return .record(record, next: start + len)
    }

    /// A claim record's body: its type byte, then its fields (also used inside snapshots).
    ///
    /// The claim path's record: room for the most it can take is made at once (zeros copied in), the fields
    /// are written through a pointer, and the rest is cut off. (Appended field by field, byte by byte, each
    /// append checked the array's uniqueness and capacity: ~1,000 instructions a claim, issue 13.)
    private static func encodeClaim(_ c: ClaimEvent, _ body: inout [UInt8]) {
        // The decoder refuses more (recovery would stop trusting the segment there): the stock never takes a claim
        // from more leases than this, so more is a bug, stopped here rather than written as an unreadable record.
        precondition(c.shares.count <= ClaimEvent.maxShares, "a claim of more shares than a journal record holds")
        // The most each field takes: a varint is at most 10 bytes; a string is its length's varint and its bytes.
        var bound = 1 + 10 * 5 + 1 + 10 * (5 + 2 * c.shares.count)
        bound += c.claimIDByteCount + c.voucher.utf8.count + c.user.utf8.count + c.region.utf8.count + c.host.utf8.count
        for s in c.shares { bound += s.leaseId.utf8.count }
        if let req = c.req { bound += 10 + req.utf8.count }
        let start = body.count
        if bound <= zeros.count {
            zeros.withUnsafeBufferPointer { body.append(contentsOf: $0[0..<bound]) }
        } else {
            body.append(contentsOf: repeatElement(0, count: bound))
        }
        let used = body.withUnsafeMutableBufferPointer { buf -> Int in
            var w = Writer(p: buf.baseAddress! + start)
            w.byte(c.kind == .claimed ? 1 : c.kind == .unclaimed ? 5 : 6)
            if let (prefix, seq) = c.claimNumber { w.string(prefix, thenNumber: seq) } else { w.string(c.claimID) }
            w.string(c.voucher)
            w.string(c.user)
            w.varint(UInt64(c.qty))
            w.string(c.region)
            w.string(c.host)
            w.varint(UInt64(bitPattern: c.tsMs))
            w.varint(UInt64(c.shares.count))
            for s in c.shares {
                w.string(s.leaseId)
                w.varint(UInt64(s.tokens))
            }
            if let req = c.req {
                w.byte(1)
                w.string(req)
            } else {
                w.byte(0)
            }
            w.varint(c.toPool)
            return w.at
        }
        precondition(used <= bound, "a claim record took \(used) bytes, more than its bound \(bound)")
        body.removeLast(bound - used)
    }

    private static let zeros = [UInt8](repeating: 0, count: 4096)

    /// Writes fields at a pointer (room for them was made before).
    private struct Writer {
        let p: UnsafeMutablePointer<UInt8>
        var at = 0

        @inline(__always)
        mutating func byte(_ b: UInt8) {
            p[at] = b
            at += 1
        }

        @inline(__always)
        mutating func varint(_ v: UInt64) {
            var v = v
            while v >= 0x80 {
                p[at] = UInt8(v & 0x7f) | 0x80
                at += 1
                v >>= 7
            }
            p[at] = UInt8(v)
            at += 1
        }

        @inline(__always)
        mutating func string(_ s: String) {
            s.withUTF8Bytes { u in
                varint(UInt64(u.count))
                if let from = u.baseAddress, u.count > 0 { (p + at).update(from: from, count: u.count) }
                at += u.count
            }
        }

        /// `s` followed by `number`'s base-36 digits (``ClaimNumber``), as one string.
        mutating func string(_ s: String, thenNumber number: Int) {
            let digits = ClaimNumber.count(number)
            s.withUTF8Bytes { u in
                varint(UInt64(u.count + digits))
                if let from = u.baseAddress, u.count > 0 { (p + at).update(from: from, count: u.count) }
                at += u.count
            }
            ClaimNumber.write(number, digits: digits, at: p + at)
            at += digits
        }
    }

    private static func put(_ s: String, _ out: inout [UInt8]) {
        s.withUTF8Bytes { u in
            put(UInt64(u.count), &out)
            out.append(contentsOf: u)
        }
    }

    /// (The other records' varints, through the claim records' ``Writer``: one encoder of varints.)
    private static func put(_ v: UInt64, _ out: inout [UInt8]) {
        withUnsafeTemporaryAllocation(of: UInt8.self, capacity: 10) { room in
            var w = Writer(p: room.baseAddress!)
            w.varint(v)
            out.append(contentsOf: room[0..<w.at])
        }
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

        mutating func flag() -> Bool? {
            guard at < bytes.count, bytes[at] <= 1 else { return nil }
            defer { at += 1 }
            return bytes[at] == 1
        }

        mutating func string() -> String? {
            guard let n = int(), n <= bytes.count - at else { return nil }
            defer { at += n }
            return String(decoding: bytes[at..<(at + n)], as: UTF8.self)
        }

        /// A claim body inside a snapshot (its own type byte first).
        mutating func claimEvent() -> ClaimEvent? {
            guard at < bytes.count else { return nil }
            let t = bytes[at]
            at += 1
            let kind: ClaimEvent.Kind
            switch t {
            case 1: kind = .claimed
            case 5: kind = .unclaimed
            case 6: kind = .intent
            default: return nil
            }
            if case .claim(let e)? = claim(kind: kind) { return e }
            return nil
        }

        mutating func claim(kind: ClaimEvent.Kind) -> JournalRecord? {
            guard let id = string(), let v = string(), let u = string(), let q = int(), let rg = string(),
                let h = string(), let ts = varint(), let n = int(), n <= ClaimEvent.maxShares
            else { return nil }
            var shares = ClaimShares()
            for _ in 0..<n {
                guard let l = string(), let t = int() else { return nil }
                shares.append(ClaimShare(leaseId: l, tokens: t))
            }
            guard let hasReq = flag() else { return nil }
            var req: String?
            if hasReq {
                guard let r = string() else { return nil }
                req = r
            }
            guard let toPool = varint() else { return nil }
            return .claim(ClaimEvent(kind: kind, claimID: id, voucher: v, user: u, qty: q, region: rg, host: h,
                                     shares: shares, tsMs: Int64(bitPattern: ts), req: req, toPool: toPool))
        }

        mutating func snapshot() -> JournalRecord? {
            guard varint() == JournalCodec.formatVersion, let gen = string(), let n = int(), n <= 10_000_000
            else { return nil }
            var accounts: [LeaseLedger.Account] = []
            for _ in 0..<n {
                guard let v = string(), let l = string(), let g = int(), let s = int(), let k = int(),
                    let t = flag()
                else { return nil }
                accounts.append(.init(voucher: v, lease: l, granted: g, served: s, restocked: k, trusted: t))
            }
            guard let m = int(), m <= 10_000_000 else { return nil }
            var requests: [LeaseLedger.Request] = []
            for _ in 0..<m {
                guard let v = string(), let q = string() else { return nil }
                requests.append(.init(voucher: v, req: q))
            }
            guard let nr = int(), nr <= 10_000_000 else { return nil }
            var restocks: [ClaimEvent] = []
            for _ in 0..<nr {
                guard let e = claimEvent() else { return nil }
                restocks.append(e)
            }
            guard let nu = int(), nu <= 10_000_000 else { return nil }
            var releases: [LeaseLedger.Release] = []
            for _ in 0..<nu {
                guard let v = string(), let u = string(), let c = string() else { return nil }
                releases.append(.init(voucher: v, user: u, claimID: c))
            }
            return .snapshot(.init(generation: gen.isEmpty ? nil : gen, accounts: accounts, requests: requests,
                                   owedRestocks: restocks, owedReleases: releases))
        }
    }
}

/// CRC-32C (Castagnoli), slicing-by-8 over tables built once.
public enum CRC32C {
    static let tables: [[UInt32]] = {
        var t = [[UInt32]](repeating: [UInt32](repeating: 0, count: 256), count: 8)
        for i in 0..<256 {
            var c = UInt32(i)
            for _ in 0..<8 { c = c & 1 != 0 ? (c >> 1) ^ 0x82F6_3B78 : c >> 1 }
            t[0][i] = c
        }
        for i in 0..<256 {
            for k in 1..<8 { t[k][i] = (t[k - 1][i] >> 8) ^ t[0][Int(t[k - 1][i] & 0xff)] }
        }
        return t
    }()

    public static func checksum<C: Collection>(_ bytes: C) -> UInt32 where C.Element == UInt8 {
        var c: UInt32 = 0xFFFF_FFFF
        let done: Bool? = bytes.withContiguousStorageIfAvailable { buf in
            c = update(c, UnsafeRawBufferPointer(buf))
            return true
        }
        if done == nil {
            let a = Array(bytes)
            a.withUnsafeBytes { c = update(c, $0) }
        }
        return c ^ 0xFFFF_FFFF
    }

    /// Whether this CPU computes CRC-32C itself (then ``update(_:_:)`` uses its instructions).
    public static let hardware = quota_crc32c_hardware() == 1

    static func update(_ crc: UInt32, _ p: UnsafeRawBufferPointer) -> UInt32 {
        guard hardware, let base = p.baseAddress else { return updateTable(crc, p) }
        return quota_crc32c_update_hw(crc, base, p.count)
    }

    /// The same, from tables (slicing by 8): for CPUs without the instructions, and the reference in tests.
    static func updateTable(_ crc: UInt32, _ p: UnsafeRawBufferPointer) -> UInt32 {
        var c = crc
        var i = 0
        let n = p.count
        tables.withUnsafeBufferPointer { t in
            let t0 = t[0], t1 = t[1], t2 = t[2], t3 = t[3], t4 = t[4], t5 = t[5], t6 = t[6], t7 = t[7]
            while n - i >= 8 {
                let lo = c ^ (UInt32(p[i]) | UInt32(p[i + 1]) << 8 | UInt32(p[i + 2]) << 16 | UInt32(p[i + 3]) << 24)
                c = t7[Int(lo & 0xff)] ^ t6[Int((lo >> 8) & 0xff)] ^ t5[Int((lo >> 16) & 0xff)] ^ t4[Int(lo >> 24)]
                    ^ t3[Int(p[i + 4])] ^ t2[Int(p[i + 5])] ^ t1[Int(p[i + 6])] ^ t0[Int(p[i + 7])]
                i += 8
            }
            while i < n {
                c = t0[Int((c ^ UInt32(p[i])) & 0xff)] ^ (c >> 8)
                i += 1
            }
        }
        return c
    }
}
