import Foundation
import Glibc
import QuotaHarness
import QuotaRedis
import Testing

/// Review of `quotactl rebalance` (8126656): each test states an invariant the change broke
/// (each failed before its fix). Finding 4 (a destination rehydrated after a finished transfer is reported
/// as lost by audit) is a documented limitation: docs/accounting.md, "Transfers and rehydration".
@Suite(.serialized, .timeLimit(.minutes(6))) struct RebalanceReviewTests {
    /// Two regions, each its own redis-server; with `kafka`, the config names the broker and a ledger db too.
    final class Regions: @unchecked Sendable {
        let sg: RedisServer
        let id: RedisServer
        let dir = TempDir()
        let config: String

        init(kafka: KafkaBroker? = nil, topic: String = "t-rb") async throws {
            signal(SIGPIPE, SIG_IGN)  // restartEmpty: the harness's connection writes to the killed server
            sg = try await RedisServer()
            id = try await RedisServer()
            config = dir.file("quotactl.yaml")
            var y = """
                host_id: quotactl
                region: sg
                regions:
                  sg: { redis: "\(sg.url)" }
                  id: { redis: "\(id.url)" }
                socket: { path: \(dir.file("quotactl.sock")) }
                durability: none

                """
            if let kafka {
                y += "kafka: { brokers: \"\(kafka.brokers)\", topic: \(topic) }\n"
                y += "ledger: { db: \"sqlite://\(dir.file("ledger.db"))\" }\n"
            }
            try y.write(toFile: config, atomically: true, encoding: .utf8)
        }

        func ctl(_ args: [String], failpoint: String? = nil) async throws -> (Int32, String) {
            let out = TempDir()
            let p = try ChildProcess(Bin.path("quotactl"), args + ["--config", config], log: out.file("out"),
                                     environment: failpoint.map { ["QUOTACTL_FAILPOINT": $0] } ?? [:])
            let st = try await p.wait()
            return (st, p.output)
        }

        func snapshot(_ v: String) async throws -> [String] {
            var out: [String] = []
            for r in [sg, id] {
                for k in ["quota:{\(v)}", "quota:{\(v)}:transfers"] {
                    let f = QuotaStore.fields(try await r.command("HGETALL", k))
                    out.append(f.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ","))
                }
            }
            return out
        }

        /// The cross-region audit: exit status, global in-flight, problems.
        func audit(_ v: String) async throws -> (Int32, Int, [String], String) {
            let (st, out) = try await ctl(["audit", v, "--json"])
            let j = out.data(using: .utf8).flatMap { try? JSONSerialization.jsonObject(with: $0) as? [String: Any] } ?? [:]
            let g = j["global"] as? [String: Any] ?? [:]
            return (st, g["in_flight"] as? Int ?? -1, g["problems"] as? [String] ?? [], out)
        }
    }

    /// Finding 1. The same transfer id used in opposite directions while the first is in flight (a concurrent
    /// reverse rebalance, or an operator reusing an id after a crash). The second command fails AFTER its
    /// step 1 (its give finds the first transfer's `out` record in the destination and refuses), so (a) a
    /// refused command changed the books, and (b) both transfers are stuck `taken` forever: neither a re-run
    /// nor `--resume` can give either (each destination holds the other's `out` record under that id), and
    /// `--resume` aborts on the first one, so it finishes no other transfer of the voucher either. Audit
    /// calls it balanced (G1 counts both as in flight), so nothing flags it: 600 tokens stranded.
    @Test func theSameTransferIdInOppositeDirectionsStrandsBothTransfersForever() async throws {
        let t = try await Regions()
        let (cst, cout) = try await t.ctl(["voucher", "create", "rr1", "--limit", "1000", "--region", "sg=600", "--region", "id=400"])
        #expect(cst == 0, "\(cout)")
        // sg -> id, transfer id T, killed after step 1 (equivalently: still running).
        let (k, ko) = try await t.ctl(["rebalance", "rr1", "--from", "sg", "--to", "id", "--amount", "300", "--transfer-id", "T"],
                                      failpoint: "after-take")
        #expect(k == 128 + SIGKILL, "\(ko)")
        let before = try await t.snapshot("rr1")
        // id -> sg with the same transfer id: must be refused with nothing changed.
        let (st, out) = try await t.ctl(["rebalance", "rr1", "--from", "id", "--to", "sg", "--amount", "300", "--transfer-id", "T"])
        #expect(st != 0, "\(out)")
        #expect(try await t.snapshot("rr1") == before, "a refused rebalance changed the books:\n\(out)")
        // Whatever happened, --resume must be able to finish what is in flight.
        let (rs, ro) = try await t.ctl(["rebalance", "rr1", "--resume"])
        #expect(rs == 0, "--resume: \(ro)")
        let (_, inFlight, problems, aout) = try await t.audit("rr1")
        #expect(inFlight == 0, "tokens stranded in flight: \(inFlight); problems \(problems)\n\(aout)")
    }

    /// Finding 2. The destination's Redis lost its data (restart without AOF): the voucher and the region
    /// marker are gone, the region's sidecars fail closed, and `rehydrate` is how it comes back. `rebalance`
    /// takes "no voucher in the destination" for "never had a pool there", runs `createVoucher` (which also
    /// writes a NEW region marker through ensureRegion) and gives into an empty voucher: the region's
    /// allocation of 400 (less what it sold) is gone (G1: 500 + 100 != 1000), and a later `rehydrate` skips
    /// the voucher ("exists in Redis, never overwritten"). Expected: refused, nothing changed (the region's
    /// marker is absent while the source's voucher says total_limit 1000 — G1 cannot hold).
    @Test func aRebalanceIntoARegionThatLostItsDataCreatesAnEmptyVoucherOverTheLoss() async throws {
        let t = try await Regions()
        let (cst, cout) = try await t.ctl(["voucher", "create", "rr2", "--limit", "1000", "--region", "sg=600", "--region", "id=400"])
        #expect(cst == 0, "\(cout)")
        try await t.id.restartEmpty()
        let (st, out) = try await t.ctl(["rebalance", "rr2", "--from", "sg", "--to", "id", "--amount", "100"])
        #expect(st != 0, "rebalance into a region that lost its data succeeded:\n\(out)")
        #expect(try await t.id.store.voucher("rr2") == nil, "an empty voucher was created over the lost one")
        #expect(try await t.id.store.regionGeneration() == nil, "a new region marker was written over the lost one")
        let (ast, _, problems, aout) = try await t.audit("rr2")
        #expect(ast == 0 && problems.isEmpty, "G1 after the rebalance: \(problems)\n\(aout)")
    }

    /// Finding 3 (oversell). The source's new allocation reaches the ledger only right after step 1 applied
    /// (`recordDefinitions` after `case .applied`). quotactl killed -9 between the take script's effect and
    /// that write (or Kafka failing there: only a warning) leaves the ledger saying sg = 600; the re-run or
    /// `--resume` sees the take `already` and never writes sg's definition. When sg's Redis later loses its
    /// data, `rehydrate` rebuilds sg's pool from limit 600 while id holds 700: 1300 tokens for a 1000 limit.
    /// (The step-1 script is run directly here: that is exactly the state quotactl leaves when killed there.)
    @Test func killedBetweenTakeAndItsLedgerDefinitionThenSourceRehydratedOversells() async throws {
        let kafka = try await KafkaBroker()
        let t = try await Regions(kafka: kafka, topic: "t-rb3")
        let (cst, cout) = try await t.ctl(["voucher", "create", "rr3", "--limit", "1000", "--region", "sg=600", "--region", "id=400"])
        #expect(cst == 0, "\(cout)")
        let sgGen = try await t.sg.store.voucher("rr3")!.generation
        let idGen = try await t.id.store.voucher("rr3")!.generation
        let taken = try await t.sg.store.takeTransfer(voucher: "rr3", id: "T3", to: "id", amount: 300, gen: sgGen, toGeneration: idGen)
        guard case .applied = taken else { throw TestError.failed("take: \(taken)") }
        // --- quotactl killed here (after the script, before recordDefinitions) ---
        let (rs, ro) = try await t.ctl(["rebalance", "rr3", "--resume"])
        #expect(rs == 0 && ro.contains("T3"), "\(ro)")
        #expect(try await t.sg.store.voucher("rr3")!.limit == 300)
        #expect(try await t.id.store.voucher("rr3")!.limit == 700)

        try await t.sg.restartEmpty()
        let (hs, ho) = try await t.ctl(["rehydrate", "--region", "sg", "--confirm-shipped"])
        #expect(hs == 0 && ho.contains("rebuilt"), "\(ho)")
        let sg = try await t.sg.store.voucher("rr3")
        let id = try await t.id.store.voucher("rr3")!
        #expect(sg?.limit == 300, "sg rehydrated with allocation \(sg?.limit ?? -1): sg + id = \((sg?.limit ?? 0) + id.limit) > 1000\n\(ho)")
        #expect((sg?.pool ?? 0) + id.pool <= 1000, "unleased pools \(sg?.pool ?? -1) + \(id.pool) exceed the limit: oversell")
    }
}
