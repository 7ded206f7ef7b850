import Foundation
import Logging
import QuotaCore
import QuotaJournal
import Testing

/// Review (helper-43) of b2d18c2: an UNCLAIM's per-user release is owed only once its cancellation follows
/// (`LeaseLedger.releasesAwaitingCancel`). Each test here failed on b2d18c2: a timed-out claim's cancellation now
/// owes its release too (`startCancel`), and a segment that rolls between a release and its cancellation carries
/// the release after its snapshot (`Journal.openNextSegment`).

/// The journal records a machine's effects would append, in order (what the journal writer folds).
private func journaled(_ fx: [VoucherMachine.Effect]) -> [JournalRecord] {
    fx.compactMap { e -> JournalRecord? in
        switch e {
        case .journal(let r): return r
        case .journalIntent(let c, _): return .claim(c)
        case .recordClaim(let c, _): return .claim(c)
        case .recordLater(let c): return .claim(c)
        case .recordCancel(let c, _): return .claim(c)
        case .recordGrant(let r, _, _): return r
        default: return nil
        }
    }
}

@Suite("Review helper-43: owed per-user releases")
struct ReleaseOwedReviewTests {
    /// Found (b), fixed: a claim whose record became durable after its caller was told UNAVAILABLE is cancelled by
    /// the machine itself (`startCancel`, `CancelRef.claim`). Its user's count was taken (intent, check
    /// `counted`), and the machine releases it (`abort` -> `.releaseUser`, a background chore) only after the
    /// cancellation is durable. The journal says: intent(c) [owed], claimed(c) [no longer owed: "the claim's
    /// own"], unclaimed(c) [no releaseOwed before it: nothing owed]. A crash (or a stop with Redis down) before
    /// the chore lands strands the user's count for a cancelled claim for good: the same "a release is owed
    /// with its cancellation" rule the commit states, not applied to the machine's other cancellation path.
    @Test func aTimedOutClaimsCancellationOwesItsUsersRelease() throws {
        var r = Rig(durability: .journal, perUser: 2, claimTimeout: .milliseconds(500))
        var l = LeaseLedger()
        l.apply(grant("1", 10))
        func fold(_ fx: [VoucherMachine.Effect]) { for x in journaled(fx) { l.apply(x) } }
        let (t, _) = r.claim("bob")
        try r.grant(10)
        var fx = r.take()
        fold(fx)
        guard case .journalIntent(let intent, let seq)? = fx.first(where: { if case .journalIntent = $0 { return true }; return false })
        else { Issue.record("no intent"); return }
        #expect(l.owedReleases[intent.claimID] != nil, "the intent's count is owed")
        r.m.intentJournaled(seq: seq, ok: true, now: r.clock.now, effects: &r.fx)
        fold(r.take())
        r.m.usersChecked(seqs: [seq], results: [.counted], now: r.clock.now, effects: &r.fx)
        fx = r.take()
        fold(fx)
        #expect(fx.records.count == 1, "the claim is recorded")
        // The disk stalls past the claim timeout: the caller is told UNAVAILABLE.
        r.tick(.milliseconds(600))
        fx = r.take()
        fold(fx)
        guard case .refused(let e)? = fx.answers[t] else { Issue.record("no timeout answer"); return }
        #expect(e.code == .unavailable)
        // The record lands: the machine cancels the claim (its caller was told it failed).
        r.m.claimsRecorded(seqs: [seq], ok: true, now: r.clock.now, effects: &r.fx)
        fx = r.take()
        fold(fx)
        let (cancel, ref) = try #require(fx.cancels.first)
        #expect(cancel.kind == .unclaimed && cancel.claimID == intent.claimID)
        // The cancellation is durable: the journal now says the claim is cancelled ...
        r.m.cancelRecorded(ref, ok: true, now: r.clock.now, effects: &r.fx)
        fx = r.take()
        fold(fx)
        // ... and the machine knows the user's count was taken: it asks for it to be released (in memory only).
        #expect(fx.contains { if case .releaseUser(let c, _) = $0 { return c.claimID == intent.claimID }; return false },
                "the machine releases the count")
        // A crash now: the next start releases only what the journal owes.
        #expect(l.owedReleases[intent.claimID] != nil,
                "the cancelled claim's count is owed in the journal: owed \(l.owedReleases.keys.sorted())")
    }

    /// (Tried, holds.) A retried UNCLAIM after one whose cancellation failed: the machine journals releaseOwed
    /// again, and the release is owed once, only after the second attempt's cancellation.
    @Test func aRetriedUnclaimAfterAFailedOneOwesTheReleaseOnlyOnceCancelled() throws {
        var r = Rig(durability: .journal, perUser: 2)
        var l = LeaseLedger()
        l.apply(grant("1", 10))
        func fold(_ fx: [VoucherMachine.Effect], droppingCancels: Bool = false) {
            for x in journaled(fx) {
                if droppingCancels, case .claim(let c) = x, c.kind == .unclaimed { continue }
                l.apply(x)
            }
        }
        _ = r.claim("bob")
        try r.grant(10)
        var fx = r.take()
        fold(fx)
        guard case .journalIntent(let intent, let seq)? = fx.first(where: { if case .journalIntent = $0 { return true }; return false })
        else { Issue.record("no intent"); return }
        r.m.intentJournaled(seq: seq, ok: true, now: r.clock.now, effects: &r.fx)
        fold(r.take())
        r.m.usersChecked(seqs: [seq], results: [.counted], now: r.clock.now, effects: &r.fx)
        fx = r.take()
        fold(fx)
        let (claimEvent, _) = try #require(fx.records.first)
        r.m.claimsRecorded(seqs: [seq], ok: true, now: r.clock.now, effects: &r.fx)
        fold(r.take())
        #expect(l.owedReleases.isEmpty)
        // First UNCLAIM: its release is durable, its cancellation is not (the batch failed: ledger = saved).
        r.m.unclaim(claimEvent, ticket: 100, tsMs: 2, effects: &r.fx)
        fold(r.take(), droppingCancels: true)
        r.m.cancelRecorded(.unclaim(100), ok: false, now: r.clock.now, effects: &r.fx)
        fx = r.take()
        #expect(!fx.contains { if case .releaseUser = $0 { return true }; return false })
        #expect(l.owedReleases.isEmpty, "the claim stands: nothing owed")
        #expect(LeaseLedger(l.snapshot).owedReleases.isEmpty)
        // Retried: releaseOwed again, then the cancellation.
        r.m.unclaim(claimEvent, ticket: 101, tsMs: 3, effects: &r.fx)
        fx = r.take()
        #expect(journaled(fx).filter { if case .releaseOwed = $0 { return true }; return false }.count == 1)
        fold(fx)
        r.m.cancelRecorded(.unclaim(101), ok: true, now: r.clock.now, effects: &r.fx)
        #expect(l.owedReleases.keys.sorted() == [intent.claimID])
    }

    /// Found, fixed (it was a documented leak), with the real journal: a segment rolls between the release and its
    /// cancellation. The writer's own books owe the release (its next segment's snapshot says so), but
    /// recovery, which restores at every segment's snapshot, does not until that next roll: a stop (crash,
    /// or a clean stop whose release chore could not reach Redis) inside that window strands the count.
    @Test func aRollBetweenTheReleaseAndItsCancellationKeepsItOwed() throws {
        let dir = tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let cancel = ClaimEvent(kind: .unclaimed, claimID: "c0", voucher: "v", user: "u-c0", qty: 1, region: "sg", host: "h",
                                shares: [ClaimShare(leaseId: "1", tokens: 1)], tsMs: 1, toPool: 0)
        // A segment rolls by age (rollAfter) after the batch holding the release, before its cancellation.
        var o = Journal.Options(dir: dir)
        o.rollAfter = .seconds(1)
        o.retention = .zero
        let j = try Journal(options: o, recovered: JournalRecovery.read(dir: dir), logger: Logger(label: "t"), onDurable: { _ in })
        appendAndWait(j, [grant("1", 10), claim("c0"), .releaseOwed(voucher: "v", user: "u-c0", claimID: "c0")])
        #expect(segments(dir).count == 1)
        let start = Date()
        while segments(dir).count < 2 && Date().timeIntervalSince(start) < 5 { usleep(10_000) }
        #expect(segments(dir).count == 2, "rolled")
        appendAndWait(j, [.claim(cancel)])   // the UNCLAIM is answered +OK here
        j.close()
        let r = JournalRecovery.read(dir: dir)
        #expect(r.history.last?.kind == .unclaimed, "the journal says c0 is cancelled")
        #expect(r.ledger.owedReleases.keys.sorted() == ["c0"],
                "a cancelled claim's count is not owed after a stop: \(r.ledger.owedReleases.keys.sorted())")
    }
}
