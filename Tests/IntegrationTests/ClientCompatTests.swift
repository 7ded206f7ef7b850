import Foundation
import NIOCore
import QuotaClient
import QuotaHarness
import QuotaRESP
import Testing

/// Where `scripts/install-deps.sh` puts the real Redis clients (`.build/clients/…`).
enum Clients {
    static let root: String = {
        var url = URL(fileURLWithPath: #filePath)
        for _ in 0..<3 { url.deleteLastPathComponent() }
        return url.path
    }()
    static func path(_ rel: String) -> String { root + "/" + rel }

    /// Run `exe args` with `env`; returns (exit status, output).
    static func run(_ exe: String, _ args: [String], env: [String: String] = [:], timeout: Duration = .seconds(60))
        async throws -> (Int32, String)
    {
        let dir = TempDir()
        let p = try ChildProcess(exe, args, log: dir.file("out"), environment: env)
        let st = try await p.wait(timeout: timeout)
        return (st, p.output)
    }

    static func python(_ lib: String) throws -> [String: String] {
        let dir = path(".build/clients/\(lib)")
        guard FileManager.default.fileExists(atPath: dir + "/redis") else {
            throw TestError.failed("\(dir) is missing: run scripts/install-deps.sh (it installs the real clients)")
        }
        return ["PYTHONPATH": dir]
    }

    static let node = ["NODE_PATH": "/usr/share/nodejs"]
}

@Suite("Real Redis clients, examples and connection setup", .serialized, .timeLimit(.minutes(5)))
struct ClientCompatTests {
    /// A sidecar with a voucher that has stock (`v1`) and one sold out from the start (`empty`).
    func sidecar(extraYAML: String = "", args: [String] = []) async throws -> (RedisServer, Quotad) {
        let redis = try await RedisServer()
        let dir = redis.dir  // lives as long as the RedisServer: the sidecar's socket and journal are under it
        _ = try await redis.store.createVoucher(id: "v1", limit: 1_000_000, perUser: 0, totalLimit: 1_000_000, region: "sg")
        _ = try await redis.store.createVoucher(id: "empty", limit: 0, perUser: 0, totalLimit: 0, region: "sg")
        let q = try await Quotad(redis: redis, dir: dir, host: "host-a", extraYAML: extraYAML, args: args, durability: "journal")
        return (redis, q)
    }

    @Test(arguments: ["redis-py-8", "redis-py-8-hiredis", "redis-py-5"])
    func redisPyWorksWithItsDefaults(_ lib: String) async throws {
        let (redis, q) = try await sidecar()
        let (st, out) = try await Clients.run("/usr/bin/env", ["python3", Clients.path("scripts/clients/compat.py"), q.socket, "v1", "empty"],
                                              env: try Clients.python(lib))
        #expect(st == 0, "\(out)")
        #expect(out.contains("all checks passed"), "\(out)")
        #expect(try await q.stop() == 0)
        withExtendedLifetime(redis) {}
    }

    @Test func rubyRedisWorksWithItsDefaults() async throws {
        let (redis, q) = try await sidecar()
        let (st, out) = try await Clients.run("/usr/bin/ruby", [Clients.path("scripts/clients/compat.rb"), q.socket, "v1", "empty"])
        #expect(st == 0 && out.contains("all checks passed"), "\(out)")
        #expect(try await q.stop() == 0)
        withExtendedLifetime(redis) {}
    }

    @Test func nodeRedisWorksWithItsDefaults() async throws {
        let (redis, q) = try await sidecar()
        let (st, out) = try await Clients.run("/usr/bin/node", [Clients.path("scripts/clients/compat.js"), q.socket, "v1", "empty"],
                                              env: Clients.node)
        #expect(st == 0 && out.contains("all checks passed"), "\(out)")
        #expect(try await q.stop() == 0)
        withExtendedLifetime(redis) {}
    }

    @Test func theExamplesRunAsWritten() async throws {
        let (redis, q) = try await sidecar()
        let py = try Clients.python("redis-py-8")
        let runs: [(String, [String], [String: String])] = [
            ("/usr/bin/env", ["python3", Clients.path("examples/claim.py")], py),
            ("/bin/bash", [Clients.path("examples/claim.sh")], [:]),
            ("/usr/bin/ruby", [Clients.path("examples/claim.rb")], [:]),
            ("/usr/bin/node", [Clients.path("examples/claim.js")], Clients.node),
        ]
        for (exe, script, env) in runs {
            let (st, out) = try await Clients.run(exe, script + [q.socket, "v1", "example-user"], env: env)
            #expect(st == 0 && out.contains("claimed: sg.host-a."), "\(script.last!): \(out)")
            let (st2, out2) = try await Clients.run(exe, script + [q.socket, "empty", "example-user"], env: env)
            #expect(st2 == 1 && out2.contains("refused: SOLDOUT"), "\(script.last!): \(out2)")
        }
        #expect(try await q.stop() == 0)
        withExtendedLifetime(redis) {}
    }

    @Test func redisCliToolsWork() async throws {
        let (redis, q) = try await sidecar()
        let dir = TempDir()
        let input = dir.file("cmds")
        try "CLAIM v1 pipe-1 REQ p1\r\nCLAIM v1 pipe-2 REQ p2\r\n".write(toFile: input, atomically: true, encoding: .utf8)
        let (st, out) = try await Clients.run("/bin/sh", ["-c", "redis-cli -s \(q.socket) --pipe < \(input)"], timeout: .seconds(10))
        #expect(st == 0 && out.contains("errors: 0, replies: 2"), "redis-cli --pipe: \(out)")
        let (st2, out2) = try await Clients.run("/usr/bin/redis-cli", ["-s", q.socket, "--scan"], timeout: .seconds(10))
        #expect(st2 == 0, "redis-cli --scan: \(out2)")
        let (st3, out3) = try await Clients.run("/usr/bin/redis-cli", ["-s", q.socket, "--bigkeys"], timeout: .seconds(10))
        #expect(st3 == 0 && out3.contains("0 strings"), "redis-cli --bigkeys: \(out3)")
        let info = try await q.info()
        for k in ["used_memory", "blocked_clients", "total_commands_processed", "connected_clients", "total_connections_received", "db0"] {
            #expect(info[k] != nil, "INFO \(k) (redis-cli --stat reads it)")
        }
        #expect(try await q.stop() == 0)
        withExtendedLifetime(redis) {}
    }

    @Test func nothingQueuedInAFailedTransactionIsExecuted() async throws {
        let (redis, q) = try await sidecar()
        let c = try await RESPClient.connect(q.socket)
        defer { c.close() }
        let r = try await c.pipeline([["MULTI"], ["CLAIM", "v1", "u1"], ["CLAIM", "v1", "u2"], ["NOSUCH"], ["EXEC"]])
        #expect(r[0] == .simpleString("OK") && r[1] == .simpleString("QUEUED") && r[2] == .simpleString("QUEUED"))
        #expect(r[3].errorCode == "ERR")
        #expect(r[4].errorCode == "EXECABORT", "\(r[4])")
        let d = try await c.pipeline([["MULTI"], ["CLAIM", "v1", "u3"], ["DISCARD"]])
        #expect(d[2] == .simpleString("OK"))
        #expect(try await q.stat("claims_ok") == 0, "no queued claim ran")
        let ok = try await c.pipeline([["MULTI"], ["CLAIM", "v1", "u4"], ["AVAIL", "v1"], ["CLAIM", "empty", "u5"], ["EXEC"]])
        guard case .array(let items?) = ok[4], items.count == 3 else { Issue.record("EXEC: \(ok[4])"); return }
        #expect(items[0].string?.hasPrefix("sg.host-a.") == true && items[2].errorCode == "SOLDOUT", "\(items)")
        #expect(try await c.send("EXEC").errorMessage == "ERR EXEC without MULTI")
        #expect(try await q.stat("claims_ok") == 1)
        #expect(try await q.stop() == 0)
        #expect(try await redis.audit("v1", journals: [(q.host, q.journalDir)], netClaimed: 1).isEmpty)
    }

    @Test func helloAuthSelectAndClientSetupCommandsAnswerLikeRedis() async throws {
        let (redis, q) = try await sidecar(args: ["--set", "socket.password=s3cret"])
        let c = try await RESPClient.connect(q.socket)
        defer { c.close() }
        #expect(try await c.send("CLAIM", "v1", "u").errorMessage == "NOAUTH Authentication required.")
        #expect(try await c.send("AUTH", "wrong").errorCode == "WRONGPASS")
        #expect(try await c.send("AUTH", "default", "s3cret") == .simpleString("OK"))
        guard case .array(let hello?) = try await c.send("HELLO", "2", "SETNAME", "app-1") else { Issue.record("HELLO"); return }
        #expect(hello.count == 14 && hello[1].string == "quotad")
        #expect(try await c.send("CLIENT", "GETNAME").string == "app-1")
        #expect(try await c.send("SELECT", "0") == .simpleString("OK"))
        #expect(try await c.send("SELECT", "1").errorMessage?.contains("DB index is out of range") == true)
        #expect(try await c.send("CLIENT", "SETINFO", "LIB-NAME", "x") == .simpleString("OK"))
        #expect(try await c.send("ECHO", "hi").string == "hi")
        #expect(try await c.send("HELLO", "4").errorCode == "NOPROTO")
        #expect(try await c.send("CLAIM", "v1", "u").errorCode == nil)
        #expect(try await q.stop() == 0)
        withExtendedLifetime(redis) {}
    }

    @Test func clientListShowsEachConnectionsUndecodedBytesAndCounts() async throws {
        let (redis, q) = try await sidecar()
        let a = try await RESPClient.connect(q.socket)
        defer { a.close() }
        let b = try await RESPClient.connect(q.socket)
        defer { b.close() }
        #expect(try await a.send("CLIENT", "SETNAME", "app-a") == .simpleString("OK"))
        let aID = try #require(try await a.send("CLIENT", "ID").string)
        let bID = try #require(try await b.send("CLIENT", "ID").string)
        #expect(try await a.pipeline([["CLAIM", "v1", "u1"], ["CLAIM", "empty", "u2"]]).count == 2)
        // Half a command on `a`: read, not decoded, no reply.
        var half = ByteBuffer()
        half.writeString("*3\r\n$5\r\nCLAIM\r\n$2\r\nv1")
        let partial = half
        let pending = Task { try await a.sendRaw(partial, replies: 1) }
        func lineOfA() async throws -> String {
            guard case .bulkString(let text?) = try await b.send("CLIENT", "LIST") else { throw TestError.failed("CLIENT LIST") }
            let lines = String(buffer: text).split(separator: "\n")
            // (The harness's readiness probe may still be listed: lines are found by id.)
            #expect(lines.contains { $0.hasPrefix("id=\(bID) ") }, "\(lines)")
            return String(try #require(lines.first { $0.hasPrefix("id=\(aID) ") }))
        }
        try await eventually("the half command is read") { try await lineOfA().contains(" qbuf=\(partial.readableBytes) ") }
        let line = try await lineOfA()
        for field in ["name=app-a", "cmds=4", "replies=4", "oll=0", "open=0", "run=0", "obl=0", "resp=2", "admin=1", "state=-"] {
            #expect((line + " ").contains(" \(field) "), "\(field) in \(line)")
        }
        // The rest of it: decoded and answered.
        var rest = ByteBuffer()
        rest.writeString("\r\n$1\r\nu\r\n")
        _ = try await a.sendRaw(rest, replies: 0)
        #expect(try await pending.value.first?.errorCode == nil)
        let after = try await lineOfA()
        #expect(after.contains(" qbuf=0 ") && after.contains(" cmds=5 ") && after.contains(" replies=5 "), "\(after)")
        // `b`'s own line counts the commands it sent, the CLIENT LIST being answered among them.
        guard case .bulkString(let all?) = try await b.send("CLIENT", "LIST") else { throw TestError.failed("CLIENT LIST") }
        #expect(String(buffer: all).split(separator: "\n").contains { $0.hasPrefix("id=\(bID) ") && $0.contains(" oll=1 ") && $0.contains(" open=1 ") },
                "the asking connection waits for its own CLIENT LIST: \(String(buffer: all))")
        #expect(try await b.send("CLIENT", "LIST", "TYPE", "normal").errorCode == "ERR")
        #expect(try await q.stop() == 0)
        withExtendedLifetime(redis) {}
    }

    @Test func claimsWithoutReqAreRefusedWhenRequired() async throws {
        let (redis, q) = try await sidecar(extraYAML: "claims: { require_req: true }\n")
        let c = try await RESPClient.connect(q.socket)
        defer { c.close() }
        #expect(try await c.send("CLAIM", "v1", "u").errorMessage?.hasPrefix("ERR REQ is required") == true)
        #expect(try await c.send("CLAIM", "v1", "u", "REQ", "r1").errorCode == nil)
        #expect(try await q.stat("claims_ok") == 1)
        #expect(try await q.stop() == 0)
        withExtendedLifetime(redis) {}
    }

    @Test func aRefusedPeerGetsTheRefusalOnEveryCommand() async throws {
        let (redis, q) = try await sidecar(extraYAML: "limits: { max_connections: 1 }\n")
        // The harness's readiness probe may still hold the one slot for a moment: retry until admitted.
        var admitted: RESPClient?
        try await eventually("one peer admitted") {
            let c = try await RESPClient.connect(q.socket)
            if try await c.send("PING") == .simpleString("PONG") { admitted = c; return true }
            c.close(); return false
        }
        let first = try #require(admitted)
        defer { first.close() }
        let second = try await RESPClient.connect(q.socket)
        defer { second.close() }
        for cmd in [["CLIENT", "SETINFO", "LIB-NAME", "redis-py"], ["CLIENT", "SETINFO", "LIB-VER", "8"], ["CLAIM", "v1", "u"]] {
            #expect(try await second.send(cmd).errorCode == "BUSY", "\(cmd)")
        }
        #expect(try await first.send("CLAIM", "v1", "u").errorCode == nil, "the admitted peer keeps working")
        #expect(try await q.stop() == 0)
        withExtendedLifetime(redis) {}
    }
}
