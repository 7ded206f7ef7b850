@testable import QuotaCore
import Testing

/// The journal's record checksum: the CPU's CRC-32C instructions (when it has them) and the table version
/// must give the same values, the standard ones.
struct CRC32CTests {
    @Test func theChecksumIsCRC32CsStandardCheckValue() {
        #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
        #expect(CRC32C.checksum([UInt8]()) == 0)
        #expect(CRC32C.checksum([UInt8](repeating: 0, count: 32)) == 0x8A91_36AA)
    }

    @Test func theCPUsInstructionsAndTheTablesAgreeOnEveryLengthAndAlignment() {
        var rng = SystemRandomNumberGenerator()
        let bytes = (0..<600).map { _ in UInt8.random(in: 0...255, using: &rng) }
        bytes.withUnsafeBytes { all in
            for start in 0..<9 {
                for length in 0..<(all.count - start) where length < 80 || length % 37 == 0 {
                    let p = UnsafeRawBufferPointer(rebasing: all[start..<(start + length)])
                    let seed = UInt32.random(in: 0...UInt32.max, using: &rng)
                    #expect(CRC32C.update(seed, p) == CRC32C.updateTable(seed, p), "start \(start) length \(length)")
                }
            }
        }
    }

    @Test func thisMachineUsesTheCPUsInstructions() {
        // Not a requirement of the code (it falls back to the tables), but of the figures measured here.
        #expect(CRC32C.hardware)
    }
}
