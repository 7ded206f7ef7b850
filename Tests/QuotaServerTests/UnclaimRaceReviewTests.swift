@testable import QuotaServer
import QuotaCore
import Testing

/// Review (helper-43) of b2d18c2, "a retried UNCLAIM" (failed on it; fixed: `ClaimBook.Take.inProgress`, answered
/// UNAVAILABLE until the first one is answered): a retry that comes while the first UNCLAIM's cancellation
/// is still being journaled is answered +OK at once (`takeForUnclaim` -> `.already`, SidecarEngine.unclaim),
/// before the first one knows whether its cancellation is durable. When it is not (disk full: the case b2d18c2
/// fixes), the first is answered UNAVAILABLE and the claim is restored: it stands, though a retry was told +OK.
@Suite("Review helper-43: a retried UNCLAIM")
struct UnclaimRaceReviewTests {
    @Test func aRetriedUnclaimWhileTheFirstIsInFlightIsNotToldOKBeforeItsCancellationIsDurable() {
        let book = ClaimBook(prefix: "sg.h.b.", region: "sg", host: "h", capacity: 1024)
        let id = ClaimEvent.claimID(prefix: "sg.h.b.", seq: 1)
        let e = ClaimEvent(claimID: id, voucher: "v", user: "bob", qty: 1, region: "sg", host: "h",
                           shares: [ClaimShare(leaseId: "7", tokens: 1)], tsMs: 1)
        book.add(e, seq: 1, voucherIndex: nil)
        guard case .take = book.takeForUnclaim(id) else { Issue.record("first UNCLAIM does not take the claim"); return }
        // The first UNCLAIM's releaseOwed and cancellation are queued in the journal; the client retries.
        let retry = book.takeForUnclaim(id)
        let toldOK: Bool
        if case .already = retry { toldOK = true } else { toldOK = false }
        // The first one's cancellation fails (disk full): UNAVAILABLE, and the claim is put back (it stands).
        book.restore(id)
        guard case .take = book.takeForUnclaim(id) else { Issue.record("the claim no longer stands"); return }
        #expect(!toldOK, "the retry was answered +OK (.already) while the claim still stands")
    }
}
