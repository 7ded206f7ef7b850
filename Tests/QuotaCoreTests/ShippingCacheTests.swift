import Foundation
import QuotaCore
import QuotaJournal
import Testing

/// Issue 13's caches on the shipping path: a run of Kafka values shares the escaped voucher, region and
/// host; the ledger remembers the account the last claim changed. Each must give exactly what the work
/// done in full gives.
@Suite("Shipping caches: the same bytes and books as without them")
struct ShippingCacheTests {
    /// A small deterministic generator (the failing seed is in the message).
    struct Rand {
        var s: UInt64
        mutating func next(_ n: Int) -> Int {
            s = s &* 6364136223846793005 &+ 1442695040888963407
            return Int((s >> 33) % UInt64(n))
        }
    }

    @Test func aRunOfValuesEncodedWithOneCacheIsByteForByteEachValueEncodedAlone() throws {
        let vouchers = ["v", "bench", "with\"quote", "back\\slash", "ü-ñ-voucher", "tab\tnew\nline", String(repeating: "x", count: 70)]
        let regions = ["sg", "eu-west", "r\u{1}"]
        let hosts = ["h", "host-\"7\"", "ホスト"]
        var r = Rand(s: 13)
        var cache = KafkaValueCache()
        var shippedCache = KafkaValueCache()
        for n in 0..<6000 {
            // Runs of the same fields, and changes of one field at a time, in every order.
            let shares = (0..<(1 + r.next(3))).map { _ in ClaimShare(leaseId: "sg:h:\(r.next(1000))", tokens: 1 + r.next(5)) }
            let e = ClaimEvent(kind: r.next(4) == 0 ? .unclaimed : .claimed, claimID: "h-\(n)", voucher: vouchers[r.next(vouchers.count)],
                               user: "u\"\(r.next(50))", qty: shares.reduce(0) { $0 + $1.tokens }, region: regions[r.next(regions.count) / 2],
                               host: hosts[r.next(hosts.count)], shares: ClaimShares(shares), tsMs: Int64(r.next(1 << 30)),
                               toPool: UInt64(r.next(8)))
            let alone = e.kafkaValue
            #expect(e.kafkaValue(cache: &cache) == alone, "event \(n)")
            #expect(ShippedEvent.claim(e).kafkaValue(cache: &shippedCache) == alone, "event \(n), shipped")
            let o = try #require(try JSONSerialization.jsonObject(with: Data(alone)) as? [String: Any])
            #expect(o["voucher"] as? String == e.voucher && o["region"] as? String == e.region && o["host"] as? String == e.host)
        }
        // Numbered ids (the prefix is cached, its digits written after) and a few lease ids (the last one is
        // cached), runs and changes in every order; prefixes and leases with escapes and canonically equivalent
        // but different bytes (a cache hit must be the same bytes, not an equal String).
        let prefixes = ["sg.h.bench.", "p\"q.", "back\\slash.", "\u{FC}.", "u\u{308}.", "K.", "\u{212A}.", "tab\t.", ""]
        let leases = ["sg:h:1", "sg:h:2", "l\"q", "\u{FC}", "u\u{308}", "K", "\u{212A}"]
        for n in 0..<6000 {
            let shares = (0..<(1 + r.next(3))).map { _ in ClaimShare(leaseId: leases[r.next(leases.count)], tokens: 1 + r.next(5)) }
            let seq = [0, 35, 36, Int.max, r.next(1 << 30)][r.next(5)]
            let e = ClaimEvent(kind: r.next(4) == 0 ? .unclaimed : .claimed, idPrefix: prefixes[r.next(prefixes.count)], seq: seq,
                               voucher: vouchers[r.next(2)], user: "u\(r.next(9))", qty: shares.reduce(0) { $0 + $1.tokens },
                               region: "sg", host: "h", shares: ClaimShares(shares),
                               // (Runs of one millisecond, and changes: the last timestamp's digits are cached.)
                               tsMs: [0, -1, 9, 10, 1_764_000_000_000, 1_764_000_000_001, .max, .min][r.next(8)],
                               toPool: UInt64(r.next(8)))
            let alone = e.kafkaValue
            #expect(e.kafkaValue(cache: &cache) == alone, "numbered event \(n)")
            #expect(ShippedEvent.claim(e).kafkaValue(cache: &shippedCache) == alone, "numbered event \(n), shipped")
            let o = try #require(try JSONSerialization.jsonObject(with: Data(alone)) as? [String: Any])
            #expect((o["claim_id"] as? String).map { Array($0.utf8) } == Array(e.claimID.utf8), "numbered event \(n)")
            let ids = (o["leases"] as? [[String: Any]])?.compactMap { $0["id"] as? String }
            #expect(ids.map { $0.map { Array($0.utf8) } } == e.shares.map { Array($0.leaseId.utf8) }, "numbered event \(n)")
        }
        // Lease events in a run of claims leave the cached fields alone.
        let g = ShippedEvent.leaseGranted(LeaseGrantRecord(voucher: "g", lease: "1", granted: 5, req: "r", region: "x", host: "y",
                                                           durability: "journal", tsMs: 1))
        #expect(g.kafkaValue(cache: &shippedCache) == g.kafkaValue)
    }

    /// Found by the test below: a cancellation's pool share of a lease already closed grew the table (a keyed
    /// `accounts[key]?.…` makes room for an insert), so the next claim of the remembered lease used a stale
    /// index and trapped. At every table size one of them is the size where the table grows.
    @Test func aPoolShareOfAClosedLeaseBetweenTwoClaimsOfAnotherLeaseCountsBoth() {
        for n in 1...40 {
            var l = LeaseLedger()
            for i in 0..<n { l.apply(grant("\(i)", 100)) }
            l.apply(claim("a", lease: "0"))
            l.apply(.claim(ClaimEvent(kind: .unclaimed, claimID: "x", voucher: "v", user: "u", qty: 1, region: "sg", host: "h",
                                      shares: [ClaimShare(leaseId: "closed", tokens: 1)], tsMs: 1, toPool: 1)))
            l.apply(claim("b", lease: "0"))
            #expect(l.accounts[LeaseLedger.Key(voucher: "v", lease: "0")]?.served == 2, "\(n) leases")
            #expect(l.anomalies.isEmpty)
        }
    }

    @Test func theLedgersRememberedAccountNeverServesAnotherLeaseOrOutlivesItsKey() {
        // The reference is the same fold with nothing remembered: restored from its own snapshot before
        // every record (a restore forgets), so every claim looks its lease up afresh.
        for seed in UInt64(1)...60 {
            var r = Rand(s: seed)
            var l = LeaseLedger()
            var ref = LeaseLedger()
            var saved: LeaseLedger?
            var n = 0
            for step in 0..<600 {
                let voucher = ["v", "w"][r.next(2)]
                let lease = "\(r.next(5))"
                let rec: JournalRecord
                switch r.next(10) {
                case 0: rec = grant(lease, 20 + r.next(20), voucher: voucher)
                case 1: rec = closed(lease, granted: 0, served: 0, voucher: voucher)
                case 2:
                    let toPool = r.next(2) == 0
                    rec = .claim(ClaimEvent(kind: .unclaimed, claimID: "c\(r.next(max(n, 1)))", voucher: voucher, user: "u", qty: 1,
                                            region: "sg", host: "h", shares: [ClaimShare(leaseId: lease, tokens: 1)], tsMs: 1,
                                            toPool: toPool ? 1 : 0))
                case 3:
                    // The journal writer's pattern: keep the books, change them, sometimes put them back.
                        if let s = saved, r.next(2) == 0 {
                        l = s
                        ref = s
                        saved = nil
                    } else {
                        saved = l
                    }
                    continue
                case 4 where r.next(8) == 0:
                    l.distrustAll()
                    ref.distrustAll()
                    continue
                case 5 where r.next(8) == 0:
                    l = LeaseLedger(l.snapshot)
                    ref = LeaseLedger(ref.snapshot)
                    continue
                default:
                    n += 1
                    rec = claim("c\(n)", lease: lease, qty: 1 + r.next(3), voucher: voucher)
                }
                let before = l.anomalies.count
                l.apply(rec)
                ref = LeaseLedger(ref.snapshot)
                ref.apply(rec)
                #expect(l.accounts == ref.accounts, "seed \(seed) step \(step): \(rec)")
                #expect(l.anomalies.count - before == ref.anomalies.count, "seed \(seed) step \(step): \(rec)")
                if l.accounts != ref.accounts { return }
            }
        }
    }
}

@Suite("A waiting claim's deadline")
struct ClaimDeadlineTests {
    @Test func theTimeoutInNanosecondsFollowsEverySettingAndAddsLikeADuration() {
        var rules = ClaimRules(region: "sg", host: "h", idPrefix: "c.", durability: .journal)
        #expect(rules.claimTimeoutNanoseconds == rules.claimTimeout.nanosecondsClamped)
        let now = Instant(nanoseconds: 5_000_000_000)
        for t: Duration in [.milliseconds(1), .seconds(3), .zero, .nanoseconds(7), .seconds(Int64.max / 2), .seconds(-1)] {
            rules.claimTimeout = t
            #expect(rules.claimTimeoutNanoseconds == t.nanosecondsClamped, "\(t)")
            #expect(now.adding(nanoseconds: rules.claimTimeoutNanoseconds) == now + t, "\(t)")
        }
        #expect(now.adding(nanoseconds: .min) == Instant.min && Instant.max.adding(nanoseconds: 1) == Instant.max)
    }
}

@Suite("An UNCLAIM's owed per-user release")
struct UnclaimReleaseTests {
    /// Found by `quota-bench chaos` (seed 2246823350): an `UNCLAIM` journals the user's release (`releaseOwed`) and
    /// then its cancellation. The journal's disk filled between the two: the release was durable, the cancellation
    /// failed (the `UNCLAIM` answered UNAVAILABLE, the claim stands), and the next start released the user's count
    /// in Redis on the journal's word, so the user got a third claim under a limit of 2. A release is owed only with
    /// its cancellation.
    @Test func aReleaseWhoseCancellationWasNeverJournaledIsNotOwed() throws {
        let dir = tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let cancel = ClaimEvent(kind: .unclaimed, claimID: "c1", voucher: "v", user: "u-c1", qty: 1, region: "sg", host: "h",
                                shares: [ClaimShare(leaseId: "1", tokens: 1)], tsMs: 1, toPool: 0)
        // c0: its release journaled, its cancellation not (the write failed). c1: both.
        let j = try writeJournal(dir, [grant("1", 10), claim("c0"), claim("c1"),
                                       .releaseOwed(voucher: "v", user: "u-c0", claimID: "c0"),
                                       .releaseOwed(voucher: "v", user: "u-c1", claimID: "c1"), .claim(cancel)])
        j.close()
        let r = JournalRecovery.read(dir: dir)
        #expect(r.ledger.owedReleases.keys.sorted() == ["c1"], "only the cancelled claim's count is released: \(r.ledger.owedReleases.keys.sorted())")
        // Folded one record at a time, the same.
        var l = LeaseLedger()
        for rec in [grant("1", 10), claim("c0"), .releaseOwed(voucher: "v", user: "u-c0", claimID: "c0")] { l.apply(rec) }
        #expect(l.owedReleases.isEmpty && LeaseLedger(l.snapshot).owedReleases.isEmpty)
        l.apply(.claim(cancel.cancellation(tsMs: 2, toPool: 0)))  // c1's cancellation without its release: nothing owed
        #expect(l.owedReleases.isEmpty)
    }
}
