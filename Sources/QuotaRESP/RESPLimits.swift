/// Hard limits on what one connection may send. Over a limit the connection gets
/// `-ERR Protocol error: …` and is closed, like redis-server does: the stream
/// cannot be re-synchronised once a frame is refused.
public struct RESPLimits: Sendable, Equatable {
    /// Most arguments in one command (including the command name). Default 32.
    public var maxArguments: Int
    /// Longest single argument, in bytes. Default 4 KiB.
    public var maxArgumentBytes: Int
    /// Longest inline (telnet-style) command line, in bytes. Default 4 KiB.
    public var maxInlineBytes: Int
    /// Most bytes of one whole command frame. Default 64 KiB.
    public var maxFrameBytes: Int

    public init(maxArguments: Int = 32, maxArgumentBytes: Int = 4096, maxInlineBytes: Int = 4096,
                maxFrameBytes: Int = 65536) {
        self.maxArguments = maxArguments
        self.maxArgumentBytes = maxArgumentBytes
        self.maxInlineBytes = maxInlineBytes
        self.maxFrameBytes = maxFrameBytes
    }
}

/// A frame that cannot be accepted. `message` is what the peer is told.
public struct RESPProtocolError: Error, Sendable, Equatable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { "Protocol error: \(message)" }
}
