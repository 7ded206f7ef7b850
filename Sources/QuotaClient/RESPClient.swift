import NIOCore
import NIOPosix
import QuotaRESP


final class ClientHandler: ChannelDuplexHandler, @unchecked Sendable {
    typealias InboundIn = RESPValue
    typealias OutboundIn = (ByteBuffer, [EventLoopPromise<RESPValue>])
    typealias OutboundOut = ByteBuffer
    private var waiting = CircularBuffer<EventLoopPromise<RESPValue>>()
    /// For ``RESPClient/state()``: replies decoded, and replies asked for, since the connection was made.
    private(set) var repliesReceived = 0
    private(set) var repliesAsked = 0
    var waitingCount: Int { waiting.count }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let (bytes, promises) = unwrapOutboundIn(data)
        waiting.append(contentsOf: promises)
        repliesAsked += promises.count
        context.write(wrapOutboundOut(bytes), promise: promise)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let v = unwrapInboundIn(data)
        repliesReceived += 1
        waiting.popFirst()?.succeed(v)
    }

    func channelInactive(context: ChannelHandlerContext) {
        while let p = waiting.popFirst() { p.fail(ChannelError.ioOnClosedChannel) }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        while let p = waiting.popFirst() { p.fail(error) }
        context.close(promise: nil)
    }
}

/// Counts the bytes read from the socket (``RESPClient/state()``).
final class ByteCounter: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    private(set) var bytesRead = 0
    private(set) var lastRead: NIODeadline?

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        bytesRead += unwrapInboundIn(data).readableBytes
        lastRead = .now()
        context.fireChannelRead(data)
    }
}

/// A small RESP client over a Unix socket: pipelined, replies in order.
public final class RESPClient: Sendable {
    public let channel: any Channel

    public init(channel: any Channel) { self.channel = channel }

    public static func connect(_ path: String, group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton) async throws -> RESPClient {
        let ch = try await ClientBootstrap(group: group)
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    try ch.pipeline.syncOperations.addHandler(ByteCounter())
                    try ch.pipeline.syncOperations.addHandler(ByteToMessageHandler(RESPValueDecoder()))
                    try ch.pipeline.syncOperations.addHandler(ClientHandler())
                }
            }
            .connect(unixDomainSocketPath: path).get()
        return RESPClient(channel: ch)
    }

    public func send(_ args: String...) async throws -> RESPValue { try await send(args) }

    public func send(_ args: [String]) async throws -> RESPValue {
        var b = channel.allocator.buffer(capacity: 64)
        b.writeRESPCommand(args)
        return try await sendRaw(b, replies: 1)[0]
    }

    /// Several commands in one write; replies in order.
    public func pipeline(_ cmds: [[String]]) async throws -> [RESPValue] {
        var b = channel.allocator.buffer(capacity: 64 * cmds.count)
        for c in cmds { b.writeRESPCommand(c) }
        return try await sendRaw(b, replies: cmds.count)
    }

    /// Raw bytes, expecting `replies` replies.
    public func sendRaw(_ bytes: ByteBuffer, replies: Int) async throws -> [RESPValue] {
        let promises = (0..<replies).map { _ in channel.eventLoop.makePromise(of: RESPValue.self) }
        channel.writeAndFlush((bytes, promises)).whenFailure { error in
            // Never written (closed channel): nobody else will answer these.
            for p in promises { p.fail(error) }
        }
        // One await for all of them: an await per reply was a hop to the event loop and back to Swift's cooperative
        // pool each, and 200 of them in a row under the whole suite's load took longer than a step's 30 s although
        // every reply had been read at once (the failing step's view: flushed and read 30 s before it).
        return try await EventLoopFuture.whenAllSucceed(promises.map(\.futureResult), on: channel.eventLoop).get()
    }

    public var isActive: Bool { channel.isActive }

    /// What this connection has seen, for a test's diagnosis of a missing reply: bytes read from the socket,
    /// replies decoded, replies asked for, promises still waiting.
    public func state() async -> String {
        let ch = channel
        let r = try? await ch.eventLoop.submit { () -> String in
            let counter = try ch.pipeline.syncOperations.handler(type: ByteCounter.self)
            let h = try ch.pipeline.syncOperations.handler(type: ClientHandler.self)
            let lastRead = counter.lastRead.map { "\((NIODeadline.now() - $0).nanoseconds / 1_000_000) ms ago" } ?? "never"
            return "client: active=\(ch.isActive) bytes read=\(counter.bytesRead) (last \(lastRead)) replies decoded=\(h.repliesReceived) "
                + "asked=\(h.repliesAsked) waiting=\(h.waitingCount)"
        }.get()
        return r ?? "client: state not readable"
    }

    /// Wait until the server closes the connection.
    public func waitClosed(timeout: Duration = .seconds(5)) async throws {
        let deadline = ContinuousClock.now + timeout
        while channel.isActive {
            guard ContinuousClock.now < deadline else { throw ChannelError.connectTimeout(.seconds(5)) }
            try await Task.sleep(for: .milliseconds(20))
        }
    }

    public func close() { channel.close(promise: nil) }
}
