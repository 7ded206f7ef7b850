import Glibc

/// A granted claim (or a cancellation of one) as journaled and streamed to Kafka.
public struct ClaimEvent: Sendable, Equatable {
    /// `claimed` and `unclaimed` are shipped to Kafka; `intent` (a claim waiting for its per-user
    /// check) stays in the journal, so a crash between the check and the claim can be undone.
    public enum Kind: UInt8, Sendable { case claimed = 1, unclaimed = 2, intent = 3 }

    /// The fields, in one heap box shared by copies (copy-on-write). An event is copied several times
    /// per claim (the machine's effects, the journal, the UNCLAIM book, the Kafka queue); inline, each
    /// copy retained and released its six strings and its shares array (measured: issue 13, README).
    /// (Immutable: a change makes a new box (``update(_:)``; changes are rare, off the claim path). A `let` field is
    /// read in place: through a `var` every read of a string or the shares was a retain and a release, ~25 a claim
    /// on the journal thread; issue 13.)
    private final class Box: Sendable {
        let f: Fields
        init(_ f: Fields) { self.f = f }
    }

    private struct Fields: Equatable, Sendable {
        var kind: Kind
        /// The claim id: `idHead` itself when `idSeq` is negative, else `idHead` followed by `idSeq` in base 36
        /// (``ClaimEvent/claimID(prefix:seq:)``). A claim made here keeps its id as its parts, and every
        /// encoder writes the digits where they go: no `String` is made for it on the claim path (issue 13).
        var idHead: String
        var idSeq: Int
        var voucher: String
        var user: String
        var qty: Int
        var region: String
        var host: String
        var shares: ClaimShares
        var tsMs: Int64
        var req: String?
        var toPool: UInt64

        var claimID: String { idSeq < 0 ? idHead : ClaimEvent.claimID(prefix: idHead, seq: idSeq) }

        /// Ids compare as their text, whichever way each is kept.
        func sameID(_ o: Fields) -> Bool {
            if idSeq >= 0, o.idSeq >= 0, idHead == o.idHead { return idSeq == o.idSeq }
            if idSeq < 0, o.idSeq < 0 { return idHead == o.idHead }
            return claimID == o.claimID
        }

        static func == (a: Fields, b: Fields) -> Bool {
            a.kind == b.kind && a.sameID(b) && a.voucher == b.voucher && a.user == b.user && a.qty == b.qty
                && a.region == b.region && a.host == b.host && a.shares == b.shares && a.tsMs == b.tsMs && a.req == b.req
                && a.toPool == b.toPool
        }
    }

    private var box: Box

    private var fields: Fields {
        get { box.f }
        _modify {
            var f = box.f
            yield &f
            box = Box(f)
        }
    }

    /// Several changes in one new box.
    private mutating func update(_ body: (inout Fields) -> Void) {
        var f = box.f
        body(&f)
        box = Box(f)
    }

    public var kind: Kind { get { box.f.kind } set { fields.kind = newValue } }
    public var claimID: String {
        get { box.f.claimID }
        set {
            update {
                $0.idHead = newValue
                $0.idSeq = -1
            }
        }
    }
    /// The id's parts when it is a prefix and a sequence number (a claim made by this process), else nil.
    public var claimNumber: (prefix: String, seq: Int)? { box.f.idSeq < 0 ? nil : (box.f.idHead, box.f.idSeq) }
    /// The id's sequence number when the id is `prefix` followed by it, else nil (``claimNumber``'s, without a copy of
    /// its prefix).
    public func claimNumber(ifPrefix prefix: String) -> Int? { box.f.idSeq >= 0 && box.f.idHead == prefix ? box.f.idSeq : nil }
    /// The id's length in bytes, without making it.
    public var claimIDByteCount: Int {
        box.f.idSeq < 0 ? box.f.idHead.utf8.count : box.f.idHead.utf8.count + ClaimNumber.count(box.f.idSeq)
    }
    public var voucher: String { get { box.f.voucher } set { fields.voucher = newValue } }
    public var user: String { get { box.f.user } set { fields.user = newValue } }
    public var qty: Int { get { box.f.qty } set { fields.qty = newValue } }
    public var region: String { get { box.f.region } set { fields.region = newValue } }
    public var host: String { get { box.f.host } set { fields.host = newValue } }
    /// Which lease served how many of the claim's tokens (their sum is `qty`).
    public var shares: ClaimShares { get { box.f.shares } set { fields.shares = newValue } }
    /// `body` given the shares where they are kept: ``shares`` gives a copy, a retain and a release of a lease id
    /// or an array, which a caller that only reads them need not pay (issue 13).
    public func withShares<R>(_ body: (ClaimShares) throws -> R) rethrows -> R { try body(box.f.shares) }
    public var tsMs: Int64 { get { box.f.tsMs } set { fields.tsMs = newValue } }
    /// The client's request id (`CLAIM … REQ id`), journal only.
    public var req: String? { get { box.f.req } set { fields.req = newValue } }
    /// Cancellations only: bit `i` set means share `i` went back to the region pool (a restock,
    /// because its lease was no longer held open on this host); clear means it went back to its
    /// lease, which was still open here. See docs/accounting.md.
    public var toPool: UInt64 { get { box.f.toPool } set { fields.toPool = newValue } }

    public init(kind: Kind = .claimed, claimID: String, voucher: String, user: String, qty: Int, region: String,
                host: String, shares: ClaimShares, tsMs: Int64, req: String? = nil, toPool: UInt64 = 0) {
        box = Box(Fields(kind: kind, idHead: claimID, idSeq: -1, voucher: voucher, user: user, qty: qty, region: region,
                         host: host, shares: shares, tsMs: tsMs, req: req, toPool: toPool))
    }

    /// A claim whose id is `idPrefix` followed by `seq` in base 36 (``claimID(prefix:seq:)``), kept as those parts.
    public init(kind: Kind = .claimed, idPrefix: String, seq: Int, voucher: String, user: String, qty: Int, region: String,
                host: String, shares: ClaimShares, tsMs: Int64, req: String? = nil, toPool: UInt64 = 0) {
        precondition(seq >= 0, "claim sequence numbers are never negative")
        box = Box(Fields(kind: kind, idHead: idPrefix, idSeq: seq, voucher: voucher, user: user, qty: qty, region: region,
                         host: host, shares: shares, tsMs: tsMs, req: req, toPool: toPool))
    }

    public static func == (a: ClaimEvent, b: ClaimEvent) -> Bool { a.box === b.box || a.box.f == b.box.f }

    /// Most shares one claim may have (the journal refuses more when decoding).
    public static let maxShares = 64

    /// Did share `i` of this cancellation go to the pool (restock) rather than back to its lease?
    public func sharesToPool(_ i: Int) -> Bool { toPool & (1 << UInt64(i)) != 0 }

    /// Tokens of this cancellation that went to the pool.
    public var tokensToPool: Int {
        var n = 0
        for (i, s) in shares.enumerated() where sharesToPool(i) { n += s.tokens }
        return n
    }

    /// The `unclaimed` event cancelling this claim, stamped `tsMs` (no request id); `toPool` says
    /// which shares went back to the pool.
    public func cancellation(tsMs: Int64, toPool: UInt64) -> ClaimEvent {
        var c = self
        c.update {
            $0.kind = .unclaimed
            $0.tsMs = tsMs
            $0.req = nil
            $0.toPool = toPool
        }
        return c
    }

    /// The Kafka value (CONTRACT §4): one JSON object. `leases` says which lease served how many
    /// tokens; in a cancellation each share also says where it went (`"to":"lease"|"pool"`).
    public var kafkaValue: [UInt8] {
        var cache = KafkaValueCache()
        return kafkaValue(cache: &cache)
    }

    /// ``kafkaValue``, with the fields a run of events shares (the voucher; the region and host, constant
    /// per sidecar) escaped once per run and copied in after (issue 13: ~40 % of a value's cost was escaping
    /// those three strings again for every claim).
    public func kafkaValue(cache: inout KafkaValueCache) -> [UInt8] {
        var scratch = ScratchBytes()
        return withKafkaValue(cache: &cache, scratch: &scratch) { Array($0) }
    }

    /// ``kafkaValue(cache:)`` written into `scratch` and handed to `body`, valid only during it: a run of values
    /// produced one after the other reuses one buffer (librdkafka copies each), no array made and freed per
    /// value; and the cache's escaped fields are copied in from where they are kept, not returned as arrays
    /// (a retain and a release each; issue 13).
    public func withKafkaValue<R, E: Error>(cache: inout KafkaValueCache, scratch: inout ScratchBytes,
                                            _ body: (UnsafeRawBufferPointer) throws(E) -> R) throws(E) -> R {
        // Read through the box: its fields are `let`, read in place.
        let b = box
        cache.update(voucher: b.f.voucher, region: b.f.region, host: b.f.host)
        let numbered = b.f.idSeq >= 0
        if numbered { cache.updateIdHead(b.f.idHead) }
        cache.updateTimestamp(b.f.tsMs)
        let r = JSONBytes.room
        var bound = 160 + (numbered ? cache.idHead.json.count : r(b.f.idHead)) + JSONBytes.intRoom + cache.voucher.json.count
            + r(b.f.user) + cache.hostJSON.count + cache.tsDigits.count + 2 * JSONBytes.intRoom
        for i in b.f.shares.indices { bound += 64 + r(b.f.shares[i].leaseId) + JSONBytes.intRoom }
        // (Written here, not in a closure: the cache's kept JSON, read through a closure's capture of it, was
        // retained and released around each use.)
        var j = scratch.begin(bound: bound)
        j.raw(b.f.kind == .claimed ? "{\"type\":\"claimed\",\"claim_id\":" : "{\"type\":\"unclaimed\",\"claim_id\":")
        if numbered {
            cache.idHead.json.withUnsafeBufferPointer { j.bytes($0) }
            j.claimNumber(b.f.idSeq)
            j.raw("\"")
        } else {
            j.string(b.f.idHead)
        }
        j.raw(",\"voucher\":")
        cache.voucher.json.withUnsafeBufferPointer { j.bytes($0) }
        j.raw(",\"user\":")
        j.string(b.f.user)
        j.raw(",\"qty\":")
        j.int(b.f.qty)
        cache.hostJSON.withUnsafeBufferPointer { j.bytes($0) }
        j.raw(",\"leases\":[")
        for i in b.f.shares.indices {
            if i > 0 { j.raw(",") }
            j.raw("{\"id\":")
            cache.updateLease(b.f.shares[i].leaseId)
            cache.lease.json.withUnsafeBufferPointer { j.bytes($0) }
            j.raw(",\"qty\":")
            j.int(b.f.shares[i].tokens)
            if b.f.kind == .unclaimed { j.raw(sharesToPool(i) ? ",\"to\":\"pool\"" : ",\"to\":\"lease\"") }
            j.raw("}")
        }
        j.raw("],\"ts_ms\":")
        cache.tsDigits.withUnsafeBufferPointer { j.bytes($0) }
        j.raw("}")
        let n = j.count
        return try scratch.withBytes(count: n, body)
    }
}

/// Bytes that a run of values is written into one after the other, each used (copied out) before the next is
/// written: one buffer for the run, grown when a value needs more. (Not copyable: it owns its memory.)
public struct ScratchBytes: ~Copyable {
    private var p: UnsafeMutablePointer<UInt8>
    private var capacity: Int

    public init(capacity: Int = 512) {
        self.capacity = max(capacity, 16)
        p = .allocate(capacity: self.capacity)
    }

    deinit { p.deallocate() }

    /// A writer of at most `bound` bytes at the start of the buffer, valid until the next call.
    mutating func begin(bound: Int) -> JSONBytes {
        if bound > capacity {
            p.deallocate()
            capacity = max(bound, 2 * capacity)
            p = .allocate(capacity: capacity)
        }
        return JSONBytes(p: p, capacity: bound)
    }

    /// The first `count` bytes written.
    func withBytes<R, E: Error>(count: Int, _ body: (UnsafeRawBufferPointer) throws(E) -> R) throws(E) -> R {
        try body(UnsafeRawBufferPointer(start: p, count: count))
    }
}

/// The escaped JSON of the fields a run of claim events shares: the voucher (`"id"`), and the region and host
/// (`,"region":"…","host":"…"`). Kept by whoever encodes a run of values (one shipping batch); an event whose
/// fields differ from the cached ones replaces them, so any event gives the same bytes as without a cache.
public struct KafkaValueCache: Sendable {
    /// Whether two runs of bytes are equal.
    static func sameBytes(_ x: UnsafeBufferPointer<UInt8>, _ y: UnsafeBufferPointer<UInt8>) -> Bool {
        guard x.count == y.count else { return false }
        guard let p = x.baseAddress, let q = y.baseAddress else { return true }
        return memcmp(p, q, x.count) == 0
    }

    /// One field's last value and its JSON, made again only for a value of other bytes.
    struct Slot {
        var value: String?
        var json: [UInt8] = []

        mutating func update(_ v: String, _ make: (String) -> [UInt8]) {
            if !KafkaValueCache.same(v, value) {
                value = v
                json = make(v)
            }
        }
    }

    // (Read in place by ``ClaimEvent/withKafkaValue(cache:scratch:_:)`` after an `update…`.)
    private(set) var voucher = Slot()
    private(set) var idHead = Slot()
    private(set) var lease = Slot()
    private var region: String?
    private var host: String?
    private(set) var hostJSON: [UInt8] = []

    public init() {}

    /// `v` as a JSON string.
    private static func quoted(_ v: String) -> [UInt8] { JSONBytes.build(bound: JSONBytes.room(v)) { $0.string(v) } }

    /// Whether `a` and `b` are the same bytes. Compared by their bytes: `String`'s `==` is canonical equivalence
    /// ("ü" precomposed equals "u" and a combining mark), which would ship an event with another one's bytes
    /// (helper-41). (With `memcmp`: `elementsEqual` cost ~500 instructions a claim for the three fields. First
    /// the strings' own two words: equal words are the same bytes, inline (up to 15 bytes) or the same storage,
    /// which cannot change while the cache holds it too; a claim's fields share its rules'.)
    @inline(__always)
    static func same(_ a: String, _ b: String?) -> Bool {
        guard let b else { return false }
        if MemoryLayout<String>.size == 16,
            unsafeBitCast(a, to: (UInt64, UInt64).self) == unsafeBitCast(b, to: (UInt64, UInt64).self)
        {
            return true
        }
        guard a.utf8.count == b.utf8.count else { return false }
        return a.withUTF8Bytes { x in b.withUTF8Bytes { y in Self.sameBytes(x, y) } }
    }

    /// A claim id's prefix as the start of a JSON string (``idHead``): its opening quote and escaped bytes, no
    /// closing quote (the number's digits and the quote follow). A voucher's claims share one prefix.
    mutating func updateIdHead(_ h: String) {
        idHead.update(h) { Array(Self.quoted($0).dropLast()) }   // (without the closing quote)
    }

    /// A lease id as a JSON string (``lease``; the last one's kept: a run of claims is mostly served by one lease).
    mutating func updateLease(_ l: String) { lease.update(l, Self.quoted) }

    private var ts: Int64?
    /// The last timestamp's digits (``updateTimestamp(_:)``).
    private(set) var tsDigits: [UInt8] = []

    /// A timestamp's digits (the last one's kept: a run of claims shares its millisecond mostly, and 13 digits
    /// made one by one were ~300 instructions a claim; issue 13).
    mutating func updateTimestamp(_ t: Int64) {
        if t != ts {
            ts = t
            tsDigits = JSONBytes.build(bound: JSONBytes.intRoom + 1) { $0.int(t) }
        }
    }

    /// The voucher's JSON string (``voucher``) and the region's and host's fields (``hostJSON``).
    mutating func update(voucher v: String, region g: String, host h: String) {
        voucher.update(v, Self.quoted)
        let same = Self.same
        if !same(g, region) || !same(h, host) {
            region = g
            host = h
            hostJSON = JSONBytes.build(bound: 32 + JSONBytes.room(g) + JSONBytes.room(h)) { j in
                j.raw(",\"region\":")
                j.string(g)
                j.raw(",\"host\":")
                j.string(h)
            }
        }
    }
}

/// Redis granted a lease to a host (shipped as a `lease_granted` event, before any claim of it).
public struct LeaseGrantRecord: Sendable, Equatable {
    public var voucher: String
    public var lease: String
    public var granted: Int
    /// The request id it was granted to.
    public var req: String
    public var region: String
    public var host: String
    /// `journal`, `kafka` or `none`: the durability mode its claims were answered under. Under `kafka`,
    /// every answered claim of it is on Kafka before its reply, so the stream proves what it served.
    public var durability: String
    public var tsMs: Int64

    public init(voucher: String, lease: String, granted: Int, req: String, region: String, host: String,
                durability: String, tsMs: Int64) {
        self.voucher = voucher
        self.lease = lease
        self.granted = granted
        self.req = req
        self.region = region
        self.host = host
        self.durability = durability
        self.tsMs = tsMs
    }

    /// Served counts journaled for it are exact (every answered claim was journaled before its reply).
    public var trusted: Bool { durability != "none" }

    /// The Kafka value: a `lease_granted` event.
    public var kafkaValue: [UInt8] {
        JSONBytes.leaseEvent("{\"type\":\"lease_granted\",\"voucher\":", voucher: voucher, region: region, host: host,
                             lease: lease, granted: granted, more: JSONBytes.room(durability) + JSONBytes.intRoom) { j in
            j.raw(",\"durability\":")
            j.string(durability)
            j.raw(",\"ts_ms\":")
            j.int(tsMs)
            j.raw("}")
        }
    }
}

/// A host closed a lease and Redis acknowledged it: the lease's record on this host is complete.
public struct LeaseClose: Sendable, Equatable {
    public var voucher: String
    public var lease: String
    public var region: String
    public var host: String
    public var granted: Int
    /// Tokens served from the lease and not put back (net of cancellations that went back to it).
    public var served: Int
    /// Tokens given back to the pool by the lease's returns (cumulative): `granted - served`.
    public var returned: Int
    public var tsMs: Int64
    /// Redis said the lease was already closed or reclaimed when this host tried to renew it: nothing
    /// was returned by this host, and `served` is what it had committed by then.
    public var gone: Bool

    public init(voucher: String, lease: String, region: String, host: String, granted: Int, served: Int,
                returned: Int, tsMs: Int64, gone: Bool = false) {
        self.voucher = voucher
        self.lease = lease
        self.region = region
        self.host = host
        self.granted = granted
        self.served = served
        self.returned = returned
        self.tsMs = tsMs
        self.gone = gone
    }

    /// The Kafka value (CONTRACT §4): a `lease_closed` event.
    public var kafkaValue: [UInt8] {
        JSONBytes.leaseEvent("{\"type\":\"lease_closed\",\"voucher\":", voucher: voucher, region: region, host: host,
                             lease: lease, granted: granted, more: 3 * JSONBytes.intRoom) { j in
            j.raw(",\"served\":")
            j.int(served)
            j.raw(",\"returned\":")
            j.int(returned)
            if gone { j.raw(",\"gone\":true") }
            j.raw(",\"ts_ms\":")
            j.int(tsMs)
            j.raw("}")
        }
    }
}

/// JSON text written straight into bytes (the Kafka values): a string's bytes are copied in runs and only
/// `"`, `\\` and control characters are escaped (UTF-8 multi-byte sequences never contain those bytes).
/// Issue 13: the previous encoder appended one Unicode scalar at a time to a `String`, ~20 % of quotad's
/// CPU in the durable modes.
struct JSONBytes {
    private let p: UnsafeMutablePointer<UInt8>
    private let capacity: Int
    private(set) var count = 0

    init(p: UnsafeMutablePointer<UInt8>, capacity: Int) {
        self.p = p
        self.capacity = capacity
    }

    /// A JSON value of at most `bound` bytes, written by `body` straight into the array's storage: one
    /// allocation, no growth, no per-byte checks of the array (issue 13: appended byte by byte to a growing
    /// array, a claim's value cost ~3,500 instructions).
    static func build(bound: Int, _ body: (inout JSONBytes) -> Void) -> [UInt8] {
        [UInt8](unsafeUninitializedCapacity: bound) { buf, n in
            var j = JSONBytes(p: buf.baseAddress!, capacity: bound)
            body(&j)
            n = j.count
        }
    }

    /// The most room `s` takes as a JSON string: every byte escaped (`\u00XX`), and its quotes.
    static func room(_ s: String) -> Int { 6 * s.utf8.count + 2 }
    /// The most room an integer takes: 20 digits, or 19 and a sign.
    static let intRoom = 20

    /// (Every write checks the room left: a bound computed too small is a bug, and stops here.)
    @inline(__always)
    private mutating func reserve(_ n: Int) {
        precondition(count + n <= capacity, "JSON value over its bound of \(capacity) bytes")
    }

    mutating func raw(_ s: StaticString) {
        let n = s.utf8CodeUnitCount
        reserve(n)
        (p + count).update(from: s.utf8Start, count: n)
        count += n
    }

    /// Bytes already encoded as JSON, copied in. (The cache's kept fields come through their buffers: an array
    /// passed from where it is kept was a retain and a release each; issue 13.)
    mutating func bytes(_ b: UnsafeBufferPointer<UInt8>) {
        reserve(b.count)
        if let base = b.baseAddress { (p + count).update(from: base, count: b.count) }
        count += b.count
    }

    /// Decimal digits written straight into the output (no string made).
    mutating func int<T: BinaryInteger>(_ v: T) {
        reserve(Self.intRoom)
        if v < 0 {
            p[count] = UInt8(ascii: "-")
            count += 1
        }
        count += DecimalDigits.write(UInt64(v.magnitude), at: UnsafeMutableRawPointer(p + count))
    }

    /// Whether any of the eight bytes in `w` is below 0x20, `"` or `\\` (exact for "any": the classic
    /// "has a byte less than n" and "has a zero byte" tests, n = 0x20 <= 128).
    @inline(__always)
    static func anyNeedsEscape(_ w: UInt64) -> Bool {
        let ones: UInt64 = 0x0101_0101_0101_0101
        let high: UInt64 = 0x8080_8080_8080_8080
        let below = (w &- ones &* 0x20) & ~w & high
        let q = w ^ (ones &* 0x22)
        let quote = (q &- ones) & ~q & high
        let b = w ^ (ones &* 0x5C)
        let backslash = (b &- ones) & ~b & high
        return below | quote | backslash != 0
    }

    /// `v` as a JSON string: its bytes copied in runs, only `"`, `\\` and control characters escaped (UTF-8
    /// multi-byte sequences never contain those bytes). With `number`, its base-36 digits (``ClaimNumber``)
    /// follow `v` inside the quotes.
    mutating func string(_ v: String, thenNumber number: Int? = nil) {
        v.withUTF8Bytes { buf in
            reserve(6 * buf.count + 2 + (number == nil ? 0 : 14))
            p[count] = UInt8(ascii: "\"")
            count += 1
            var start = 0
            func copyRun(_ end: Int) {
                guard end > start, let base = buf.baseAddress else { return }
                (p + count).update(from: base + start, count: end - start)
                count += end - start
            }
            let n = buf.count
            var i = 0
            while i < n {
                // Eight bytes at a time while none needs escaping (the usual case: ids and names).
                if n - i >= 8, let base = buf.baseAddress,
                   !Self.anyNeedsEscape(UnsafeRawPointer(base + i).loadUnaligned(as: UInt64.self))
                {
                    i += 8
                    continue
                }
                let end = min(i + 8, n)
                while i < end {
                    let b = buf[i]
                    if b == UInt8(ascii: "\"") || b == UInt8(ascii: "\\") || b < 0x20 {
                        copyRun(i)
                        switch b {
                        case UInt8(ascii: "\""): raw("\\\"")
                        case UInt8(ascii: "\\"): raw("\\\\")
                        case 0x0A: raw("\\n")
                        case 0x0D: raw("\\r")
                        case 0x09: raw("\\t")
                        default:
                            let hex: StaticString = "0123456789abcdef"
                            raw("\\u00")
                            p[count] = hex.utf8Start[Int(b >> 4)]
                            p[count + 1] = hex.utf8Start[Int(b & 0xF)]
                            count += 2
                        }
                        start = i + 1
                    }
                    i += 1
                }
            }
            copyRun(n)
            if let number {
                let digits = ClaimNumber.count(number)
                ClaimNumber.write(number, digits: digits, at: p + count)
                count += digits
            }
            p[count] = UInt8(ascii: "\"")
            count += 1
        }
    }

    /// A claim number's base-36 digits (``ClaimNumber``), raw (inside a string begun by the caller).
    mutating func claimNumber(_ number: Int) {
        reserve(14)
        let digits = ClaimNumber.count(number)
        ClaimNumber.write(number, digits: digits, at: p + count)
        count += digits
    }
}

/// A non-negative integer's decimal digits written at a pointer, without a `String`: the Kafka values' integers
/// and the claim-id reply's length.
public enum DecimalDigits {
    /// How many digits `v` has (1 for 0).
    @inlinable
    public static func count(_ v: UInt64) -> Int {
        var n = 1
        var t = v
        while t >= 10 {
            t /= 10
            n += 1
        }
        return n
    }

    /// Writes `v`'s digits at `p` (room for ``count(_:)`` bytes); returns how many.
    @inlinable @discardableResult
    public static func write(_ v: UInt64, at p: UnsafeMutableRawPointer) -> Int {
        let n = count(v)
        var m = v
        var i = n - 1
        repeat {
            p.storeBytes(of: UInt8(ascii: "0") + UInt8(m % 10), toByteOffset: i, as: UInt8.self)
            m /= 10
            i -= 1
        } while m > 0
        return n
    }
}

extension ClaimEvent {
    /// `prefix` then `seq` in lowercase base 36 (the same text as `prefix + String(seq, radix: 36)`),
    /// written into one new string: a claim id costs one allocation, not three.
    public static func claimID(prefix: String, seq: Int) -> String {
        let digits = ClaimNumber.count(seq)
        let head = prefix.utf8.count
        return String(unsafeUninitializedCapacity: head + digits) { out in
            prefix.withUTF8Bytes { p in
                if let from = p.baseAddress, let to = out.baseAddress { to.update(from: from, count: p.count) }
            }
            ClaimNumber.write(seq, digits: digits, at: out.baseAddress! + head)
            return head + digits
        }
    }
}

extension JSONBytes {
    /// A lease event: the head they share, `{"type":…,"voucher":…,"region":…,"host":…,"lease":…,"granted":N`
    /// (`opening`: the text up to the voucher's value), then `rest`, which takes at most `more` bytes of values.
    fileprivate static func leaseEvent(_ opening: StaticString, voucher: String, region: String, host: String, lease: String,
                                       granted: Int, more: Int, rest: (inout JSONBytes) -> Void) -> [UInt8] {
        let bound = 160 + opening.utf8CodeUnitCount + room(voucher) + room(region) + room(host) + room(lease) + intRoom + more
        return build(bound: bound) { j in
            j.raw(opening)
            j.string(voucher)
            j.raw(",\"region\":")
            j.string(region)
            j.raw(",\"host\":")
            j.string(host)
            j.raw(",\"lease\":")
            j.string(lease)
            j.raw(",\"granted\":")
            j.int(granted)
            rest(&j)
        }
    }
}

/// A claim answered at once that nothing records (``VoucherMachine/Effect/rememberGranted(_:)``): what the
/// `UNCLAIM` book keeps of it. Its voucher is the machine's, its id `idPrefix` and `seq`.
public struct GrantedClaim: Sendable, Equatable {
    public var seq: Int
    public var user: String
    public var qty: Int
    /// Which lease served how many of its tokens (their sum is `qty`).
    public var shares: ClaimShares

    public init(seq: Int, user: String, qty: Int, shares: ClaimShares) {
        self.seq = seq
        self.user = user
        self.qty = qty
        self.shares = shares
    }
}

/// The end of a claim id: its sequence number in base 36, lowercase (``ClaimEvent/claimID(prefix:seq:)``).
public enum ClaimNumber {
    /// How many digits `seq` takes.
    @inline(__always)
    public static func count(_ seq: Int) -> Int {
        precondition(seq >= 0, "claim sequence numbers are never negative")
        var digits = 1
        var v = seq
        while v >= 36 { v /= 36; digits += 1 }
        return digits
    }

    /// Write `seq`'s `digits` (``count(_:)``) digits at `at`.
    @inline(__always)
    public static func write(_ seq: Int, digits: Int, at: UnsafeMutablePointer<UInt8>) {
        let alphabet: StaticString = "0123456789abcdefghijklmnopqrstuvwxyz"
        var n = seq
        var j = digits - 1
        alphabet.withUTF8Buffer { a in
            repeat {
                at[j] = a[n % 36]
                n /= 36
                j -= 1
            } while n > 0
        }
    }
}
