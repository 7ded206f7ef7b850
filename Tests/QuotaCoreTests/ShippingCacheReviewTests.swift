import Foundation
import QuotaCore
import QuotaJournal
import Testing

/// helper-41's review of 6ee3732 (issue 13's shipping caches): the first test failed on it (fixed: fields compared by bytes).
@Suite("Shipping caches, review (helper-41)")
struct ShippingCacheReviewTests {
    typealias Rand = ShippingCacheTests.Rand

    func event(_ id: String, voucher: String, region: String = "sg", host: String = "h") -> ClaimEvent {
        ClaimEvent(claimID: id, voucher: voucher, user: "u", qty: 1, region: region, host: host,
                   shares: [ClaimShare(leaseId: "sg:h:1", tokens: 1)], tsMs: 1)
    }

    /// KafkaValueCache decides "same field as the cached one" with `String.==`, which is Unicode canonical
    /// equivalence, not byte equality: two fields with different bytes that are canonically equivalent
    /// ("ü" precomposed vs "u" + combining diaeresis; the Kelvin sign vs "K") are taken as equal, and the
    /// second event is shipped with the FIRST event's bytes. Without the cache (42fcac4, and
    /// `ClaimEvent.kafkaValue`) each event carries its own bytes.
    @Test func aCanonicallyEquivalentFieldOfDifferentBytesIsShippedWithItsOwnBytes() throws {
        let pairs: [(String, String)] = [
            ("\u{FC}-voucher", "u\u{308}-voucher"),  // NFC vs NFD, as the existing "ü-ñ-voucher" case
            ("K", "\u{212A}"),  // KELVIN SIGN: canonically equivalent to ASCII "K"
        ]
        for (a, b) in pairs {
            #expect(Array(a.utf8) != Array(b.utf8))
            // The voucher.
            do {
                var cache = KafkaValueCache()
                _ = event("c1", voucher: a).kafkaValue(cache: &cache)
                let second = event("c2", voucher: b)
                #expect(second.kafkaValue(cache: &cache) == second.kafkaValue, "voucher \(Array(a.utf8)) then \(Array(b.utf8))")
                var shipped = KafkaValueCache()
                _ = ShippedEvent.claim(event("c1", voucher: a)).kafkaValue(cache: &shipped)
                #expect(ShippedEvent.claim(second).kafkaValue(cache: &shipped) == second.kafkaValue, "shipped voucher")
            }
            // The host (region and host share one cached run of bytes).
            do {
                var cache = KafkaValueCache()
                _ = event("c1", voucher: "v", host: a).kafkaValue(cache: &cache)
                let second = event("c2", voucher: "v", host: b)
                #expect(second.kafkaValue(cache: &cache) == second.kafkaValue, "host \(Array(a.utf8)) then \(Array(b.utf8))")
            }
        }
    }

    /// The ledger's remembered account, against the same fold with nothing remembered, over wider books than
    /// the commit's own random test (up to 3 vouchers x 40 leases, so the table grows and shrinks through
    /// many sizes), claims of several shares (the same lease twice, mixed pool/lease cancellation shares),
    /// leases granted twice, closes of leases not held, snapshot records mid-stream, distrustAll, the
    /// writer's keep-and-put-back, and a copy of the books folded on its own (copy-on-write).
    @Test func rememberedAccountAgreesWithAFreshLookupOverWideRandomBooks() {
        var failures = 0
        for seed in UInt64(1)...20 {  // (300 seeds in the review: 450,000 records, all agreed)
            var r = Rand(s: seed &* 7919)
            var l = LeaseLedger()
            var ref = LeaseLedger()
            var saved: (LeaseLedger, LeaseLedger)?
            var fork: (LeaseLedger, LeaseLedger)?
            var n = 0
            let leases = 1 + r.next(40)
            let vouchers = ["v", "w", "x"].prefix(1 + r.next(3))
            func rec() -> JournalRecord {
                let voucher = vouchers[r.next(vouchers.count)]
                let lease = "\(r.next(leases))"
                switch r.next(12) {
                case 0, 1: return grant(lease, 50 + r.next(50), voucher: voucher)
                case 2: return closed(lease, granted: 0, served: 0, voucher: voucher)
                case 3:
                    let k = 1 + r.next(4)
                    let shares = (0..<k).map { _ in ClaimShare(leaseId: r.next(3) == 0 ? lease : "\(r.next(leases))", tokens: 1) }
                    return .claim(ClaimEvent(kind: .unclaimed, claimID: "c\(r.next(max(n, 1)))", voucher: voucher, user: "u", qty: k,
                                             region: "sg", host: "h", shares: ClaimShares(shares), tsMs: 1, toPool: UInt64(r.next(1 << k))))
                case 4:
                    return .snapshot(l.snapshot)
                default:
                    n += 1
                    let k = 1 + r.next(3)
                    let shares = (0..<k).map { _ in ClaimShare(leaseId: r.next(2) == 0 ? lease : "\(r.next(leases))", tokens: 1 + r.next(2)) }
                    return .claim(ClaimEvent(claimID: "c\(n)", voucher: voucher, user: "u", qty: shares.reduce(0) { $0 + $1.tokens },
                                             region: "sg", host: "h", shares: ClaimShares(shares), tsMs: 1))
                }
            }
            for step in 0..<1500 {
                switch r.next(20) {
                case 0:
                    if let s = saved, r.next(2) == 0 {
                        (l, ref) = s
                        saved = nil
                    } else {
                        saved = (l, ref)
                    }
                    continue
                case 1 where r.next(6) == 0:
                    l.distrustAll()
                    ref.distrustAll()
                    continue
                case 2:
                    // A copy folded on its own, then compared with its own reference.
                    if var f = fork {
                        for _ in 0..<(1 + r.next(5)) {
                            let x = rec()
                            f.0.apply(x)
                            f.1 = LeaseLedger(f.1.snapshot)
                            f.1.apply(x)
                        }
                        if f.0.accounts != f.1.accounts {
                            failures += 1
                            Issue.record("fork differs: seed \(seed) step \(step)")
                            return
                        }
                        fork = r.next(2) == 0 ? nil : f
                    } else {
                        fork = (l, ref)
                    }
                    continue
                default:
                    break
                }
                let x = rec()
                let before = l.anomalies.count
                l.apply(x)
                ref = LeaseLedger(ref.snapshot)
                let refBefore = ref.anomalies.count
                ref.apply(x)
                if l.accounts != ref.accounts || l.anomalies.count - before != ref.anomalies.count - refBefore {
                    failures += 1
                    Issue.record("seed \(seed) step \(step): \(x)")
                    return
                }
            }
        }
        #expect(failures == 0)
    }
}
