import Foundation
import QuotaHarness
import Testing

/// Run `quota-bench chaos` (the built binary, next to quotad): its exit status and output.
func chaos(_ args: [String]) async throws -> (Int32, String) {
    let dir = TempDir()
    let p = try ChildProcess(Bin.path("quota-bench"), ["chaos", "--quiet", "--keep", dir.file("kept")] + args,
                             log: dir.file("out"))
    let st = try await p.wait(timeout: .seconds(600))
    return (st, p.output)
}

@Suite("quota-chaos: randomized faults, a recorded history, every invariant checked", .serialized,
       .timeLimit(.minutes(10)))
struct ChaosTests {
    @Test func aShortChaosPassFindsNoViolation() async throws {
        // Two seeds kept as regressions, and one new seed per run of the suite.
        let fresh = UInt64.random(in: 1_000...UInt64(UInt32.max))
        for seed in [UInt64(2), 5, fresh] {
            let (st, out) = try await chaos(["--seed", String(seed), "--duration", "10"])
            #expect(st == 0, "seed \(seed) (replay: quota-bench chaos --seed \(seed) --duration 10):\n\(out)")
            #expect(out.contains("seed \(seed): ok"))
        }
    }

    @Test(arguments: [("skip-user-check", "sidecar-kill", "per-user"),
                      ("double-return", "sidecar-kill", "OVERSOLD"),
                      ("no-timeout-cancel", "broker-stop", "books")])
    func theCheckerReportsAnInjectedBugWithinAFewRuns(bug: String, faults: String, expected: String) async throws {
        var found = false
        var last = ""
        for seed in [UInt64(10), 11, 12] where !found {
            let (st, out) = try await chaos(["--seed", String(seed), "--duration", "10", "--bug", bug, "--faults", faults])
            last = out
            if st == 1 && out.contains(expected) { found = true }
        }
        #expect(found, "bug \(bug) not reported as \(expected) in 3 runs:\n\(last)")
    }
}
