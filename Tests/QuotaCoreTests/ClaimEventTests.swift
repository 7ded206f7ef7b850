import QuotaCore
import Testing

@Suite("Claim events: ids and copy-on-write values")
struct ClaimEventTests {
    @Test func claimIDsAreThePrefixThenTheSequenceInLowercaseBase36() {
        var values = [0, 1, 9, 10, 35, 36, 37, 1295, 1296, 46_655, 46_656, Int(Int32.max), Int.max]
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<2000 { values.append(Int.random(in: 0...Int.max, using: &rng)) }
        for prefix in ["", "h.", "host-1.lq7x2a9.3.", "hôst·é."] {
            for v in values {
                #expect(ClaimEvent.claimID(prefix: prefix, seq: v) == prefix + String(v, radix: 36))
            }
        }
    }

    @Test func aCopyChangedDoesNotChangeTheOriginal() {
        let a = ClaimEvent(claimID: "h.1", voucher: "v", user: "u", qty: 2, region: "sg", host: "h",
                           shares: [ClaimShare(leaseId: "L1", tokens: 2)], tsMs: 7, req: "r")
        var b = a
        #expect(a == b)
        b.kind = .unclaimed
        b.shares.append(ClaimShare(leaseId: "L2", tokens: 1))
        b.req = nil
        #expect(a.kind == .claimed && a.shares.count == 1 && a.req == "r")
        #expect(b.kind == .unclaimed && b.shares.count == 2 && b.req == nil)
        #expect(a != b)
        let c = a.cancellation(tsMs: 9, toPool: 1)
        #expect(a.kind == .claimed && a.tsMs == 7 && a.toPool == 0)
        #expect(c.kind == .unclaimed && c.tsMs == 9 && c.toPool == 1 && c.claimID == a.claimID)
        // Equal values in different boxes are equal.
        let d = ClaimEvent(claimID: "h.1", voucher: "v", user: "u", qty: 2, region: "sg", host: "h",
                           shares: [ClaimShare(leaseId: "L1", tokens: 2)], tsMs: 7, req: "r")
        #expect(a == d)
    }
}
