import NIOConcurrencyHelpers
import QuotaCore
import QuotaRedis
import Synchronization

/// Claims made through this host, for `UNCLAIM`.
///
/// This boot's claims live in a preallocated ring indexed by the claim's own sequence number (the
/// last part of its id), split over 64 stripes with a lock each: adding a claim is one slot write,
/// with no hashing and little contention between event loops. The ring keeps the last `capacity`
/// claims. Claims of earlier boots, rebuilt from the journal at start, are kept in a map.
///
/// A slot is 32 bytes and allocates nothing for the usual claim (one share, of a lease whose id is a
/// number, as Redis's `lease_seq` makes them, of at most 32,767 tokens); any other claim keeps what the
/// slot cannot in its stripe's side table until its slot is reused. The voucher is a number into the
/// book's table of voucher ids, and which claim a slot holds is its lap of the ring (the sequence number
/// follows from the lap, the stripe and the slot). The ring is written in full at start: 32 MB for the
/// default million claims (before: 56 bytes a slot, 56 MB; 64 bytes plus a 64-byte array per claim before
/// that; issue 13).
final class ClaimBook: Sendable {
    struct Entry: Sendable {
        var event: ClaimEvent
        var unclaimed: Bool
    }
    /// What `UNCLAIM` needs of a claim (its id is rebuilt from the prefix and its sequence number).
    private struct Slot {
        var user = ""
        /// The one share's lease id (``PackedLease``), or -1: the claim's voucher, quantity and shares are
        /// in the side table (`spread`).
        var lease: Int64 = -1
        /// Ring slots: the claim's lap of the ring plus one (0: empty). Claims of earlier boots: 1.
        var lap: UInt32 = 0
        /// Index into the book's voucher ids (when `lease >= 0`).
        var voucher: UInt16 = 0
        /// The quantity (when `lease >= 0`) in the low 15 bits; the top bit: unclaimed.
        var bits: UInt16 = 0

        static let unclaimedBit: UInt16 = 0x8000
        static let maxQty = 0x7FFF
        var unclaimed: Bool {
            get { bits & Self.unclaimedBit != 0 }
            set { bits = newValue ? bits | Self.unclaimedBit : bits & ~Self.unclaimedBit }
        }
        var qty: Int { Int(bits & ~Self.unclaimedBit) }
    }
    /// A claim a slot cannot hold by itself.
    private struct Spread {
        var voucher: String
        var qty: Int
        var shares: ClaimShares
    }
    private struct Stripe {
        var slots: [Slot]
        /// Claims that are not one share of a numbered lease (or of a voucher past the table's bound, or of
        /// more than `Slot.maxQty` tokens), by sequence number.
        var spread: [Int: Spread] = [:]
    }
    /// Voucher ids by index (slots keep the index), bounded: past `maxVouchers` a claim goes to `spread`.
    private struct Vouchers {
        var names: [String] = []
        var index: [ByteKey: UInt16] = [:]
    }
    static let maxVouchers = Int(UInt16.max)
    private let vouchers = NIOLockedValueBox(Vouchers())
    /// Bytes per claim kept in the ring (what `claims.max_tracked` costs).
    static var slotStride: Int { MemoryLayout<Slot>.stride }
    static let stripeCount = 64
    let capacity: Int
    private let prefix: String
    private let perStripe: Int
    /// A stripe and its lock, in one object (a `Mutex` holds its value inline).
    private final class StripeBox: Sendable {
        let m: Mutex<Stripe>
        init(_ s: Stripe) { m = Mutex(s) }
    }
    private let stripes: [StripeBox]
    /// The same boxes, unretained (`stripes` keeps them for the book's life): see ``stripe(_:_:)``.
    private let stripesUnretained: [Unmanaged<StripeBox>]
    /// Claims of earlier boots, by their id's prefix (`region.host.boot.`) and sequence number: an integer
    /// key per claim instead of its whole id (a restart with a million claims in the journal hashed and
    /// compared a million ids that share their first 25 bytes: seconds before the socket could open).
    private struct Older {
        /// One earlier boot's claims, compact like the ring's (a claim event each was ~500 bytes).
        struct Boot {
            var region: String
            var host: String
            var slots: [Int: Slot] = [:]
            var spread: [Int: Spread] = [:]
        }
        /// Keyed by the prefix's bytes: `String` keys compare canonically equivalent spellings (a Kelvin sign
        /// and a K) as equal, and an id spelled so must not reach a claim.
        var byPrefix: [[UInt8]: Boot] = [:]
        /// Ids not of the `prefix` + base-36 sequence form (none that quotad makes).
        var other: [[UInt8]: Entry] = [:]
        var count = 0

        static func split(_ id: String) -> (prefix: Substring, seq: Int)? {
            guard let dot = id.utf8.lastIndex(of: UInt8(ascii: ".")) else { return nil }
            let after = id.utf8.index(after: dot)
            guard let seq = ClaimBook.canonicalSequence(id[after...]) else { return nil }
            return (id[..<after], seq)
        }
    }
    private let older = NIOLockedValueBox(Older())
    private let added = Atomic<Int>(0)

    private let region: String
    private let host: String

    /// - Parameter prefix: this boot's claim id prefix (`region.host.boot.`).
    init(prefix: String, region: String, host: String, capacity: Int) {
        self.prefix = prefix
        self.region = region
        self.host = host
        self.capacity = max(0, capacity)
        perStripe = max(1, (self.capacity + Self.stripeCount - 1) / Self.stripeCount)
        stripes = (0..<Self.stripeCount).map { _ in
            StripeBox(Stripe(slots: [Slot](repeating: Slot(), count: capacity > 0 ? max(1, (capacity + 63) / 64) : 0)))
        }
        stripesUnretained = stripes.map { Unmanaged.passUnretained($0) }
    }

    /// The sequence number of a claim id of this boot, or nil.
    private func sequence(_ id: String) -> Int? {
        // Bytes, not `hasPrefix`: that compares canonically equivalent spellings as equal.
        guard id.utf8.starts(with: prefix.utf8) else { return nil }
        let rest = id.utf8.dropFirst(prefix.utf8.count)
        return Self.canonicalSequence(Substring(rest))
    }

    /// A sequence number written as quotad writes it (``ClaimEvent/claimID(prefix:seq:)``: base 36, lower
    /// case, no sign, no leading zero), or nil: any other spelling is not the id of a claim (it would reach
    /// a real claim's slot under an id that was never granted; a negative one reached no slot at all).
    static func canonicalSequence(_ s: Substring) -> Int? {
        let u = s.utf8
        guard let first = u.first, u.count <= 13, first != UInt8(ascii: "0") || u.count == 1 else { return nil }
        guard u.allSatisfy({ ($0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9")) || ($0 >= UInt8(ascii: "a") && $0 <= UInt8(ascii: "z")) })
        else { return nil }
        return Int(s, radix: 36)
    }

    private func locate(_ seq: Int) -> (stripe: Int, slot: Int) {
        (seq % Self.stripeCount, (seq / Self.stripeCount) % perStripe)
    }

    /// The lap mark a ring slot keeps for claim `seq` (its lap of the ring plus one), or nil past 2³²−2 laps.
    private func lapMark(_ seq: Int) -> UInt32? {
        let lap = seq / (Self.stripeCount * perStripe)
        return lap < Int(UInt32.max) ? UInt32(lap + 1) : nil
    }

    /// The sequence number of the claim a ring slot holds (`mark` > 0).
    private func sequence(mark: UInt32, stripe: Int, slot: Int) -> Int {
        (Int(mark) - 1) * Self.stripeCount * perStripe + slot * Self.stripeCount + stripe
    }

    /// The index slots keep for voucher `id`, or nil once the table holds ``maxVouchers`` ids (the claims
    /// of such a voucher keep their id in the side table). Taken once per voucher's runtime, at its first
    /// claim, not per claim; ids stay for the process's life, so only vouchers that granted a claim here
    /// (or whose claims the journal holds) may take one.
    func voucherIndex(_ id: String) -> UInt16? {
        vouchers.withLockedValue { v in
            let key = ByteKey(id)
            if let i = v.index[key] { return i }
            guard v.names.count < Self.maxVouchers else { return nil }
            let i = UInt16(v.names.count)
            v.names.append(id)
            v.index[key] = i
            return i
        }
    }

    private func voucherName(_ i: UInt16) -> String { vouchers.withLockedValue { $0.names[Int(i)] } }

    /// A slot for `e` and, when the slot cannot hold it by itself, its side-table entry.
    private static func compact(_ e: ClaimEvent, voucherIndex: UInt16?) -> (Slot, Spread?) {
        // (The shares read in place: most claims keep none of them, only their lease's number.)
        e.withShares { compact(voucher: e.voucher, user: e.user, qty: e.qty, shares: $0, voucherIndex: voucherIndex) }
    }

    private static func compact(voucher: String, user: String, qty: Int, shares: ClaimShares,
                                voucherIndex: UInt16?) -> (Slot, Spread?) {
        var slot = Slot()
        slot.user = user
        if let voucherIndex, let lease = Self.numbered(qty: qty, shares: shares), qty <= Slot.maxQty {
            slot.lease = lease
            slot.voucher = voucherIndex
            slot.bits = UInt16(qty)
            return (slot, nil)
        }
        return (slot, Spread(voucher: voucher, qty: qty, shares: shares))
    }

    /// Remember a claim of this boot; `seq` is the sequence number its id ends with, `voucherIndex` its
    /// voucher's ``voucherIndex(_:)``.
    func add(_ e: ClaimEvent, seq: Int, voucherIndex: UInt16?) {
        guard capacity > 0, let mark = lapMark(seq) else { return }
        assert(voucherIndex.map { voucherName($0) == e.voucher } ?? true, "a claim of another voucher's index")
        put(Self.compact(e, voucherIndex: voucherIndex), seq: seq, mark: mark)
    }

    /// ``add(_:seq:voucherIndex:)`` for a claim kept as its parts (no event was built for it).
    func add(_ c: GrantedClaim, voucher: String, voucherIndex: UInt16?) {
        guard capacity > 0, let mark = lapMark(c.seq) else { return }
        assert(voucherIndex.map { voucherName($0) == voucher } ?? true, "a claim of another voucher's index")
        put(Self.compact(voucher: voucher, user: c.user, qty: c.qty, shares: c.shares, voucherIndex: voucherIndex),
            seq: c.seq, mark: mark)
    }

    /// Stripe `s` under its lock, reached without a retain: `stripes[s].withLockedValue` retained and released
    /// the stripe's box for each claim added, two atomic writes on a line every thread that adds shares (issue 13).
    private func stripe<T: Sendable>(_ s: Int, _ body: (inout sending Stripe) -> sending T) -> T {
        stripesUnretained[s]._withUnsafeGuaranteedRef { $0.m.withLock(body) }
    }

    private func put(_ compacted: (Slot, Spread?), seq: Int, mark: UInt32) {
        let (s, i) = locate(seq)
        var (slot, spread) = compacted
        slot.lap = mark
        stripe(s) { st in
            let old = st.slots[i]
            if old.lease < 0, old.lap != 0 { st.spread.removeValue(forKey: sequence(mark: old.lap, stripe: s, slot: i)) }
            st.slots[i] = slot
            if let spread { st.spread[seq] = spread }
        }
        added.add(1, ordering: .relaxed)
    }

    /// A slot's claim as an entry (`spread`: its side-table entry when it has one).
    private func entry(_ id: String, _ slot: Slot, spread: Spread?, region: String, host: String) -> Entry {
        let shares: ClaimShares
        let qty: Int
        let voucher: String
        if slot.lease >= 0 {
            qty = slot.qty
            shares = [ClaimShare(leaseId: Self.leaseID(slot.lease), tokens: qty)]
            voucher = voucherName(slot.voucher)
        } else {
            shares = spread?.shares ?? []
            qty = spread?.qty ?? 0
            voucher = spread?.voucher ?? ""
        }
        return Entry(event: ClaimEvent(claimID: id, voucher: voucher, user: slot.user, qty: qty, region: region,
                                       host: host, shares: shares, tsMs: 0),
                     unclaimed: slot.unclaimed)
    }

    /// The lease id of a claim that is one share of a numbered lease (all its tokens), or nil. A hot-key
    /// shard's lease `s.N` is kept as `s << 48 | N` (shards ≤ 64, N < 2⁴⁸).
    private static func numbered(qty: Int, shares: ClaimShares) -> Int64? {
        guard shares.count == 1, shares[0].tokens == qty, qty >= 0 else { return nil }
        return PackedLease.pack(shares[0].leaseId)
    }

    /// The lease id a slot keeps (see ``numbered(qty:shares:)``).
    static func leaseID(_ v: Int64) -> String { PackedLease.id(v) }

    /// Claims of earlier boots (from the journal), in the journal's order.
    ///
    /// One lock for the lot, and each boot's claims go into its map as one run: a million claims
    /// restored one by one (a lock, an id prefix copied and hashed twice, a voucher lookup and a map
    /// grown by doubling, each) held the socket closed for seconds at start.
    func addRecovered(_ events: [ClaimEvent]) {
        guard capacity > 0, !events.isEmpty else { return }
        older.withLockedValue { o in
            // The current run: its boot's prefix and its claims, put into the boot's map at once.
            var key: [UInt8] = []
            var run: [(seq: Int, slot: Slot, spread: Spread?)] = []
            var first: ClaimEvent? = nil
            var lastVoucher: (id: String, index: UInt16?)? = nil
            func endRun(_ o: inout Older) {
                defer { run.removeAll(keepingCapacity: true) }
                guard let first, !run.isEmpty, o.count < capacity else { return }
                var boot = o.byPrefix.removeValue(forKey: key) ?? Older.Boot(region: first.region, host: first.host)
                boot.slots.reserveCapacity(boot.slots.count + min(run.count, capacity - o.count))
                // As one by one: each claim while the book has room (an id already kept takes none more).
                for (seq, slot, spread) in run {
                    guard o.count < capacity else { break }
                    if let spread { boot.spread[seq] = spread } else if !boot.spread.isEmpty { boot.spread.removeValue(forKey: seq) }
                    if boot.slots.updateValue(slot, forKey: seq) == nil { o.count += 1 }
                }
                o.byPrefix[key] = boot
            }
            for e in events {
                let id = e.claimID
                guard let (prefix, seq) = Older.split(id) else {
                    endRun(&o)
                    first = nil
                    guard o.count < capacity else { break }
                    if o.other.updateValue(Entry(event: e, unclaimed: false), forKey: Array(id.utf8)) == nil { o.count += 1 }
                    continue
                }
                if first == nil || !key.elementsEqual(prefix.utf8) {
                    endRun(&o)
                    key = Array(prefix.utf8)
                    first = e
                }
                // (The bound is checked as the run goes into the map: a claim id twice counts once.)
                guard o.count < capacity else { break }
                // (The lock order is always older, then vouchers: see `with`.)
                let index: UInt16?
                if let last = lastVoucher, last.id.utf8.elementsEqual(e.voucher.utf8) {
                    index = last.index
                } else {
                    index = voucherIndex(e.voucher)
                    lastVoucher = (e.voucher, index)
                }
                var (slot, spread) = Self.compact(e, voucherIndex: index)
                slot.lap = 1
                run.append((seq, slot, spread))
            }
            endRun(&o)
        }
    }

    /// `inProgress`: taken by an `UNCLAIM` whose cancellation is not yet answered (it may still fail and put the
    /// claim back: a retry must not be told +OK yet; helper-43).
    enum Take { case unknown, already, inProgress, take(ClaimEvent) }

    /// Look up and change one claim's entry under its lock.
    private func with<T: Sendable>(_ id: String, _ body: (inout Entry?) -> T) -> T {
        if let seq = sequence(id) {
            guard capacity > 0, let mark = lapMark(seq) else { var none: Entry? = nil; return body(&none) }
            let (s, i) = locate(seq)
            return stripe(s) { st in
                guard st.slots[i].lap == mark else {
                    var none: Entry? = nil
                    return body(&none)
                }
                let slot = st.slots[i]
                var entry: Entry? = entry(id, slot, spread: slot.lease < 0 ? st.spread[seq] : nil, region: region, host: host)
                let result = body(&entry)
                st.slots[i].unclaimed = entry?.unclaimed ?? slot.unclaimed
                return result
            }
        }
        return older.withLockedValue { o in
            if let (prefix, seq) = Older.split(id) {
                let key = Array(prefix.utf8)
                // Read without keeping the boot alive: the write below then changes its slots in place
                // (a local copy of the boot would make it copy them all).
                guard let slot = o.byPrefix[key]?.slots[seq] else {
                    var none: Entry? = nil
                    return body(&none)
                }
                let region = o.byPrefix[key]!.region
                let host = o.byPrefix[key]!.host
                let spread = slot.lease < 0 ? o.byPrefix[key]!.spread[seq] : nil
                var entry: Entry? = entry(id, slot, spread: spread, region: region, host: host)
                let result = body(&entry)
                o.byPrefix[key]!.slots[seq]!.unclaimed = entry?.unclaimed ?? slot.unclaimed
                return result
            }
            let key = Array(id.utf8)
            var e = o.other[key]
            defer { if e != nil { o.other[key] = e } }
            return body(&e)
        }
    }

    /// Mark a claim cancelled; only the first call gets `.take`, and counts as in flight until ``unclaimEnded(_:)``.
    func takeForUnclaim(_ id: String) -> Take {
        // Taken and counted in flight in one step (this lock, then the entry's), so a retry never sees one without
        // the other.
        unclaimsInFlight.withLockedValue { f in
            with(id) { e in
                guard let entry = e else { return .unknown }
                if entry.unclaimed { return f[id] != nil ? .inProgress : .already }
                e!.unclaimed = true
                f[id, default: 0] += 1
                return .take(entry.event)
            }
        }
    }

    /// The `UNCLAIM` that took `id` was answered (its cancellation durable, or failed and the claim put back
    /// with ``restore(_:)`` before).
    func unclaimEnded(_ id: String) {
        unclaimsInFlight.withLockedValue { f in
            if let n = f[id], n > 1 { f[id] = n - 1 } else { f.removeValue(forKey: id) }
        }
    }

    /// `UNCLAIM`s taken whose answer has not come, by claim id (how many: a failed one puts the claim back before
    /// its answer, and a retry may take it again meanwhile).
    private let unclaimsInFlight = NIOLockedValueBox<[String: Int]>([:])

    /// Undo `takeForUnclaim` (the cancellation could not be journaled).
    func restore(_ id: String) { with(id) { e in e?.unclaimed = false } }

    func markUnclaimed(_ id: String) { with(id) { e in e?.unclaimed = true } }

    /// Claims of this boot kept in the side table (not one share of a numbered lease of at most 32,767 tokens,
    /// or of a voucher past the table's bound): ~140 bytes each instead of the slot's 32.
    var spreadCount: Int { stripes.reduce(0) { n, st in n + st.m.withLock { $0.spread.count } } }

    /// Voucher ids in the book's table (bounded by ``maxVouchers``, kept for the process's life).
    var voucherCount: Int { vouchers.withLockedValue { $0.names.count } }

    /// Claims of this boot in the ring (at most `capacity`) plus those of earlier boots.
    var count: Int { min(added.load(ordering: .relaxed), capacity) + older.withLockedValue { $0.count } }
}
