import NIOCore
import QuotaCore
import QuotaRESP

/// What the sidecar answers to one command.
public enum Reply: Sendable {
    case claimID(String)
    case value(RESPValue)
    case error(QuotaError)

    static func err(_ message: String) -> Reply { .error(QuotaError(.err, message)) }
}

/// An answer now, or one that comes later on the connection's event loop.
public enum Outcome: Sendable {
    case now(Reply)
    case later(EventLoopFuture<Reply>)
}

extension ByteBuffer {
    mutating func writeReply(_ r: Reply) {
        switch r {
        case .claimID(let id):
            writeInteger(UInt8(ascii: "$"))
            writeString(String(id.utf8.count))
            writeStaticString("\r\n")
            writeString(id)
            writeStaticString("\r\n")
        case .value(let v):
            writeRESPValue(v)
        case .error(let e):
            writeInteger(UInt8(ascii: "-"))
            writeString(e.code.word)
            writeInteger(UInt8(ascii: " "))
            // An error line must not break the frame.
            writeString(e.message.replacingOccurrences(of: "\r", with: " ").replacingOccurrences(of: "\n", with: " "))
            writeStaticString("\r\n")
        }
    }
}

/// The monotonic clock the sidecar runs on (CLOCK_MONOTONIC: it keeps running while the process is stopped).
@inline(__always)
func monotonicNow() -> Instant { Instant(nanoseconds: NIODeadline.now().uptimeNanoseconds) }
