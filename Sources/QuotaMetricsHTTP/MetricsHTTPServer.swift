import NIOCore
import NIOHTTP1
import NIOPosix

/// A minimal HTTP/1.1 endpoint for Prometheus: `GET /metrics` answers what `scrape` returns (the
/// exposition text), anything else 404. One request per connection.
public enum MetricsHTTPServer {
    /// Serve on `host:port`; returns the bound channel (close it to stop).
    public static func serve(host: String, port: Int, group: any EventLoopGroup,
                             scrape: @escaping @Sendable () -> [UInt8]) async throws -> any Channel {
        try await ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(Handler(scrape: scrape))
                }
            }
            .bind(host: host, port: port).get()
    }

    final class Handler: ChannelInboundHandler {
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = HTTPServerResponsePart
        private let scrape: @Sendable () -> [UInt8]
        private var uri = ""

        init(scrape: @escaping @Sendable () -> [UInt8]) { self.scrape = scrape }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            switch unwrapInboundIn(data) {
            case .head(let h): uri = h.uri
            case .body: break
            case .end:
                let ok = uri == "/metrics" || uri.hasPrefix("/metrics?")
                let body = ok ? scrape() : Array("not found: scrape /metrics\n".utf8)
                var headers = HTTPHeaders()
                headers.add(name: "Content-Type", value: ok ? "text/plain; version=0.0.4" : "text/plain")
                headers.add(name: "Content-Length", value: String(body.count))
                headers.add(name: "Connection", value: "close")
                let head = HTTPResponseHead(version: .http1_1, status: ok ? .ok : .notFound, headers: headers)
                context.write(wrapOutboundOut(.head(head)), promise: nil)
                context.write(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(bytes: body)))), promise: nil)
                let channel = context.channel
                context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in channel.close(promise: nil) }
            }
        }
    }
}
