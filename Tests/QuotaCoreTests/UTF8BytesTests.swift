import QuotaCore
import Testing

struct UTF8BytesTests {
    /// The bytes read in place are the string's UTF-8, whatever its form (empty, small and inline, large,
    /// non-ASCII, decomposed, made from a substring or from a Character view).
    @Test(arguments: ["", "a", "sg.host-a.k3x9.", String(repeating: "p", count: 200), "é.ü\u{301}", "🎉emoji🎉",
                      String("xx-sliced-from-a-longer-string-xx".dropFirst(3).dropLast(3)),
                      String(String(repeating: "long-é-", count: 30).reversed())])
    func theBytesAreTheStringsUTF8(_ s: String) {
        let read = s.withUTF8Bytes { Array($0) }
        #expect(read == Array(s.utf8))
    }
}
