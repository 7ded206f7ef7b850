@testable import QuotaServer
import QuotaChaos
import QuotaCore
import Testing

private func claim(_ id: String, voucher: String = "v", qty: Int = 1, lease: String = "7") -> ClaimEvent {
    ClaimEvent(claimID: id, voucher: voucher, user: "u", qty: qty, region: "sg", host: "h1",
               shares: [ClaimShare(leaseId: lease, tokens: qty)], tsMs: 0)
}

/// The pre-change restore, as a model: one claim at a time, at most `capacity` distinct ids.
private struct OldModel {
    let capacity: Int
    var map: [String: (ClaimEvent, Bool)] = [:]
    var count = 0
    mutating func add(_ e: ClaimEvent) {
        guard capacity > 0, count < capacity else { return }
        if map[e.claimID] == nil { count += 1 }
        map[e.claimID] = (e, false)
    }
    mutating func mark(_ id: String) { if map[id] != nil { map[id]!.1 = true } }
}

// A restart puts the journal's claims into the UNCLAIM book in runs (ClaimBook.addRecovered, issue 13).
// These hold it to what adding them one by one did. Found by review: a claim id twice in a run was counted
// twice against `claims.max_tracked`, so a kept, uncancelled claim could be dropped (and UNCLAIM of it refused).
@Suite("UNCLAIM book: claims restored from the journal in runs")
struct RecoveredRunsTests {
    /// A claim id twice in the journal (one run), capacity 4: the old per-event code kept B.1..B.4 (the
    /// duplicate counted once); the run counts the duplicate twice and stops before B.4.
    @Test func aDuplicateInARunDoesNotCostACapacitySlot() {
        let book = ClaimBook(prefix: "sg.h1.now.", region: "sg", host: "h1", capacity: 4)
        let p = "sg.h1.bootA."
        book.addRecovered([claim(p + "1"), claim(p + "1"), claim(p + "2"), claim(p + "3"), claim(p + "4")])
        #expect(book.count == 4)
        guard case .take = book.takeForUnclaim(p + "4") else {
            Issue.record("\(p)4 was in the journal, within capacity, and not cancelled: old code gave .take")
            return
        }
    }

    /// The same across runs: a claim already in the book re-journaled, then new claims of its boot.
    @Test func aClaimAlreadyInTheBookDoesNotCostASlotInALaterRun() {
        let book = ClaimBook(prefix: "sg.h1.now.", region: "sg", host: "h1", capacity: 3)
        let p = "sg.h1.bootA."
        book.addRecovered([claim(p + "1")])
        book.markUnclaimed("unrelated")
        book.addRecovered([claim(p + "1"), claim(p + "2"), claim(p + "3")])
        guard case .take = book.takeForUnclaim(p + "3") else {
            Issue.record("old code kept \(p)3 (3 distinct claims, capacity 3)")
            return
        }
    }

    /// Differential: random journals (several boots, ids not of quotad's form, duplicates, cancellations,
    /// vouchers alternating, small capacities) against the old per-event model.
    @Test func randomJournalsRestoreAsOneByOneWithRepeatedClaimIDs() { for seed in 0..<1000 { check(seed: seed, unique: false) } }
    @Test func randomJournalsRestoreAsOneByOne() { for seed in 0..<3000 { check(seed: seed, unique: true) } }

    func check(seed: Int, unique: Bool) {
        var seen = Set<String>()
        var rng = SplitMix(UInt64(seed) &+ 1)
        let capacity = Int(rng.next() % 9)
        let prefixes = ["sg.h1.bootA.", "sg.h1.bootB.", "eu.h2.bootC."]
        let odd = ["x", "sg.h1.bootA.00", "sg.h1.bootA.Z", "sg.h1.bootA.", "sg.h1.bootB.-1"]
        var universe: [String] = odd
        for p in prefixes { for s in 0..<6 { universe.append(p + String(s, radix: 36)) } }
        var history: [(ClaimEvent, Bool)] = []  // (event, isUnclaim)
        for _ in 0..<Int(rng.next() % 30) {
            let id = universe[Int(rng.next() % UInt64(universe.count))]
            if rng.next() % 4 == 0 { history.append((claim(id), true)); continue }
            if unique { if seen.contains(id) { continue }; seen.insert(id) }
            let parts = id.split(separator: ".", omittingEmptySubsequences: false)
            let region = parts.count > 1 ? String(parts[0]) : "sg"
            let host = parts.count > 1 ? String(parts[1]) : "h1"
            let v = ["v", "w", "v2"][Int(rng.next() % 3)]
            let lease = ["7", "L-x", "3"][Int(rng.next() % 3)]
            let qty = [1, 2, 40000][Int(rng.next() % 3)]
            history.append((ClaimEvent(claimID: id, voucher: v, user: "u\(rng.next() % 3)", qty: qty, region: region,
                                       host: host, shares: [ClaimShare(leaseId: lease, tokens: qty)], tsMs: 0), false))
        }
        let book = ClaimBook(prefix: "sg.h1.now.", region: "sg", host: "h1", capacity: capacity)
        var model = OldModel(capacity: capacity)
        var run: [ClaimEvent] = []
        for (e, un) in history {
            if un {
                book.addRecovered(run); run.removeAll()
                book.markUnclaimed(e.claimID); model.mark(e.claimID)
            } else { run.append(e); model.add(e) }
        }
        book.addRecovered(run)
        #expect(book.count == model.count, "seed \(seed) count")
        for id in universe {
            let got = book.takeForUnclaim(id)
            switch (got, model.map[id]) {
            case (.unknown, nil): break
            case (.already, let m?) where m.1: break
            case (.take(let e), let m?) where !m.1:
                #expect(e.voucher == m.0.voucher && e.qty == m.0.qty && e.shares == m.0.shares && e.user == m.0.user
                        && e.region == m.0.region && e.host == m.0.host, "seed \(seed) \(id): \(e) vs \(m.0)")
            default:
                Issue.record("seed \(seed) cap \(capacity) \(id): new \(got), old \(String(describing: model.map[id]))")
            }
        }
    }
}

