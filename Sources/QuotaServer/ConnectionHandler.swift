import Glibc
import Metrics
import NIOCore
import QuotaCore
import QuotaRESP
import QuotaRedis

/// One client connection: decodes commands, dispatches them, and writes replies in
/// request order even when some wait for a lease. Replies of one read are batched
/// into one write and flushed once the read is done.
///
/// Back-pressure: commands are decoded one at a time from the bytes read, and decoding (and reading)
/// stops while the peer has more than `limits.max_output_bytes` of replies it has not read (the
/// channel is not writable: its high water mark is that bound), or while
/// `limits.max_pending_per_connection` commands wait for their replies. Bytes already read stay
/// undecoded meanwhile (at most one read burst, `maxMessagesPerRead` reads). Reading resumes when the
/// peer has read half of it (the low water mark) and fewer than half the pending bound wait.
final class ConnectionHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let engine: SidecarEngine
    /// The engine's claim prefix, written before a ``Reply/claimNumber(seq:)``.
    private let claimPrefix: String
    private let isAdmin: Bool
    private let limits: RESPLimits
    private let maxPending: Int
    /// Replies are handed to the channel once this many bytes wait in `out`, so writability is known.
    private let flushChunk: Int
    private var out: ByteBuffer?
    /// The runtime of this connection's last claimed voucher (``SidecarEngine/request(_:voucher:loop:cache:)``).
    private var lastRuntime = SidecarEngine.RuntimeCache()
    /// The last valid voucher id a `CLAIM` named (``voucherID(_:)``).
    private var lastVoucherID: String?
    /// Consecutive `CLAIM`s of one voucher decoded in this turn, not yet handled: handled together
    /// (``flushClaims(context:)``) before any other command, and at the end of the turn.
    private var runVoucher: String?
    private var runRequests: [VoucherMachine.Request] = []
    /// When each claim of the run was read (only with a claim timer).
    private var runStarted: [NIODeadline] = []
    static let maxClaimRun = 64
    /// The arguments of the command being decoded: one array for all of them (no allocation per command).
    private var arguments: [ByteBuffer] = []
    /// The command's arguments as places in the read buffer: a `CLAIM` is read there, without slices.
    private var spans: [RESPSpan] = []
    /// The channel's writability as its last change told (NIO tells every change, on this loop, as it happens):
    /// `shouldPause` runs before every command, and `context.channel.isWritable` there retained and released
    /// the channel each time (issue 13).
    private var writable = true
    /// Bytes read and not yet decoded (a partial frame, or everything read while paused).
    private var input: ByteBuffer?
    private var processing = false
    /// Decoding continues in a later event-loop turn (``yieldTurn(context:)``).
    private var yielded = false
    /// Reply bytes written during the current ``process(context:)`` call.
    private var turnBytes = 0
    /// Replies not yet written because an earlier one is still pending (nil = pending).
    private var queue = CircularBuffer<Reply?>()
    /// Sequence number of `queue.first` (every reply takes one, in order, also one written at once).
    private var headSeq = 0
    /// Receives the replies of ``Outcome/pending`` claims (made at the first claim; detached at close).
    private var replyBox: ReplyBox?
    /// When each ``Outcome/pending`` claim started, by its place (only with the claim latency histogram).
    private var pendingStarts: [Int: NIODeadline] = [:]
    /// Reading stopped: the peer has not read `limits.max_output_bytes` of replies.
    private var outputPaused = false
    /// Reading stopped: `limits.max_pending_per_connection` commands wait for their replies.
    private var pendingPaused = false
    /// Counted in the engine's `connections_paused`.
    private var countedPaused = false
    /// The channel asked for a read while paused: it is issued on resume.
    private var readHeld = false
    /// Bytes queued in the channel the peer has not taken, as last reported to the engine.
    private var reportedPending = 0
    /// An empty write is queued to learn when the queued bytes are gone (only while some are queued).
    private var probing = false
    private var inactive = false
    private var closing = false
    private var flushScheduled = false
    private let claimTimer: Metrics.Timer?
    /// For `CLIENT LIST`: when the connection was made, commands decoded, replies written, bytes handed
    /// to the channel.
    private let created = NIODeadline.now()
    private var commandsDecoded = 0
    private var repliesWritten = 0
    private var bytesFlushed = 0
    /// When replies were last handed to the channel (`CLIENT LIST`'s `flush_age_ms`: whether a reply a client waits
    /// for went out long ago or only now).
    private var lastFlush: NIODeadline?

    /// Set for a peer refused at accept (`CODE message`): every command it sends gets this error until it
    /// closes (or the server closes it after a while).
    private let refusal: String?

    // Client-compatibility state (HELLO, AUTH, CLIENT SETNAME, MULTI).
    /// The RESP version the client asked for with `HELLO` (2 or 3): the one commands run in.
    private var proto = 2
    /// The RESP version replies are written in. It lags ``proto`` while replies to commands that ran before a `HELLO`
    /// that changed it still wait in the queue (behind a claim waiting for its journal record): each reply is
    /// encoded in the protocol its command ran in, as Redis does, so a RESP2 client that pipelines `…; HELLO 3` can
    /// read every reply before HELLO's in RESP2 (helper-58).
    private var writeProto = 2
    /// Changes of ``proto`` the writer has not reached: from reply place `seq` on, `proto`.
    private var protoChanges: [(seq: Int, proto: Int)] = []
    private var authenticated: Bool
    private var clientName: String?
    private let clientID: Int
    /// Commands queued since `MULTI` (nil: no transaction open).
    private var transaction: [RESPCommand]?
    /// A command could not be queued: `EXEC` discards the transaction.
    private var transactionFailed = false

    init(engine: SidecarEngine, isAdmin: Bool, limits: RESPLimits, refusal: String? = nil) {
        self.engine = engine
        self.claimPrefix = engine.claimPrefix
        self.isAdmin = isAdmin
        self.limits = limits
        self.refusal = refusal
        self.maxPending = engine.config.limits.maxPendingPerConnection
        self.flushChunk = max(1024, min(64 << 10, engine.config.limits.maxOutputBytes / 4))
        self.claimTimer = engine.claimTimer.withLockedValue { $0 }
        self.authenticated = engine.config.socket.password == nil
        self.clientID = engine.nextClientID()
    }

    func handlerAdded(context: ChannelHandlerContext) {
        let entry = SidecarEngine.ClientEntry(
            loop: context.eventLoop, describe: NIOLoopBound({ [self] in describe(context: context) }, eventLoop: context.eventLoop))
        engine.clients.withLockedValue { $0[clientID] = entry }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        _ = engine.clients.withLockedValue { $0.removeValue(forKey: clientID) }
    }

    /// This connection's line of `CLIENT LIST`: Redis's fields where they mean the same (`qbuf` bytes read
    /// and not decoded, `obl` reply bytes not yet handed to the channel, `oll` replies waiting behind an
    /// unanswered one, `omem` bytes the peer has not read), then quotad's own (`open` places waiting for a
    /// reply, `run` claims decoded and not yet decided, `cmds`/`replies` counted since the connection was
    /// made, `flushed` bytes handed to the channel, `flush_age_ms` since the last of them (-1: none), `state` the
    /// reasons decoding or reading is stopped).
    private func describe(context: ChannelHandlerContext) -> String {
        let open = queue.reduce(0) { $0 + ($1 == nil ? 1 : 0) }
        let omem = (try? context.channel.syncOptions?.getOption(ChannelOptions.bufferedWritableBytes)) ?? 0
        var state: [String] = []
        if processing { state.append("processing") }
        if yielded { state.append("yielded") }
        if readHeld { state.append("read-held") }
        if outputPaused { state.append("output-paused") }
        if pendingPaused { state.append("pending-paused") }
        if flushScheduled { state.append("flush-scheduled") }
        if closing { state.append("closing") }
        if inactive { state.append("inactive") }
        if transaction != nil { state.append("multi") }
        let now = NIODeadline.now()
        let age = (now - created).nanoseconds / 1_000_000_000
        let flushAge = lastFlush.map { (now - $0).nanoseconds / 1_000_000 } ?? -1
        return "id=\(clientID) name=\(clientName ?? "") age=\(age) db=0 multi=\(transaction?.count ?? -1) "
            + "qbuf=\(input?.readableBytes ?? 0) obl=\(out?.readableBytes ?? 0) oll=\(queue.count) omem=\(omem) "
            + "resp=\(proto) open=\(open) run=\(runRequests.count) cmds=\(commandsDecoded) replies=\(repliesWritten) "
            + "flushed=\(bytesFlushed) flush_age_ms=\(flushAge) admin=\(isAdmin ? 1 : 0) state=\(state.isEmpty ? "-" : state.joined(separator: ","))"
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !closing else { return }
        var bytes = unwrapInboundIn(data)
        if input == nil {
            input = bytes
        } else {
            input!.writeBuffer(&bytes)
        }
        process(context: context)
    }

    /// Decode and run the commands read, one at a time, until the input runs out or back-pressure stops it.
    private func process(context: ChannelHandlerContext) {
        guard !processing else { return }
        processing = true
        defer {
            flushClaims(context: context)
            // (The slices would keep the read buffer alive while the connection idles.)
            arguments.removeAll(keepingCapacity: true)
            processing = false
        }
        var commands = 0
        turnBytes = 0
        while !closing, !inactive, input != nil {
            // (A flush in `shouldPause` that finds the peer gone closes the channel at once: `inactive`.)
            if shouldPause(context: context) || inactive { break }
            // Fairness: one connection's burst does not hold the event loop (and the other connections on it)
            // for long; the rest is decoded in a later turn.
            if commands >= Self.commandsPerTurn || turnBytes >= Self.bytesPerTurn {
                yieldTurn(context: context)
                break
            }
            commands += 1
            // Taken out of `input` and put back (moved, both ways), what is left of it before the command runs.
            // (`var buf = input`, `input = nil` and `input = buf` were copies of the buffer: a retain and a release
            // of its storage each, per command; issue 13.)
            var buf = input.take()!
            let parsed: Bool
            do {
                parsed = try RESPCommandDecoder.parse(&buf, limits: limits, spans: &spans)
            } catch let e as RESPProtocolError {
                protocolError(e, context: context)
                return
            } catch {
                context.close(promise: nil)
                return
            }
            guard parsed else {
                if buf.readableBytes > 0 {
                    if buf.readerIndex >= 16 << 10 { buf.discardReadBytes() }
                    input = consume buf
                }
                break
            }
            commandsDecoded &+= 1
            // A `CLAIM` read where it was decoded (`buf` still holds its bytes: they are discarded only when no
            // command was parsed); any other command as slices.
            if claimsServed, !spans.isEmpty,
               buf.withVeryUnsafeBytes({ RESPBytes.equalsUppercased(UnsafeRawBufferPointer(rebasing: $0[spans[0].start..<spans[0].start + spans[0].count]), "CLAIM") })
            {
                let t0: NIODeadline? = claimTimer == nil ? nil : .now()
                let request = buf.withVeryUnsafeBytes { storage in
                    spans.withUnsafeBufferPointer { claimRequest(RESPSpannedArguments(storage: storage, spans: $0)) }
                }
                if buf.readableBytes > 0 { input = consume buf }
                addToRun(request, started: t0, context: context)
                continue
            }
            arguments.removeAll(keepingCapacity: true)
            if let first = spans.first {
                // (Slices are made with the reader index moved back to the command: below it, `getSlice` gives nil.)
                var whole = buf
                whole.moveReaderIndex(to: first.start)
                for s in spans { arguments.append(whole.getSlice(at: s.start, length: s.count)!) }
            }
            if buf.readableBytes > 0 { input = consume buf }
            command(RESPCommand(arguments: arguments), context: context)
        }
    }

    /// Whether a `CLAIM` goes to its voucher now (else ``command(_:context:)`` answers it: a refusal, a
    /// transaction, no authentication). Checked only in ``process(context:)``.
    private var claimsServed: Bool { refusal == nil && transaction == nil && authenticated }

    /// At most this many commands, or this many reply bytes, are handled per connection per event-loop turn.
    static let commandsPerTurn = 256
    static let bytesPerTurn = 64 << 10

    /// Continue decoding in a later turn of the event loop (reads are held until then).
    private func yieldTurn(context: ChannelHandlerContext) {
        guard !yielded else { return }
        yielded = true
        flushClaims(context: context)
        flushReplies(context: context)
        context.eventLoop.assumeIsolated().execute { [self] in
            yielded = false
            guard !inactive else { return }
            process(context: context)
            scheduleFlush(context: context)
            if readHeld && !outputPaused && !pendingPaused && !yielded {
                readHeld = false
                context.read()
            }
        }
    }

    private func command(_ cmd: RESPCommand, context: ChannelHandlerContext) {
        guard !cmd.arguments.isEmpty else { return }
        // (A `CLAIM` that goes to its voucher now never comes here: ``process(context:)`` reads it in place.)
        flushClaims(context: context)
        if let refusal {
            // Told on every command, so a client that swallows errors of its setup commands still sees it.
            enqueue(.now(.value(.error(refusal))), context: context)
            return
        }
        let outcome: Outcome
        if transaction != nil, !Self.controlsTransaction(cmd.arguments[0]) {
            outcome = queueInTransaction(cmd)
        } else {
            outcome = dispatch(cmd, context: context)
        }
        enqueue(outcome, context: context)
    }

    /// A checked `CLAIM` joins the run of claims (decided together at ``flushClaims(context:)``); a refused one
    /// is answered in its place.
    private func addToRun(_ request: consuming ClaimRequest, started t0: NIODeadline?,
                          context: ChannelHandlerContext) {
        switch consume request {
        case .claim(let voucher, let req):
            if let v = runVoucher, v != voucher { flushClaims(context: context) }
            runVoucher = voucher
            runRequests.append(req)
            if let t0 { runStarted.append(t0) }
            // The run counts toward the connection's pending bound (``shouldPause(context:)``).
            if runRequests.count >= Self.maxClaimRun || queue.count + runRequests.count >= maxPending {
                flushClaims(context: context)
            }
        case .refused(let outcome):
            flushClaims(context: context)
            if let t0, let timer = claimTimer { timer.recordNanoseconds((NIODeadline.now() - t0).nanoseconds) }
            enqueue(outcome, context: context)
        }
    }

    private func protocolError(_ e: RESPProtocolError, context: ChannelHandlerContext) {
        flushClaims(context: context)
        engine.protocolErrors.add(1, ordering: .relaxed)
        closing = true
        input = nil
        if queue.isEmpty {
            write(.err("Protocol error: \(e.message)"), context: context)
            headSeq += 1   // (every reply takes a number; the connection closes now anyway)
            flushReplies(context: context)
            context.close(promise: nil)
        } else {
            queue.append(.err("Protocol error: \(e.message)"))
        }
    }

    private func enqueue(_ outcome: Outcome, context: ChannelHandlerContext) {
        switch outcome {
        case .now(let r):
            if queue.isEmpty {
                write(r, context: context)
                headSeq += 1   // every reply takes a number: a run's places are known before it is decided
            } else {
                queue.append(r)
            }
        case .pending:
            // Its reply comes to `replyBox` (``fill(_:context:)``) at this place.
            queue.append(nil)
            engine.replyPlacesOpen.add(1, ordering: .relaxed)
        case .later(let f):
            let seq = headSeq + queue.count
            queue.append(nil)
            engine.replyPlacesOpen.add(1, ordering: .relaxed)
            f.assumeIsolated().whenComplete { [self] result in
                let reply: Reply
                switch result {
                case .success(let r): reply = r
                case .failure(let e): reply = .error(QuotaError(.unavailable, "internal: \(e)"))
                }
                self.fill(seq: seq, reply, context: context)
            }
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        flushReplies(context: context)
    }

    private func fill(seq: Int, _ r: Reply, context: ChannelHandlerContext) {
        fill([(seq: seq, reply: r)], context: context)
    }

    /// Replies of ``Outcome/pending`` requests, handed over by ``ReplyBox/deliver(_:)`` (on this loop, in a
    /// task of their own). Flushed once at the end of the loop's tick, like the promises' replies: in
    /// `durability: kafka` acknowledgements come one claim at a time, and a flush per delivery was a write
    /// per claim.
    func fill<Items: Sequence>(_ items: Items, context: ChannelHandlerContext) where Items.Element == (seq: Int, reply: Reply) {
        let now: NIODeadline? = claimTimer == nil || pendingStarts.isEmpty ? nil : .now()
        for (seq, r) in items {
            place(seq: seq, r)
            if let now, let t0 = pendingStarts.removeValue(forKey: seq) {
                claimTimer?.recordNanoseconds((now - t0).nanoseconds)
            }
        }
        drain(context: context)
        scheduleFlush(context: context)
        if pendingPaused { resume(context: context) }
    }

    private func place(seq: Int, _ r: Reply) {
        let i = seq - headSeq
        assert(i >= 0 && i < queue.count && queue[queue.index(queue.startIndex, offsetBy: i)] == nil,
               "a reply for place \(seq), which is not waiting (head \(headSeq), \(queue.count) queued)")
        guard i >= 0, i < queue.count else { return }
        if !inactive { engine.replyPlacesOpen.subtract(1, ordering: .relaxed) }   // (closed ones: at channelInactive)
        queue[queue.index(queue.startIndex, offsetBy: i)] = r
    }

    /// Write the replies at the head of the queue that are known.
    private func drain(context: ChannelHandlerContext) {
        while let first = queue.first, let reply = first {
            queue.removeFirst()
            write(reply, context: context)   // (at place `headSeq`)
            headSeq += 1
        }
    }

    // MARK: - Back-pressure

    /// Whether to stop decoding now: hands big batches of replies to the channel first, so that its
    /// writability says how much the peer has not read.
    private func shouldPause(context: ChannelHandlerContext) -> Bool {
        if let o = out, o.readableBytes >= flushChunk { flushReplies(context: context) }
        if !outputPaused && !writable { outputPaused = true }
        if !pendingPaused && queue.count + runRequests.count >= maxPending { pendingPaused = true }
        guard outputPaused || pendingPaused else { return false }
        if !countedPaused {
            countedPaused = true
            engine.connectionsPaused.add(1, ordering: .relaxed)
            engine.backpressurePauses.add(1, ordering: .relaxed)
        }
        return true
    }

    /// Resume decoding (and reading) once the peer has read enough and enough replies went out.
    private func resume(context: ChannelHandlerContext) {
        guard !inactive else { return }
        if outputPaused && context.channel.isWritable { outputPaused = false }
        if pendingPaused && queue.count <= maxPending / 2 { pendingPaused = false }
        guard !outputPaused && !pendingPaused else { return }
        if countedPaused {
            countedPaused = false
            engine.connectionsPaused.subtract(1, ordering: .relaxed)
        }
        process(context: context)
        scheduleFlush(context: context)
        if readHeld && !outputPaused && !pendingPaused && !yielded {
            readHeld = false
            context.read()
        }
    }

    /// Reads the channel asks for are held while paused (or while decoding is to continue in a later turn).
    func read(context: ChannelHandlerContext) {
        if outputPaused || pendingPaused || yielded {
            readHeld = true
        } else {
            context.read()
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        writable = context.channel.isWritable
        reportPending(context: context)
        if context.channel.isWritable && outputPaused { resume(context: context) }
        context.fireChannelWritabilityChanged()
    }

    /// Tell the engine how many reply bytes wait in the channel for the peer; while some do, an empty
    /// write (completed when every byte before it is written) reports again when they are gone.
    private func reportPending(context: ChannelHandlerContext) {
        guard !inactive else { return }
        let n = (try? context.channel.syncOptions?.getOption(ChannelOptions.bufferedWritableBytes)) ?? 0
        if n != reportedPending {
            engine.outputBytesPending.add(n - reportedPending, ordering: .relaxed)
            reportedPending = n
        }
        guard n > 0, !probing else { return }
        probing = true
        let p = context.eventLoop.makePromise(of: Void.self)
        context.writeAndFlush(wrapOutboundOut(context.channel.allocator.buffer(capacity: 0)), promise: p)
        p.futureResult.assumeIsolated().whenComplete { [self] _ in
            probing = false
            reportPending(context: context)
        }
    }

    /// Write the reply of place `headSeq`.
    private func write(_ r: Reply, context: ChannelHandlerContext) {
        while let c = protoChanges.first, c.seq <= headSeq {
            writeProto = c.proto
            protoChanges.removeFirst()
        }
        if out == nil { out = context.channel.allocator.buffer(capacity: 512) }
        let before = out!.writerIndex
        out!.writeReply(r, proto: writeProto, claimPrefix: claimPrefix)
        turnBytes &+= out!.writerIndex - before
        repliesWritten &+= 1
    }

    /// Replies completed by other work (leases, journal syncs, user checks) arrive in bursts on the
    /// event loop: write them with one flush at the end of this loop tick, not one per reply.
    private func scheduleFlush(context: ChannelHandlerContext) {
        guard !flushScheduled else { return }
        flushScheduled = true
        context.eventLoop.assumeIsolated().execute { [self] in
            flushScheduled = false
            flushReplies(context: context)
            if closing && queue.isEmpty { context.close(promise: nil) }
        }
    }

    private func flushReplies(context: ChannelHandlerContext) {
        guard var buf = out, buf.readableBytes > 0 else { return }
        out = nil
        bytesFlushed &+= buf.readableBytes
        lastFlush = .now()
        buf.reserveCapacity(0)
        context.writeAndFlush(wrapOutboundOut(buf), promise: nil)
        reportPending(context: context)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        inactive = true
        input = nil
        replyBox?.detach()
        replyBox = nil
        pendingStarts.removeAll()
        engine.connectionsCurrent.subtract(1, ordering: .relaxed)
        let open = queue.reduce(0) { $0 + ($1 == nil ? 1 : 0) }
        if open > 0 { engine.replyPlacesOpen.subtract(open, ordering: .relaxed) }
        if countedPaused {
            countedPaused = false
            engine.connectionsPaused.subtract(1, ordering: .relaxed)
        }
        if reportedPending != 0 {
            engine.outputBytesPending.subtract(reportedPending, ordering: .relaxed)
            reportedPending = 0
        }
        context.fireChannelInactive()
    }

    // MARK: - Dispatch

    private func dispatch(_ cmd: RESPCommand, context: ChannelHandlerContext) -> Outcome {
        let a = cmd.arguments
        let name = a[0]
        if !authenticated, !(name.equalsUppercased("AUTH") || name.equalsUppercased("HELLO") || name.equalsUppercased("QUIT")) {
            engine.countRejection(.noperm)
            return .now(.value(.error("NOAUTH Authentication required.")))
        }
        if name.equalsUppercased("CLAIM") {
            guard let timer = claimTimer else { return claim(a, loop: context.eventLoop) }
            let t0 = NIODeadline.now()
            let outcome = claim(a, loop: context.eventLoop)
            switch outcome {
            case .now: timer.recordNanoseconds((NIODeadline.now() - t0).nanoseconds)
            case .later(let f): f.whenComplete { _ in timer.recordNanoseconds((NIODeadline.now() - t0).nanoseconds) }
            case .pending: break   // (only requests made with an address; this one was not)
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
            return .now(.map([(.bulkString(a[2]), .bulk(""))]))
        }
        if name.equalsUppercased("QUIT") {
            closing = true
            let p = context.eventLoop.makePromise(of: Reply.self)
            p.succeed(.value(.ok))
            return .later(p.futureResult)
        }
        if let r = compatibility(a, context: context) { return r }
        engine.commandErrors.add(1, ordering: .relaxed)
        let shown = String(String(buffer: name).prefix(64))
        return .now(.err("unknown command '\(shown)'"))
    }

    // MARK: - Client compatibility

    /// Commands every Redis client sends while connecting, and what tools like redis-cli ask. They change
    /// nothing but this connection's own state.
    private func compatibility(_ a: [ByteBuffer], context: ChannelHandlerContext) -> Outcome? {
        let name = a[0]
        if name.equalsUppercased("HELLO") { return hello(a) }
        if name.equalsUppercased("AUTH") {
            guard a.count == 2 || a.count == 3 else { return arity("AUTH") }
            return .now(authenticate(password: a[a.count - 1]))
        }
        if name.equalsUppercased("SELECT") {
            guard a.count == 2 else { return arity("SELECT") }
            guard a[1].parsePositiveInt() == 0 else {
                return syntax("DB index is out of range (quotad has only database 0)")
            }
            return .now(.value(.ok))
        }
        if name.equalsUppercased("CLIENT") { return client(a, loop: context.eventLoop) }
        if name.equalsUppercased("ECHO") {
            guard a.count == 2 else { return arity("ECHO") }
            return .now(.value(.bulkString(a[1])))
        }
        if name.equalsUppercased("DBSIZE") {
            guard a.count == 1 else { return arity("DBSIZE") }
            return .now(.value(.integer(engine.vouchersTracked)))
        }
        if name.equalsUppercased("SCAN") {
            // quotad keeps no keys: every scan is complete at once (redis-cli --scan, --bigkeys).
            guard a.count >= 2 else { return arity("SCAN") }
            return .now(.value(.array([.bulk("0"), .array([])])))
        }
        if name.equalsUppercased("COMMAND") {
            if a.count == 1 { return .now(.value(.array([]))) }
            if a[1].equalsUppercased("COUNT") { return .now(.value(.integer(Self.commandNames.count))) }
            if a[1].equalsUppercased("DOCS") { return .now(.map([])) }
            return .now(.value(.array([])))
        }
        if name.equalsUppercased("MULTI") {
            guard a.count == 1 else { return arity("MULTI") }
            guard transaction == nil else { return syntax("MULTI calls can not be nested") }
            transaction = []
            transactionFailed = false
            return .now(.value(.ok))
        }
        if name.equalsUppercased("EXEC") {
            guard let queued = transaction else { return syntax("EXEC without MULTI") }
            transaction = nil
            if transactionFailed {
                return .now(.value(.error("EXECABORT Transaction discarded because of previous errors.")))
            }
            return execute(queued, context: context)
        }
        if name.equalsUppercased("DISCARD") {
            guard transaction != nil else { return syntax("DISCARD without MULTI") }
            transaction = nil
            return .now(.value(.ok))
        }
        if name.equalsUppercased("WATCH") {
            guard transaction == nil else { return syntax("WATCH inside MULTI is not allowed") }
            return syntax("WATCH is not supported: quotad has no keys to watch (CLAIM decides atomically on its own)")
        }
        if name.equalsUppercased("UNWATCH") { return .now(.value(.ok)) }
        return nil
    }

    /// Commands quotad knows (what `COMMAND COUNT` says and what a transaction may queue).
    static let commandNames: [String] = [
        "CLAIM", "UNCLAIM", "AVAIL", "PING", "INFO", "DRAIN", "CONFIG", "QUIT", "HELLO", "AUTH", "SELECT", "CLIENT",
        "ECHO", "DBSIZE", "SCAN", "COMMAND", "MULTI", "EXEC", "DISCARD", "WATCH", "UNWATCH",
    ]

    private static func controlsTransaction(_ name: ByteBuffer) -> Bool {
        name.equalsUppercased("EXEC") || name.equalsUppercased("DISCARD") || name.equalsUppercased("MULTI")
            || name.equalsUppercased("WATCH") || name.equalsUppercased("QUIT")
    }

    /// A command between `MULTI` and `EXEC`: queued, not executed. An unknown command fails the transaction.
    private func queueInTransaction(_ cmd: RESPCommand) -> Outcome {
        let upper = String(buffer: cmd.arguments[0]).uppercased()
        guard Self.commandNames.contains(upper), upper != "HELLO", upper != "AUTH" else {
            transactionFailed = true
            engine.commandErrors.add(1, ordering: .relaxed)
            return .now(.err("unknown command '\(upper.prefix(64))' in MULTI (the transaction will be discarded)"))
        }
        guard transaction!.count < engine.config.limits.maxPendingPerConnection else {
            transactionFailed = true
            return .now(.err("too many commands in MULTI (limits.max_pending_per_connection = "
                              + "\(engine.config.limits.maxPendingPerConnection)); the transaction will be discarded"))
        }
        transaction!.append(cmd)
        return .now(.value(.simpleString("QUEUED")))
    }

    /// `EXEC`: the queued commands run in order, each decided on its own as if sent alone (a CLAIM in a
    /// transaction is not made atomic with the others: there is nothing to roll back), and the reply is
    /// the array of their replies.
    private func execute(_ queued: [RESPCommand], context: ChannelHandlerContext) -> Outcome {
        var replies: [Reply?] = []
        var later: [(Int, EventLoopFuture<Reply>)] = []
        for (i, c) in queued.enumerated() {
            switch dispatch(c, context: context) {
            case .now(let r): replies.append(r)
            case .later(let f):
                replies.append(nil)
                later.append((i, f))
            case .pending:
                // Never: a transaction's commands are dispatched without an address (a claim answered so
                // might have been granted: checked in debug builds, which run the tests).
                assertionFailure("a transaction's command got a reply address")
                replies.append(.error(QuotaError(.err, "internal: a reply without its place")))
            }
        }
        if later.isEmpty { return .now(.replies(replies.map { $0! })) }
        let loop = context.eventLoop
        let fixed = replies
        let positions = later.map(\.0)
        return .later(EventLoopFuture.whenAllComplete(later.map(\.1), on: loop).map { results in
            var all = fixed
            for (i, r) in zip(positions, results) {
                switch r {
                case .success(let v): all[i] = v
                case .failure(let e): all[i] = .error(QuotaError(.unavailable, "internal: \(e)"))
                }
            }
            return .replies(all.map { $0! })
        })
    }

    private func authenticate(password: ByteBuffer) -> Reply {
        guard let expected = engine.config.socket.password else {
            authenticated = true
            return .value(.ok)
        }
        // Compared in constant time for equal lengths.
        let given = Array(password.readableBytesView)
        let want = Array(expected.utf8)
        var diff = given.count ^ want.count
        for i in 0..<min(given.count, want.count) { diff |= Int(given[i] ^ want[i]) }
        guard diff == 0 else {
            engine.countRejection(.noperm)
            return .value(.error("WRONGPASS invalid username-password pair or user is disabled."))
        }
        authenticated = true
        return .value(.ok)
    }

    /// `HELLO [protover [AUTH username password] [SETNAME name]]`.
    private func hello(_ a: [ByteBuffer]) -> Outcome {
        var version = proto
        var i = 1
        if a.count > 1 {
            guard let v = a[1].parsePositiveInt(), v == 2 || v == 3 else {
                engine.commandErrors.add(1, ordering: .relaxed)
                return .now(.value(.error("NOPROTO unsupported protocol version: quotad speaks RESP2 and RESP3")))
            }
            version = v
            i = 2
        }
        while i < a.count {
            if a[i].equalsUppercased("AUTH"), i + 2 < a.count {
                let r = authenticate(password: a[i + 2])
                if case .value(.error) = r { return .now(r) }
                i += 3
            } else if a[i].equalsUppercased("SETNAME"), i + 1 < a.count {
                guard let n = Self.clientName(a[i + 1]) else { return badClientName() }
                clientName = n
                i += 2
            } else {
                return syntax("syntax error in HELLO option '\(String(buffer: a[i]).prefix(32))'")
            }
        }
        guard authenticated else { return .now(.value(.error("NOAUTH HELLO must be called with the client's password"))) }
        // (From this command's reply on: its place is the next one, after every reply still waiting.)
        if version != proto { protoChanges.append((seq: headSeq + queue.count, proto: version)) }
        proto = version
        return .now(.map([
            (.bulk("server"), .bulk("quotad")), (.bulk("version"), .bulk(QuotadVersion.string)),
            (.bulk("proto"), .integer(version)), (.bulk("id"), .integer(clientID)), (.bulk("mode"), .bulk("standalone")),
            (.bulk("role"), .bulk("master")), (.bulk("modules"), .array([])),
        ]))
    }

    /// `CLIENT SETNAME|GETNAME|SETINFO|ID|INFO|LIST`.
    private func client(_ a: [ByteBuffer], loop: any EventLoop) -> Outcome {
        guard a.count >= 2 else { return arity("CLIENT") }
        let sub = a[1]
        if sub.equalsUppercased("SETNAME") {
            guard a.count == 3 else { return arity("CLIENT|SETNAME") }
            if a[2].readableBytes == 0 {
                clientName = nil
                return .now(.value(.ok))
            }
            guard let n = Self.clientName(a[2]) else { return badClientName() }
            clientName = n
            return .now(.value(.ok))
        }
        if sub.equalsUppercased("GETNAME") { return .now(clientName.map { .value(.bulk($0)) } ?? .null) }
        if sub.equalsUppercased("SETINFO") {
            guard a.count == 4 else { return arity("CLIENT|SETINFO") }
            guard a[2].equalsUppercased("LIB-NAME") || a[2].equalsUppercased("LIB-VER") else {
                return syntax("Unrecognized option '\(String(buffer: a[2]).prefix(32))'")
            }
            return .now(.value(.ok))
        }
        if sub.equalsUppercased("ID") { return .now(.value(.integer(clientID))) }
        if sub.equalsUppercased("LIST") {
            guard a.count == 2 else { return syntax("quotad's CLIENT LIST takes no options") }
            guard isAdmin else {
                engine.countRejection(.noperm)
                return .now(.error(QuotaError(.noperm, "CLIENT LIST is for admin peers only (root, quotad's uid, socket.admin_uids)")))
            }
            return .later(engine.clientList(on: loop).map { .value(.bulk($0)) })
        }
        if sub.equalsUppercased("INFO") {
            return .now(.value(.bulk("id=\(clientID) name=\(clientName ?? "") db=0 resp=\(proto) lib=quotad\n")))
        }
        return syntax("unknown subcommand '\(String(buffer: sub).prefix(32))' for CLIENT: quotad answers SETNAME, GETNAME, SETINFO, ID, INFO, LIST")
    }

    /// A client name as Redis allows it: printable ASCII without spaces, at most 128 bytes.
    private static func clientName(_ b: ByteBuffer) -> String? {
        guard b.readableBytes <= 128, b.readableBytesView.allSatisfy({ $0 > 32 && $0 < 127 }) else { return nil }
        return String(buffer: b)
    }

    private func badClientName() -> Outcome {
        syntax("Client names cannot contain spaces, newlines or special characters.")
    }

    private func arity(_ cmd: String) -> Outcome {
        engine.commandErrors.add(1, ordering: .relaxed)
        return .now(.err("wrong number of arguments for '\(cmd)' command"))
    }

    private func badVoucher(_ v: String) -> Outcome {
        engine.commandErrors.add(1, ordering: .relaxed)
        return .now(.err("invalid voucher id '\(v.prefix(64))': use 1-64 of A-Z a-z 0-9 _ . : -"))
    }

    /// `CLAIM voucher user [QTY n] [REQ id]`: the stateless checks are `ClaimArguments.parse` (fuzzed in Fuzz/).
    private func claim(_ a: [ByteBuffer], loop: any EventLoop) -> Outcome {
        switch claimRequest(a) {
        case .claim(let voucher, let req): return engine.request(req, voucher: voucher, loop: loop, cache: &lastRuntime)
        case .refused(let outcome): return outcome
        }
    }

    /// A `CLAIM`'s voucher and request, or the answer refusing its arguments before any voucher sees them. (Not a
    /// `Result` of a tuple: that is destroyed through its metadata: with ``VoucherRuntime``'s `WaiterReply`, measured
    /// 273 instructions a claim; issue 13.)
    private enum ClaimRequest {
        case claim(voucher: String, VoucherMachine.Request)
        case refused(Outcome)
    }

    /// A `CLAIM`'s voucher and request, or its refusal.
    private func claimRequest<A: RESPArgumentBytes>(_ a: A) -> ClaimRequest {
        let c: ClaimArguments.Fields
        // (The handler reached through `Unmanaged` in the closure: `voucherID` or `{ self.voucherID($0) }` retained
        // and released the handler around the call, an atomic pair a claim; issue 13.)
        let me = Unmanaged.passUnretained(self)
        switch ClaimArguments.parseFields(a, maxQty: engine.config.limits.maxQty,
                                          voucherID: { b in me._withUnsafeGuaranteedRef { $0.voucherID(b) } }) {
        case .success(let parsed): c = parsed
        case .failure(.arity): return .refused(arity("CLAIM"))
        case .failure(.syntax(let m)): return .refused(syntax(m))
        case .failure(.badVoucher(let v)): return .refused(badVoucher(v))
        }
        if c.reqIndex == nil && engine.config.claims.requireReq {
            return .refused(syntax(
                "REQ is required (claims.require_req): send CLAIM voucher user REQ <request-id>, the same id "
                + "for every retry of one claim"))
        }
        // Ids are compared as bytes; bytes that are not UTF-8 would not survive the journal and the JSON
        // events as themselves (two such ids would become one string), so they are refused.
        guard let user = a.withArgument(2, Self.utf8) else {
            return .refused(syntax("user id must be valid UTF-8"))
        }
        var req: String?
        if let r = c.reqIndex {
            guard let s = a.withArgument(r, Self.utf8) else {
                return .refused(syntax("REQ request id must be valid UTF-8"))
            }
            req = s
        }
        return .claim(voucher: c.voucher, .claim(qty: c.qty, user: user, req: req))
    }

    /// The text of a `CLAIM`'s voucher id, or nil if it is not a valid id. The last valid id is remembered: a
    /// connection claims one voucher over and over, and the same bytes are answered without a new `String` or
    /// a new check (issue 13).
    private func voucherID(_ b: UnsafeRawBufferPointer) -> String? {
        if let last = lastVoucherID, b.count == last.utf8.count {
            let same = last.withUTF8Bytes { l in b.count == 0 || memcmp(b.baseAddress!, l.baseAddress!, l.count) == 0 }
            if same { return last }
        }
        let v = String(decoding: b, as: UTF8.self)
        guard QuotaStore.isValidVoucherID(v) else { return nil }
        lastVoucherID = v
        return v
    }

    /// Handle the run of `CLAIM`s decoded so far, and queue their replies in order.
    private func flushClaims(context: ChannelHandlerContext) {
        guard let voucher = runVoucher else { return }
        runVoucher = nil
        guard !inactive else {
            // The peer is gone: nobody could learn these claims' ids; they are not decided (helper finding:
            // decided, they sold tokens to nobody, and the run made a reply box that was never detached).
            runRequests.removeAll(keepingCapacity: true)
            runStarted.removeAll(keepingCapacity: true)
            return
        }
        let loop = context.eventLoop
        // Each outcome takes the next place in the reply order (``enqueue(_:context:)``), so request `i`'s
        // place is `firstSeq + i` whatever the others' outcomes.
        let box = replyBox(context: context)
        let firstSeq = headSeq + queue.count
        if runRequests.count == 1 {
            let outcome = engine.request(runRequests[0], voucher: voucher, loop: loop, cache: &lastRuntime,
                                         address: ReplyAddress(box: box, seq: firstSeq))
            runRequests.removeAll(keepingCapacity: true)
            finishClaim(outcome, started: runStarted.first, context: context)
        } else {
            let outcomes = engine.requestMany(runRequests, voucher: voucher, loop: loop, cache: &lastRuntime,
                                              box: box, firstSeq: firstSeq)
            runRequests.removeAll(keepingCapacity: true)
            for (i, outcome) in outcomes.enumerated() {
                finishClaim(outcome, started: i < runStarted.count ? runStarted[i] : nil, context: context)
            }
        }
        runStarted.removeAll(keepingCapacity: true)
    }

    private func finishClaim(_ outcome: Outcome, started t0: NIODeadline?, context: ChannelHandlerContext) {
        if let t0, let timer = claimTimer {
            switch outcome {
            case .now: timer.recordNanoseconds((NIODeadline.now() - t0).nanoseconds)
            case .later(let f): f.whenComplete { _ in timer.recordNanoseconds((NIODeadline.now() - t0).nanoseconds) }
            case .pending: pendingStarts[headSeq + queue.count] = t0
            }
        }
        enqueue(outcome, context: context)
    }

    /// This connection's ``ReplyBox`` (made at its first claim).
    private func replyBox(context: ChannelHandlerContext) -> ReplyBox {
        assert(!inactive, "a reply box for a closed connection is never detached")
        if let b = replyBox { return b }
        let b = ReplyBox(loop: context.eventLoop, handler: self, context: context)
        replyBox = b
        return b
    }

    /// The argument as a string if it is valid UTF-8 (ASCII, the common case, is checked first).
    private static func utf8(_ raw: UnsafeRawBufferPointer) -> String? {
        // (`String(validating:as:)` is generic: it costs runtime metadata lookups, ~600 instructions a call.)
        var any: UInt8 = 0
        for c in raw { any |= c }
        if any < 0x80 { return String(decoding: raw, as: UTF8.self) }
        return String(validating: raw, as: UTF8.self)
    }

    private func syntax(_ m: String) -> Outcome {
        engine.commandErrors.add(1, ordering: .relaxed)
        return .now(.err(m))
    }
}
