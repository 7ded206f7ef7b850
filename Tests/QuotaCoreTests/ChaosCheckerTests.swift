import QuotaChaos
import QuotaCore
import Testing

@Suite("ChaosChecker on synthetic histories")
struct ChaosCheckerTests {
    let spec = [VoucherSpec(id: "v", limit: 2, perUser: 1, maxQty: 1)]

    func claim(_ id: String?, user: String, t0: Double, t1: Double?, _ outcome: Op.Outcome, req: String? = nil,
               host: Int = 0) -> Op {
        Op(kind: .claim, client: 0, host: host, voucher: "v", user: user, qty: 1, req: req, claimID: id, t0: t0, t1: t1,
           outcome: outcome)
    }

    func event(_ id: String, user: String, lease: String = "1", kind: StreamEvent.Kind = .claimed) -> StreamEvent {
        StreamEvent(kind: kind, claimID: id, voucher: "v", user: user, qty: 1, raw: Array("\(kind)\(id)".utf8),
                    shares: [(lease, 1)])
    }

    /// Books where lease 1 (closed) sold `sold` tokens of a limit of 2.
    func books(sold: Int) -> [String: VoucherAudit] {
        ["v": VoucherAudit(voucher: "v", limit: 2, pool: 2 - sold, leased: 2, returned: 2 - sold, restocked: 0,
                           leases: [.init(id: "1", host: "h", granted: 2, returned: 2 - sold, restocked: 0, state: "c")])]
    }

    func run(_ ops: [Op], _ stream: [StreamEvent], sold: Int, faults: [FaultEvent] = []) -> [Violation] {
        ChaosChecker.check(RunRecord(vouchers: spec, ops: ops, faults: faults, stream: stream, journals: [],
                                     books: books(sold: sold), journalProblems: [], replyBound: 5))
    }

    @Test func aCleanHistoryHasNoViolation() {
        let ops = [claim("a", user: "u1", t0: 0, t1: 0.1, .ok), claim("b", user: "u2", t0: 0.2, t1: 0.3, .ok),
                   claim(nil, user: "u3", t0: 0.4, t1: 0.5, .error("SOLDOUT"))]
        #expect(run(ops, [event("a", user: "u1"), event("b", user: "u2")], sold: 2) == [])
    }

    @Test func moreClaimsHeldAtOnceThanTheLimitIsAnOversell() {
        let ops = (0..<3).map { claim("c\($0)", user: "u\($0)", t0: Double($0), t1: Double($0) + 0.1, .ok) }
        let v = run(ops, (0..<3).map { event("c\($0)", user: "u\($0)") }, sold: 3)
        #expect(v.contains { $0.invariant == "never-oversell" })
    }

    @Test func anAnsweredClaimMissingFromKafkaIsNotDurable() {
        let v = run([claim("a", user: "u1", t0: 0, t1: 0.1, .ok)], [], sold: 1)
        #expect(v.contains { $0.invariant == "durable" })
    }

    @Test func aClaimOnKafkaThatNobodyAskedForIsUnexplainedUnlessARequestWentUnanswered() {
        let stream = [event("a", user: "u1"), event("x", user: "u9")]
        let ok = [claim("a", user: "u1", t0: 0, t1: 0.1, .ok)]
        #expect(run(ok, stream, sold: 2).contains { $0.invariant == "explained" })
        let lost = ok + [claim(nil, user: "u9", t0: 1, t1: nil, .noReply("disconnect"))]
        let faults = [FaultEvent(kind: .sidecarKill, target: 0, start: 1, end: 2)]
        #expect(!run(lost, stream, sold: 2, faults: faults).contains { $0.invariant == "explained" })
    }

    @Test func twoClaimIDsForOneRequestIDIsACaughtRetryDuplicate() {
        let ops = [claim("a", user: "u1", t0: 0, t1: 0.1, .ok, req: "r1"), claim("b", user: "u2", t0: 0.2, t1: 0.3, .ok, req: "r1")]
        #expect(run(ops, [event("a", user: "u1"), event("b", user: "u2")], sold: 2).contains { $0.invariant == "req-once" })
    }

    @Test func aUserOverThePerUserLimitOnTheStreamIsReported() {
        let ops = [claim("a", user: "u1", t0: 0, t1: 0.1, .ok), claim("b", user: "u1", t0: 0.2, t1: 0.3, .ok)]
        #expect(run(ops, [event("a", user: "u1"), event("b", user: "u1")], sold: 2).contains { $0.invariant == "per-user" })
    }

    @Test func anUnansweredRequestWithNoFaultOnItsSidecarIsAHang() {
        let ops = [claim(nil, user: "u1", t0: 0, t1: nil, .noReply("timeout"), host: 1)]
        #expect(run(ops, [], sold: 0).contains { $0.invariant == "bounded" })
        let other = [FaultEvent(kind: .sidecarKill, target: 0, start: 0, end: 1)]
        #expect(run(ops, [], sold: 0, faults: other).contains { $0.invariant == "bounded" }, "a fault elsewhere explains nothing")
        let here = [FaultEvent(kind: .sidecarStopPastExpiry, target: 1, start: 0, end: 4)]
        #expect(!run(ops, [], sold: 0, faults: here).contains { $0.invariant == "bounded" })
    }

    @Test func aClosedLeaseWhoseBooksDisagreeWithTheStreamFailsC2() {
        // Redis says lease 1 kept 1 token; the stream says it served 2.
        let ops = [claim("a", user: "u1", t0: 0, t1: 0.1, .ok), claim("b", user: "u2", t0: 0.2, t1: 0.3, .ok)]
        let v = run(ops, [event("a", user: "u1"), event("b", user: "u2")], sold: 1)
        #expect(v.contains { $0.detail.hasPrefix("C2") })
    }

    @Test func historyLinesRoundTrip() {
        let op = Op(kind: .unclaim, client: 3, host: 1, voucher: "v", user: "", qty: 0, req: nil, claimID: "sg.h.b.1",
                    t0: 1.25, t1: 1.5, outcome: .error("ERR"))
        #expect(Op(line: op.line) == op)
    }
}
