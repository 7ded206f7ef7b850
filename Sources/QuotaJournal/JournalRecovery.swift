import Foundation
import QuotaCore

/// A journal record that is streamed to Kafka: a claim, a cancellation, or a lease close.
///
/// (The lease events, one per lease, are `indirect`: an event is a word, copied with a retain, where inline each
/// copy of every claim's event went through an outlined copy of a ~130-byte enum; issue 13.)
public enum ShippedEvent: Sendable, Equatable {
    case claim(ClaimEvent)
    indirect case leaseGranted(LeaseGrantRecord)
    indirect case leaseClosed(LeaseClose)

    /// The Kafka key: the voucher id (all events of a voucher on one partition, in order).
    public var key: String {
        switch self {
        case .claim(let e): return e.voucher
        case .leaseGranted(let g): return g.voucher
        case .leaseClosed(let c): return c.voucher
        }
    }

    public var kafkaValue: [UInt8] {
        var cache = KafkaValueCache()
        return kafkaValue(cache: &cache)
    }

    /// ``kafkaValue``, a claim's shared fields escaped once per run of values (``KafkaValueCache``).
    public func kafkaValue(cache: inout KafkaValueCache) -> [UInt8] {
        var scratch = ScratchBytes()
        return withKafkaValue(cache: &cache, scratch: &scratch) { Array($0) }
    }

    /// ``kafkaValue(cache:)`` handed to `body`, valid only during it: a claim's is written into `scratch`
    /// (``ClaimEvent/withKafkaValue(cache:scratch:_:)``).
    public func withKafkaValue<R, E: Error>(cache: inout KafkaValueCache, scratch: inout ScratchBytes,
                                            _ body: (UnsafeRawBufferPointer) throws(E) -> R) throws(E) -> R {
        switch self {
        case .claim(let e): return try e.withKafkaValue(cache: &cache, scratch: &scratch, body)
        case .leaseGranted(let g): return try Self.with(g.kafkaValue, body)
        case .leaseClosed(let c): return try Self.with(c.kafkaValue, body)
        }
    }

    private static func with<R, E: Error>(_ v: [UInt8], _ body: (UnsafeRawBufferPointer) throws(E) -> R) throws(E) -> R {
        // (`withUnsafeBytes` rethrows untyped: the error is carried out as a result.)
        let r: Result<R, E> = v.withUnsafeBytes { b in
            do throws(E) { return .success(try body(b)) } catch { return .failure(error) }
        }
        return try r.get()
    }

    /// Whether `r` is shipped (``init(_:)`` would make an event of it), without making the event.
    public static func isShipped(_ r: JournalRecord) -> Bool {
        switch r {
        case .claim(let e): return e.kind != .intent
        case .leaseGranted, .leaseClosed: return true
        default: return false
        }
    }

    /// The shipped form of a journal record, if it is one.
    public init?(_ r: JournalRecord) {
        switch r {
        case .claim(let e) where e.kind != .intent: self = .claim(e)
        case .leaseGranted(let g): self = .leaseGranted(g)
        case .leaseClosed(let c): self = .leaseClosed(c)
        default: return nil
        }
    }
}

/// What a journal directory says after a restart.
public struct JournalRecovery: Sendable {
    public struct SegmentContents: Sendable {
        public var id: UInt64
        public var path: String
        public var bytes: Int
        /// Events to ship, in order (their index in this list is their index in the segment).
        public var events: [ShippedEvent]
        /// Indexes of events Kafka has not acknowledged, from the segment's `.shipped` marker; nil when
        /// there is no marker (the process stopped without recording acknowledgements: ship them all).
        public var unacked: Set<Int>?

        /// The events still to ship, with their index.
        public var toShip: [(Int, ShippedEvent)] {
            events.enumerated().filter { unacked?.contains($0.offset) ?? true }.map { ($0.offset, $0.element) }
        }

        public var claims: [ClaimEvent] {
            events.compactMap { if case .claim(let e) = $0 { return e } else { return nil } }
        }
    }

    /// The books at the end of the journal: open leases, unanswered lease requests, generation, and the
    /// Redis work still owed (restocks of cancellations, releases of per-user counts).
    public var ledger = LeaseLedger()
    /// Every claim and cancellation found, in order (to rebuild the UNCLAIM and REQ tables), with
    /// whether Kafka acknowledged it (false also when the segment has no `.shipped` marker).
    public var history: [ClaimEvent] = []
    public var acknowledged: [Bool] = []
    /// Every process start recorded, oldest first.
    public var boots: [JournalBoot] = []

    public var segments: [SegmentContents] = []
    /// False when the newest segment is corrupt before its end: served counts may be too low,
    /// so no lease may be returned on the journal's word.
    public var leaseStateTrusted = true
    /// Problems found: `file at offset N: message`.
    public var issues: [String] = []
    /// A torn last record was dropped (normal after a crash).
    public var tornTails: [String] = []

    /// Leases open at the end of the journal, with what was served from each.
    public var openLeases: [LeaseLedger.Account] { ledger.openAccounts }

    public init() {}

    static func path(dir: String, id: UInt64) -> String {
        let digits = String(id)
        return "\(dir)/seg-\(String(repeating: "0", count: max(0, 16 - digits.count)))\(digits).qj"
    }

    /// The segment ids in `dir`, oldest first.
    static func segmentIDs(dir: String) -> [UInt64] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []
        return names.compactMap { n -> UInt64? in
            guard n.hasPrefix("seg-"), n.hasSuffix(".qj"), n.count == 23 else { return nil }
            return UInt64(n.dropFirst(4).dropLast(3))
        }.sorted()
    }

    /// Read a `.shipped` marker: the indexes not acknowledged (empty: all shipped), nil if absent.
    static func readMarker(_ path: String) -> Set<Int>? {
        guard let data = FileManager.default.contents(atPath: path) else { return nil }
        let text = String(decoding: data, as: UTF8.self)
        return Set(text.split(whereSeparator: { $0 == "\n" || $0 == "," }).compactMap { Int($0) })
    }

    /// Read every segment of `dir` (a missing directory is an empty journal). Never throws on
    /// bad data: corruption is reported in `issues` with the file and offset, and nothing after a
    /// corrupt record in that segment is trusted.
    public static func read(dir: String) -> JournalRecovery {
        var out = JournalRecovery()
        let ids = segmentIDs(dir: dir)
        for (i, id) in ids.enumerated() {
            let p = path(dir: dir, id: id)
            guard let data = FileManager.default.contents(atPath: p) else {
                out.issues.append("\(p): cannot read")
                continue
            }
            let bytes = [UInt8](data)
            let newest = i == ids.count - 1
            var seg = SegmentContents(id: id, path: p, bytes: bytes.count, events: [], unacked: readMarker(p + ".shipped"))
            var offset = 0
            var first = true
            scan: while offset < bytes.count {
                switch JournalCodec.decode(bytes, at: offset) {
                case .record(let r, let next):
                    // A segment's first record is a snapshot of the writer's books: the newest readable one
                    // is the base, whatever older segments held (or lost to corruption).
                    if case .snapshot = r, !first {
                        out.issues.append("\(p) at offset \(offset): a snapshot in the middle of a segment")
                    } else {
                        out.ledger.apply(r)
                    }
                    switch r {
                    case .claim(let e) where e.kind != .intent:
                        out.history.append(e)
                        out.acknowledged.append(seg.unacked.map { !$0.contains(seg.events.count) } ?? false)
                    case .boot(let b):
                        out.boots.append(b)
                    default:
                        break
                    }
                    if let ev = ShippedEvent(r) { seg.events.append(ev) }
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
        for a in out.ledger.anomalies { out.issues.append("journal \(dir): \(a)") }
        if !out.ledger.anomalies.isEmpty { out.leaseStateTrusted = false }
        return out
    }
}
