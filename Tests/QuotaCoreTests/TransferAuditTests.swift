import QuotaCore
import Testing

/// The transfer checks of the audit (R4, R5, G1, G2) catch quota created or lost between regions.
@Suite("Transfer accounting")
struct TransferAuditTests {
    /// A region's books with no leases: its pool is its whole allocation.
    static func region(_ name: String, created: Int, sent: Int = 0, received: Int = 0, total: Int = 1000,
                       transfers: [VoucherAudit.Transfer] = [], limit: Int? = nil) -> (region: String, books: VoucherAudit) {
        let l = limit ?? created - sent + received
        var b = VoucherAudit(voucher: "v", limit: l, pool: l, leased: 0, returned: 0, restocked: 0, leases: [])
        b.allocated = created
        b.sent = sent
        b.received = received
        b.totalLimit = total
        b.transfers = transfers
        return (name, b)
    }

    static func out(_ id: String, to: String, _ n: Int, done: Bool) -> VoucherAudit.Transfer {
        .init(id: id, outgoing: true, peer: to, amount: n, done: done)
    }
    static func inn(_ id: String, from: String, _ n: Int) -> VoucherAudit.Transfer {
        .init(id: id, outgoing: false, peer: from, amount: n, done: true)
    }

    @Test func aTransferBetweenItsStepsIsInFlightAndBalances() {
        let sg = Self.region("sg", created: 600, sent: 300, transfers: [Self.out("T", to: "id", 300, done: false)])
        let taken = [sg, Self.region("id", created: 400)]
        #expect(taken.flatMap { $0.books.redisProblems() } == [])
        let g = VoucherAudit.globalProblems(taken)
        #expect(g.inFlight == 300 && g.problems == [])
        let given = [sg, Self.region("id", created: 400, received: 300, transfers: [Self.inn("T", from: "sg", 300)])]
        let h = VoucherAudit.globalProblems(given)
        #expect(h.inFlight == 0 && h.problems == [])
    }

    @Test func quotaGivenTwiceOrNeverTakenOrLostIsAnImbalance() {
        let sg = Self.region("sg", created: 600, sent: 300, transfers: [Self.out("T", to: "id", 300, done: true)])
        // Given twice: the destination's allocation exceeds its records (R4/R5) and the total (G1).
        let twice = Self.region("id", created: 400, received: 300, transfers: [Self.inn("T", from: "sg", 300)], limit: 1000)
        #expect(!twice.books.redisProblems().isEmpty)
        #expect(VoucherAudit.globalProblems([sg, twice]).problems.contains { $0.hasPrefix("G1") })
        // Received without the source having taken it: created.
        let created = Self.region("id", created: 400, received: 50, transfers: [Self.inn("U", from: "sg", 50)])
        #expect(VoucherAudit.globalProblems([Self.region("sg", created: 600), created]).problems.contains { $0.contains("never took it") })
        // Marked done by the source, never received: lost.
        let lost = VoucherAudit.globalProblems([sg, Self.region("id", created: 400)])
        #expect(lost.problems.contains { $0.contains("never received it") })
    }
}
