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
/// A slot is 56 bytes and allocates nothing for the usual claim (one share, of a lease whose id is a
/// number, as Redis's `lease_seq` makes them); a claim spread over several leases keeps its shares in its
/// stripe's side table until its slot is reused. (Before: 64 bytes plus a 64-byte array per claim, about
/// 128 MB for the default million claims; issue 13.)
final class ClaimBook: Sendable {
    struct Entry: Sendable {
        var event: ClaimEvent
        var unclaimed: Bool
    }
    /// What `UNCLAIM` needs of a claim of this boot (its id is rebuilt from the prefix and `seq`).
    private struct Slot {
        var seq = -1
        var voucher = ""
        var user = ""
        /// The one share's lease id, or -1: the shares are in the stripe's `spread`.
        var lease: Int64 = -1
        var qty: Int32 = 0
        var unclaimed = false
    }
    private struct Stripe {
        var slots: [Slot]
        /// Quantity and shares of claims that are not one share of a numbered lease, by sequence number.
        var spread: [Int: (qty: Int, shares: [ClaimShare])] = [:]
    }
    static let stripeCount = 64
    let capacity: Int
    private let prefix: String
    private let perStripe: Int
    private let stripes: [NIOLockedValueBox<Stripe>]
    /// Claims of earlier boots, by their id's prefix (`region.host.boot.`) and sequence number: an integer
    /// key per claim instead of its whole id (a restart with a million claims in the journal hashed and
    /// compared a million ids that share their first 25 bytes: seconds before the socket could open).
    private struct Older {
        /// One earlier boot's claims, compact like the ring's (a claim event each was ~500 bytes).
        struct Boot {
            var region: String
            var host: String
            var slots: [Int: Slot] = [:]
            var spread: [Int: (qty: Int, shares: [ClaimShare])] = [:]
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
            NIOLockedValueBox(Stripe(slots: [Slot](repeating: Slot(), count: capacity > 0 ? max(1, (capacity + 63) / 64) : 0)))
        }
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

    /// Remember a claim of this boot; `seq` is the sequence number its id ends with.
    func add(_ e: ClaimEvent, seq: Int) {
        guard capacity > 0 else { return }
        let (s, i) = locate(seq)
        let lease = Self.numbered(e)
        stripes[s].withLockedValue { st in
            let old = st.slots[i]
            if old.lease < 0, old.seq >= 0 { st.spread.removeValue(forKey: old.seq) }
            st.slots[i].seq = seq
            st.slots[i].voucher = e.voucher
            st.slots[i].user = e.user
            st.slots[i].unclaimed = false
            if let lease {
                st.slots[i].lease = lease
                st.slots[i].qty = Int32(e.qty)
            } else {
                st.slots[i].lease = -1
                st.slots[i].qty = 0
                st.spread[seq] = (e.qty, e.shares)
            }
        }
        added.add(1, ordering: .relaxed)
    }

    /// A slot's claim as an entry (`spread`: its quantity and shares when not one numbered lease's).
    private static func entry(_ id: String, _ slot: Slot, spread: (qty: Int, shares: [ClaimShare])?, region: String,
                              host: String) -> Entry {
        let shares: [ClaimShare]
        let qty: Int
        if slot.lease >= 0 {
            qty = Int(slot.qty)
            shares = [ClaimShare(leaseId: Self.leaseID(slot.lease), tokens: qty)]
        } else {
            shares = spread?.shares ?? []
            qty = spread?.qty ?? 0
        }
        return Entry(event: ClaimEvent(claimID: id, voucher: slot.voucher, user: slot.user, qty: qty, region: region,
                                       host: host, shares: shares, tsMs: 0),
                     unclaimed: slot.unclaimed)
    }

    /// The lease id of a claim that is one share of a numbered lease (all its tokens), or nil. A hot-key
    /// shard's lease `s.N` is kept as `s << 48 | N` (shards ≤ 64, N < 2⁴⁸).
    private static func numbered(_ e: ClaimEvent) -> Int64? {
        guard e.shares.count == 1, e.shares[0].tokens == e.qty, e.qty >= 0, e.qty <= Int(Int32.max) else { return nil }
        return PackedLease.pack(e.shares[0].leaseId)
    }

    /// The lease id a slot keeps (see ``numbered(_:)``).
    static func leaseID(_ v: Int64) -> String { PackedLease.id(v) }

    /// A claim of an earlier boot (from the journal).
    func addRecovered(_ e: ClaimEvent) {
        guard capacity > 0 else { return }
        older.withLockedValue { o in
            guard o.count < capacity else { return }
            if let (prefix, seq) = Older.split(e.claimID) {
                let key = Array(prefix.utf8)
                var boot = o.byPrefix.removeValue(forKey: key) ?? Older.Boot(region: e.region, host: e.host)
                var slot = Slot(seq: seq, voucher: e.voucher, user: e.user)
                if let lease = Self.numbered(e) {
                    slot.lease = lease
                    slot.qty = Int32(e.qty)
                } else {
                    boot.spread[seq] = (e.qty, e.shares)
                }
                if boot.slots.updateValue(slot, forKey: seq) == nil { o.count += 1 }
                o.byPrefix[key] = boot
            } else if o.other.updateValue(Entry(event: e, unclaimed: false), forKey: Array(e.claimID.utf8)) == nil {
                o.count += 1
            }
        }
    }

    enum Take { case unknown, already, take(ClaimEvent) }

    /// Look up and change one claim's entry under its lock.
    private func with<T>(_ id: String, _ body: (inout Entry?) -> T) -> T {
        if let seq = sequence(id) {
            guard capacity > 0 else { var none: Entry? = nil; return body(&none) }
            let (s, i) = locate(seq)
            return stripes[s].withLockedValue { st in
                guard st.slots[i].seq == seq else {
                    var none: Entry? = nil
                    return body(&none)
                }
                let slot = st.slots[i]
                var entry: Entry? = Self.entry(id, slot, spread: st.spread[seq], region: region, host: host)
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
                var entry: Entry? = Self.entry(id, slot, spread: spread, region: region, host: host)
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

    /// Mark a claim cancelled; only the first call gets `.take`.
    func takeForUnclaim(_ id: String) -> Take {
        with(id) { e in
            guard let entry = e else { return .unknown }
            if entry.unclaimed { return .already }
            e!.unclaimed = true
            return .take(entry.event)
        }
    }

    /// Undo `takeForUnclaim` (the cancellation could not be journaled).
    func restore(_ id: String) { with(id) { e in e?.unclaimed = false } }

    func markUnclaimed(_ id: String) { with(id) { e in e?.unclaimed = true } }

    /// Claims of this boot in the ring (at most `capacity`) plus those of earlier boots.
    var count: Int { min(added.load(ordering: .relaxed), capacity) + older.withLockedValue { $0.count } }
}
