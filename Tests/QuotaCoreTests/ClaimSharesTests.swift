import Testing
@testable import QuotaCore

/// `ClaimShares` keeps one share inline and more in an array (issue 13): every way of building it gives the
/// same shares in the same order, whatever the storage.
@Suite("ClaimShares")
struct ClaimSharesTests {
    private static func share(_ i: Int) -> ClaimShare { ClaimShare(leaseId: "sg:h:\(i):lease-id-longer-than-small", tokens: i + 1) }

    @Test("appending keeps every share in order through none, one and many", arguments: 0...5)
    func appendingKeepsOrder(count: Int) {
        let expected = (0..<count).map(Self.share)
        var s = ClaimShares()
        for e in expected { s.append(e) }
        #expect(s.count == count)
        #expect(Array(s) == expected)
        #expect(s == ClaimShares(expected))
        #expect(s.map(\.tokens).reduce(0, +) == expected.map(\.tokens).reduce(0, +))
        for (i, e) in expected.enumerated() { #expect(s[i] == e) }
    }

    @Test("equality compares the shares, not how they are stored")
    func equalityIsByShares() {
        let one: ClaimShares = [Self.share(0)]
        #expect(one == ClaimShares(Self.share(0)))
        #expect(one != ClaimShares(Self.share(1)))
        #expect(one != [Self.share(0), Self.share(1)])
        #expect(ClaimShares() == [])
        #expect(ClaimShares() != one)
        let two: ClaimShares = [Self.share(0), Self.share(1)]
        var grown = one
        grown.append(Self.share(1))
        #expect(grown == two && one.count == 1)   // (the copy it grew from is unchanged)
    }

    @Test("a copy grown after it was taken leaves the original unchanged")
    func copiesAreValues() {
        var a: ClaimShares = [Self.share(0), Self.share(1)]
        let b = a
        a.append(Self.share(2))
        #expect(b.count == 2 && a.count == 3 && Array(a.prefix(2)) == Array(b))
    }
}
