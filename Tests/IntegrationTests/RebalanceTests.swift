import Foundation
import Glibc
import QuotaClient
import QuotaHarness
import QuotaRESP
import QuotaRedis
import Testing

/// `quotactl rebalance`: unleased quota moved between two regions, each its own redis-server, never created
/// or lost, finished after a crash between any two steps (docs/accounting.md, transfers).
@Suite(.serialized) struct RebalanceTests {
    /// Two regions, `sg` and `id`, each with its own Redis, and a quotactl config that knows both.
    final class TwoRegions: @unchecked Sendable {
        let sg: RedisServer
        let id: RedisServer
        let dir = TempDir()
        let config: String
        /// A sidecar's keys after its regions and socket (durability, lease policy, …), given its host id
        /// and this setup's directory.
        let settings: @Sendable (_ host: String, _ dir: TempDir) -> String

        init(settings: @escaping @Sendable (_ host: String, _ dir: TempDir) -> String = { _, _ in
            "durability: none\nlease: { min: 5, max: 40 }\navail_refresh: 0.2\n"
        }) async throws {
            sg = try await RedisServer()
            id = try await RedisServer()
            self.settings = settings
            config = dir.file("quotactl.yaml")
            try yaml(host: "quotactl", region: "sg").write(toFile: config, atomically: true, encoding: .utf8)
        }

        func yaml(host: String, region: String, extra: String = "") -> String {
            """
            host_id: \(host)
            region: \(region)
            regions:
              sg: { redis: "\(sg.url)" }
              id: { redis: "\(id.url)" }
            socket: { path: \(dir.file("\(host).sock")) }

            """ + settings(host, dir) + extra
        }

        /// A sidecar of `region` (`extra`: more keys; `failpoint`: `QUOTAD_FAILPOINT`).
        func sidecar(_ host: String, region: String, extra: String = "", failpoint: String? = nil) async throws -> Quotad {
            let cfg = dir.file("\(host).yaml")
            try yaml(host: host, region: region, extra: extra).write(toFile: cfg, atomically: true, encoding: .utf8)
            return try await Quotad(config: cfg, socket: dir.file("\(host).sock"), host: host, log: dir.file("\(host).log"),
                                    environment: failpoint.map { ["QUOTAD_FAILPOINT": $0] } ?? [:])
        }

        func ctl(_ args: [String], failpoint: String? = nil) async throws -> (Int32, String) {
            let out = TempDir()
            let p = try ChildProcess(Bin.path("quotactl"), args + ["--config", config], log: out.file("out"),
                                     environment: failpoint.map { ["QUOTACTL_FAILPOINT": $0] } ?? [:])
            do {
                let st = try await p.wait()
                return (st, p.output)
            } catch {
                // Seen once in a full run on a loaded box (BorrowTests): say which command and what it printed.
                throw TestError.failed("quotactl \(args.joined(separator: " ")) did not exit: \(error); it printed: \(p.output)")
            }
        }

        func json(_ args: [String]) async throws -> [String: Any] {
            let (st, out) = try await ctl(args + ["--json"])
            guard let d = out.data(using: .utf8), let j = try? JSONSerialization.jsonObject(with: d) as? [String: Any] else {
                throw TestError.failed("quotactl \(args) (\(st)): \(out)")
            }
            return j
        }

        /// Allocation (`limit`) and pool of the voucher in each region.
        func books(_ voucher: String) async throws -> (sg: (limit: Int, pool: Int), id: (limit: Int, pool: Int)) {
            let a = try await sg.store.voucher(voucher)!
            let b = try await id.store.voucher(voucher)!
            return ((a.limit, a.pool), (b.limit, b.pool))
        }

        /// Everything Redis holds about the voucher in both regions (to prove a refused command changed nothing).
        func snapshot(_ voucher: String) async throws -> [String] {
            var out: [String] = []
            for r in [sg, id] {
                for k in ["quota:{\(voucher)}", "quota:{\(voucher)}:transfers"] {
                    let f = QuotaStore.fields(try await r.command("HGETALL", k))
                    out.append(f.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ","))
                }
            }
            return out
        }
    }

    /// The audit across both regions: exit status and its JSON report.
    static func audit(_ t: TwoRegions, _ voucher: String) async throws -> (Int32, [String: Any]) {
        let (st, out) = try await t.ctl(["audit", voucher, "--json"])
        guard let d = out.data(using: .utf8), let j = try? JSONSerialization.jsonObject(with: d) as? [String: Any] else {
            throw TestError.failed("audit: \(out)")
        }
        return (st, j)
    }

    static func inFlight(_ report: [String: Any]) -> Int { (report["global"] as? [String: Any])?["in_flight"] as? Int ?? -1 }

    /// Claims with fresh users on one sidecar until `n` attempts are made; returns successes and error codes.
    static func sell(_ q: Quotad, _ voucher: String, prefix: String, attempts n: Int) async throws -> (ok: Int, errors: [String: Int]) {
        let c = try await RESPClient.connect(q.socket)
        defer { c.close() }
        var ok = 0
        var errors: [String: Int] = [:]
        for chunk in stride(from: 0, to: n, by: 20) {
            let replies = try await c.pipeline((chunk..<min(n, chunk + 20)).map { ["CLAIM", voucher, "\(prefix)\($0)", "REQ", "\(prefix)r\($0)"] })
            for r in replies {
                if let code = r.errorCode { errors[code, default: 0] += 1 } else { ok += 1 }
            }
        }
        return (ok, errors)
    }

    @Test func moving300FromSgToIdThenBothRegionsSellExactlyTheLimit() async throws {
        let t = try await TwoRegions()
        let (cst, cout) = try await t.ctl(["voucher", "create", "rb1", "--limit", "1000", "--region", "sg=600", "--region", "id=400"])
        #expect(cst == 0, "\(cout)")
        let qsg = try await t.sidecar("host-sg", region: "sg")
        let qid = try await t.sidecar("host-id", region: "id")

        // Region id sells its 400 and answers SOLDOUT.
        let first = try await Self.sell(qid, "rb1", prefix: "a", attempts: 450)
        #expect(first.ok == 400 && first.errors == ["SOLDOUT": 50], "\(first)")

        let (st, out) = try await t.ctl(["rebalance", "rb1", "--from", "sg", "--to", "id", "--amount", "300"])
        #expect(st == 0 && out.contains("done"), "\(out)")
        let b = try await t.books("rb1")
        // id's sold-out sidecar may already have leased from its new pool (its refresh or a recall can come
        // first), so id's pool is at most the 300 moved; what it sells is counted below.
        #expect(b.sg.limit == 300 && b.sg.pool == 300 && b.id.limit == 700 && b.id.pool <= 300, "\(b)")

        // The sold-out sidecar sees the new pool without a restart.
        var again = 0
        var tries = 0
        try await eventually("region id sells again", timeout: .seconds(10)) {
            tries += 1  // a new request id each try: a retried REQ would get the first answer again
            again += try await Self.sell(qid, "rb1", prefix: "b\(tries)-", attempts: 1).ok
            return again > 0
        }
        let restID = try await Self.sell(qid, "rb1", prefix: "c", attempts: 400)
        let restSG = try await Self.sell(qsg, "rb1", prefix: "d", attempts: 400)
        #expect(first.ok + again + restID.ok == 700, "id sold \(first.ok + again + restID.ok): \(restID)")
        #expect(restSG.ok == 300, "sg sold \(restSG.ok): \(restSG)")
        #expect(first.ok + again + restID.ok + restSG.ok == 1000, "total sold == limit")
        #expect(try await qsg.stop() == 0)
        #expect(try await qid.stop() == 0)

        // Books: every region balances, the allocations add up to the limit, nothing in flight, and what
        // each region sold through its closed leases is what its sidecar answered.
        let (ast, report) = try await Self.audit(t, "rb1")
        #expect(ast == 0 && report["balanced"] as? Bool == true, "\(report)")
        #expect(Self.inFlight(report) == 0)
        #expect(try await t.sg.books("rb1").closedOutstanding == 300)
        #expect(try await t.id.books("rb1").closedOutstanding == 700)
        let g = try await t.json(["voucher", "show", "rb1", "--global"])
        let rows = (g["regions"] as? [[String: Any]]) ?? []
        #expect(g["limit"] as? Int == 1000 && g["allocations"] as? Int == 1000 && g["in_flight"] as? Int == 0, "\(g)")
        #expect(rows.map { "\($0["region"]!):\($0["allocation"]!):\($0["transfers_in"]!):\($0["transfers_out"]!):\($0["sold"]!)" }
            == ["id:700:300:0:700", "sg:300:0:300:300"], "\(rows)")
    }

    @Test func aTransferKilledAfterEachStepIsInFlightBalancedAndFinishedByARerun() async throws {
        let t = try await TwoRegions()
        let (cst, cout) = try await t.ctl(["voucher", "create", "rb2", "--limit", "1000", "--region", "sg=600", "--region", "id=400"])
        #expect(cst == 0, "\(cout)")
        // A sidecar in id holds a lease meanwhile: the transfer only touches the pool.
        let qid = try await t.sidecar("host-id", region: "id")
        #expect(try await Self.sell(qid, "rb2", prefix: "a", attempts: 10).ok == 10)

        // Killed after step 1: taken from sg, not yet in id.
        let move = ["rebalance", "rb2", "--from", "sg", "--to", "id", "--amount", "300", "--transfer-id", "T1"]
        let (k1, o1) = try await t.ctl(move, failpoint: "after-take")
        #expect(k1 == 128 + SIGKILL, "\(o1)")
        var b = try await t.books("rb2")
        #expect(b.sg.limit == 300 && b.sg.pool == 300 && b.id.limit == 400, "\(b)")
        var (ast, report) = try await Self.audit(t, "rb2")
        #expect(ast == 0 && report["balanced"] as? Bool == true, "in flight and balanced: \(report)")
        #expect(Self.inFlight(report) == 300)
        let (sst, show) = try await t.ctl(["voucher", "show", "rb2", "--global"])
        #expect(sst == 0 && show.contains("transfer T1: 300 from sg to id left taken"), "\(show)")

        // The same command finishes it; a second run changes nothing.
        let (r1, ro1) = try await t.ctl(move)
        #expect(r1 == 0 && ro1.contains("transfer T1 done"), "\(ro1)")
        b = try await t.books("rb2")
        #expect(b.sg.limit == 300 && b.id.limit == 700 && b.sg.limit + b.id.limit == 1000, "\(b)")
        let before = try await t.snapshot("rb2")
        let (r2, ro2) = try await t.ctl(move)
        #expect(r2 == 0 && ro2.contains("already done: nothing changed"), "\(ro2)")
        #expect(try await t.snapshot("rb2") == before)

        // Killed after step 2: id has it, sg still says taken. Nothing in flight; --resume marks it done.
        let back = ["rebalance", "rb2", "--from", "id", "--to", "sg", "--amount", "100", "--transfer-id", "T2"]
        let (k2, o2) = try await t.ctl(back, failpoint: "after-give")
        #expect(k2 == 128 + SIGKILL, "\(o2)")
        b = try await t.books("rb2")
        #expect(b.sg.limit == 400 && b.id.limit == 600, "\(b)")
        (ast, report) = try await Self.audit(t, "rb2")
        #expect(ast == 0 && report["balanced"] as? Bool == true && Self.inFlight(report) == 0, "\(report)")
        #expect(try await t.id.store.transfer(voucher: "rb2", id: "T2")?.state == .taken)
        let (s1, so1) = try await t.ctl(["rebalance", "rb2", "--resume"])
        #expect(s1 == 0 && so1.contains("transfer T2"), "\(so1)")
        #expect(try await t.id.store.transfer(voucher: "rb2", id: "T2")?.state == .done)
        b = try await t.books("rb2")
        #expect(b.sg.limit == 400 && b.id.limit == 600, "given once: \(b)")

        // Killed after step 1 again, finished by --resume (no arguments to remember); a second --resume does nothing.
        let (k3, o3) = try await t.ctl(["rebalance", "rb2", "--from", "sg", "--to", "id", "--amount", "50"], failpoint: "after-take")
        #expect(k3 == 128 + SIGKILL, "\(o3)")
        (ast, report) = try await Self.audit(t, "rb2")
        #expect(ast == 0 && Self.inFlight(report) == 50, "\(report)")
        let (s2, so2) = try await t.ctl(["rebalance", "rb2", "--resume"])
        #expect(s2 == 0 && so2.contains("left taken: finishing"), "\(so2)")
        let settled = try await t.snapshot("rb2")
        let (s3, so3) = try await t.ctl(["rebalance", "rb2", "--resume"])
        #expect(s3 == 0 && so3.contains("nothing to finish"), "\(so3)")
        #expect(try await t.snapshot("rb2") == settled)
        b = try await t.books("rb2")
        #expect(b.sg.limit == 350 && b.id.limit == 650 && b.sg.limit + b.id.limit == 1000, "\(b)")

        // The sidecar sells the rest of id: exactly its allocation.
        let rest = try await Self.sell(qid, "rb2", prefix: "z", attempts: 700)
        #expect(10 + rest.ok == 650, "\(rest)")
        #expect(try await qid.stop() == 0)
        (ast, report) = try await Self.audit(t, "rb2")
        #expect(ast == 0 && report["balanced"] as? Bool == true && Self.inFlight(report) == 0, "\(report)")
        #expect(try await t.id.books("rb2").closedOutstanding == 650)
    }

    @Test func badRebalancesGetClearErrorsAndChangeNothing() async throws {
        let t = try await TwoRegions()
        let (cst, cout) = try await t.ctl(["voucher", "create", "rb3", "--limit", "1000", "--region", "sg=600", "--region", "id=400"])
        #expect(cst == 0, "\(cout)")
        let before = try await t.snapshot("rb3")
        let cases: [([String], String)] = [
            (["--from", "sg", "--to", "id", "--amount", "601"], "region sg has 600 unleased tokens"),
            (["--from", "sg", "--to", "xx", "--amount", "10"], "--to xx: unknown region"),
            (["--from", "xx", "--to", "id", "--amount", "10"], "--from xx: unknown region"),
            (["--from", "sg", "--to", "sg", "--amount", "10"], "both 'sg'"),
            (["--from", "sg", "--to", "id", "--amount", "0"], "--amount must be > 0"),
            (["--from", "sg", "--to", "id", "--amount=-5"], "--amount must be > 0"),
            (["--from", "sg", "--to", "id"], "give --from REGION --to REGION --amount N"),
            (["--from", "sg", "--to", "id", "--amount", "10", "--transfer-id", "bad id"], "invalid --transfer-id"),
        ]
        for (args, message) in cases {
            let (st, out) = try await t.ctl(["rebalance", "rb3"] + args)
            #expect(st != 0 && out.contains(message), "\(args): \(out)")
            #expect(try await t.snapshot("rb3") == before, "\(args) changed nothing")
        }
        // A transfer id reused with other arguments is refused too.
        let (ok, okOut) = try await t.ctl(["rebalance", "rb3", "--from", "sg", "--to", "id", "--amount", "10", "--transfer-id", "X"])
        #expect(ok == 0, "\(okOut)")
        let after = try await t.snapshot("rb3")
        let (st, out) = try await t.ctl(["rebalance", "rb3", "--from", "sg", "--to", "id", "--amount", "20", "--transfer-id", "X"])
        #expect(st != 0 && out.contains("transfer X exists in sg as 10 to id"), "\(out)")
        #expect(try await t.snapshot("rb3") == after)
        let (nst, nout) = try await t.ctl(["rebalance", "nope", "--from", "sg", "--to", "id", "--amount", "1"])
        #expect(nst != 0 && nout.contains("no voucher 'nope' in region sg"), "\(nout)")
    }
}
