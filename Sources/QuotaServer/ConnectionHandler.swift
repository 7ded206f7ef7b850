import Glibc
import Metrics
import NIOCore
import QuotaCore
import QuotaRESP
import QuotaRedis

/// One client connection: decodes commands, dispatches them, and writes replies in
/// request order even when some wait for a lease. Replies of one read are batched
/// into one write and flushed once the read is done.
final class ConnectionHandler: ChannelInboundHandler {
    typealias InboundIn = RESPCommand
    typealias OutboundOut = ByteBuffer

    private let engine: SidecarEngine
    private let isAdmin: Bool
    private var out: ByteBuffer?
    /// Replies not yet written because an earlier one is still pending (nil = pending).
    private var queue = CircularBuffer<Reply?>()
    /// Sequence number of `queue.first`.
    private var headSeq = 0
    private var readPaused = false
    private var closing = false
    private var flushScheduled = false
    private let claimTimer: Metrics.Timer?

    /// Set for a peer refused at accept (`CODE message`): its first command gets this error, then close.
    private let refusal: String?

    init(engine: SidecarEngine, isAdmin: Bool, refusal: String? = nil) {
        self.engine = engine
        self.isAdmin = isAdmin
        self.refusal = refusal
        self.claimTimer = engine.claimTimer.withLockedValue { $0 }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !closing else { return }
        if let refusal {
            closing = true
            var b = context.channel.allocator.buffer(capacity: refusal.utf8.count + 3)
            b.writeString("-\(refusal)\r\n")
            context.writeAndFlush(wrapOutboundOut(b)).whenComplete { [channel = context.channel] _ in channel.close(promise: nil) }
            return
        }
        let cmd = unwrapInboundIn(data)
        guard !cmd.arguments.isEmpty else { return }
        switch dispatch(cmd, context: context) {
        case .now(let r):
            if queue.isEmpty {
                write(r, context: context)
            } else {
                queue.append(r)
            }
        case .later(let f):
            let seq = headSeq + queue.count
            queue.append(nil)
            f.assumeIsolated().whenComplete { [self] result in
                let reply: Reply
                switch result {
                case .success(let r): reply = r
                case .failure(let e): reply = .error(QuotaError(.unavailable, "internal: \(e)"))
                }
                self.fill(seq: seq, reply, context: context)
            }
            if queue.count >= engine.config.limits.maxPendingPerConnection && !readPaused {
                readPaused = true
                context.channel.setOption(ChannelOptions.autoRead, value: false).whenFailure { _ in }
            }
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        flush(context: context)
    }

    private func fill(seq: Int, _ r: Reply, context: ChannelHandlerContext) {
        let i = seq - headSeq
        guard i >= 0, i < queue.count else { return }
        queue[queue.index(queue.startIndex, offsetBy: i)] = r
        while let first = queue.first, let reply = first {
            queue.removeFirst()
            headSeq += 1
            write(reply, context: context)
        }
        scheduleFlush(context: context)
        if readPaused && queue.count < engine.config.limits.maxPendingPerConnection / 2 {
            readPaused = false
            context.channel.setOption(ChannelOptions.autoRead, value: true).whenFailure { _ in }
        }
    }

    private func write(_ r: Reply, context: ChannelHandlerContext) {
        if out == nil { out = context.channel.allocator.buffer(capacity: 512) }
        out!.writeReply(r)
    }

    /// Replies completed by other work (leases, journal syncs, user checks) arrive in bursts on the
    /// event loop: write them with one flush at the end of this loop tick, not one per reply.
    private func scheduleFlush(context: ChannelHandlerContext) {
        guard !flushScheduled else { return }
        flushScheduled = true
        context.eventLoop.assumeIsolated().execute { [self] in
            flushScheduled = false
            flush(context: context)
            if closing && queue.isEmpty { context.close(promise: nil) }
        }
    }

    private func flush(context: ChannelHandlerContext) {
        guard var buf = out, buf.readableBytes > 0 else { return }
        out = nil
        buf.reserveCapacity(0)
        context.writeAndFlush(wrapOutboundOut(buf), promise: nil)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if let e = error as? RESPProtocolError {
            engine.protocolErrors.add(1, ordering: .relaxed)
            closing = true
            if queue.isEmpty {
                write(.err("Protocol error: \(e.message)"), context: context)
                flush(context: context)
                context.close(promise: nil)
            } else {
                queue.append(.err("Protocol error: \(e.message)"))
            }
            return
        }
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        engine.connectionsCurrent.subtract(1, ordering: .relaxed)
        context.fireChannelInactive()
    }

    // MARK: - Dispatch

    private func dispatch(_ cmd: RESPCommand, context: ChannelHandlerContext) -> Outcome {
        let a = cmd.arguments
        let name = a[0]
        if name.equalsUppercased("CLAIM") {
            guard let timer = claimTimer else { return claim(a, loop: context.eventLoop) }
            let t0 = NIODeadline.now()
            let outcome = claim(a, loop: context.eventLoop)
            switch outcome {
            case .now: timer.recordNanoseconds((NIODeadline.now() - t0).nanoseconds)
            case .later(let f): f.whenComplete { _ in timer.recordNanoseconds((NIODeadline.now() - t0).nanoseconds) }
            }
            return outcome
        }
        if name.equalsUppercased("UNCLAIM") {
            guard a.count == 2 else { return arity("UNCLAIM") }
            guard a[1].readableBytes > 0, a[1].readableBytes <= 256 else { return syntax("claim id must be 1-256 bytes") }
            return engine.unclaim(String(buffer: a[1]), loop: context.eventLoop)
        }
        if name.equalsUppercased("AVAIL") {
            guard a.count == 2 else { return arity("AVAIL") }
            let v = String(buffer: a[1])
            guard QuotaStore.isValidVoucherID(v) else { return badVoucher(v) }
            return engine.request(.avail, voucher: v, loop: context.eventLoop)
        }
        if name.equalsUppercased("PING") {
            switch a.count {
            case 1: return .now(.value(.simpleString("PONG")))
            case 2: return .now(.value(.bulkString(a[1])))
            default: return arity("PING")
            }
        }
        if name.equalsUppercased("INFO") {
            guard a.count <= 2 else { return arity("INFO") }
            let text = engine.info(section: a.count == 2 ? String(buffer: a[1]) : nil)
            return .now(.value(.bulk(text)))
        }
        if name.equalsUppercased("DRAIN") {
            guard a.count == 1 else { return arity("DRAIN") }
            guard isAdmin else {
                engine.countRejection(.noperm)
                return .now(.error(QuotaError(.noperm, "DRAIN is for admin peers only (root, quotad's uid, socket.admin_uids)")))
            }
            let p = context.eventLoop.makePromise(of: Reply.self)
            let engine = self.engine
            Task {
                let left = await engine.drain()
                p.succeed(left.isEmpty ? .value(.ok) : .error(QuotaError(
                    .unavailable, "drained, but work is left (Redis did not take it): \(left.prefix(3).joined(separator: "; "))")))
            }
            return .later(p.futureResult)
        }
        if name.equalsUppercased("CONFIG") {
            // Enough for redis-benchmark and friends: CONFIG GET <key> answers [key, ""].
            guard a.count == 3, a[1].equalsUppercased("GET") else {
                return .now(.err("only CONFIG GET <parameter> is supported"))
            }
            return .now(.value(.array([.bulkString(a[2]), .bulk("")])))
        }
        if name.equalsUppercased("COMMAND") { return .now(.value(.array([]))) }
        if name.equalsUppercased("QUIT") {
            closing = true
            let p = context.eventLoop.makePromise(of: Reply.self)
            p.succeed(.value(.ok))
            return .later(p.futureResult)
        }
        engine.commandErrors.add(1, ordering: .relaxed)
        let shown = String(String(buffer: name).prefix(64))
        return .now(.err("unknown command '\(shown)'"))
    }

    private func arity(_ cmd: String) -> Outcome {
        engine.commandErrors.add(1, ordering: .relaxed)
        return .now(.err("wrong number of arguments for '\(cmd)' command"))
    }

    private func badVoucher(_ v: String) -> Outcome {
        engine.commandErrors.add(1, ordering: .relaxed)
        return .now(.err("invalid voucher id '\(v.prefix(64))': use 1-64 of A-Z a-z 0-9 _ . : -"))
    }

    /// `CLAIM voucher user [QTY n]`
    private func claim(_ a: [ByteBuffer], loop: any EventLoop) -> Outcome {
        guard a.count >= 3 else {
            return arity("CLAIM")
        }
        var qty = 1
        var req: String?
        var i = 3
        while i < a.count {
            if a[i].equalsUppercased("QTY") {
                guard i + 1 < a.count else { return syntax("QTY needs a value") }
                guard let n = a[i + 1].parsePositiveInt(), n >= 1, n <= engine.config.limits.maxQty else {
                    return syntax("QTY must be an integer from 1 to \(engine.config.limits.maxQty)")
                }
                qty = n
                i += 2
            } else if a[i].equalsUppercased("REQ") {
                guard i + 1 < a.count else { return syntax("REQ needs a request id") }
                guard a[i + 1].readableBytes >= 1, a[i + 1].readableBytes <= 128 else {
                    return syntax("REQ request id must be 1-128 bytes")
                }
                req = String(buffer: a[i + 1])
                i += 2
            } else {
                return syntax("unknown CLAIM option '\(String(buffer: a[i]).prefix(32))' (expected QTY n or REQ id)")
            }
        }
        let v = String(buffer: a[1])
        guard QuotaStore.isValidVoucherID(v) else { return badVoucher(v) }
        guard a[2].readableBytes > 0, a[2].readableBytes <= 256 else {
            return syntax("user id must be 1-256 bytes")
        }
        return engine.request(.claim(qty: qty, user: String(buffer: a[2]), req: req), voucher: v, loop: loop)
    }

    private func syntax(_ m: String) -> Outcome {
        engine.commandErrors.add(1, ordering: .relaxed)
        return .now(.err(m))
    }
}
