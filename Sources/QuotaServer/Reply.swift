import NIOCore
import QuotaCore
import QuotaRESP

/// What the sidecar answers to one command.
public enum Reply: Sendable {
    case claimID(String)
    /// A claim id made by this process: its claim prefix (every claim id this process makes starts with it) then
    /// `seq` in base 36 (``ClaimEvent/claimID(prefix:seq:)``), written into the reply by the connection, which
    /// knows the prefix, with no `String` made for it. (No prefix in it: a reply is copied ~8 times on its way
    /// from the journal thread to its connection, and the prefix's retain and release in each copy were ~1,000
    /// instructions a claim; issue 13.)
    case claimNumber(seq: Int)
    case value(RESPValue)
    case error(QuotaError)
    /// A map: RESP3 `%`, RESP2 a flat array of keys and values.
    case map([(RESPValue, RESPValue)])
    /// No value: RESP3 `_`, RESP2 a null bulk string.
    case null
    /// Replies of a transaction (`EXEC`), each encoded as itself.
    case replies([Reply])

    static func err(_ message: String) -> Reply { .error(QuotaError(.err, message)) }
}

/// An answer now, or one that comes later on the connection's event loop.
public enum Outcome: Sendable {
    case now(Reply)
    case later(EventLoopFuture<Reply>)
    /// Comes later to the ``ReplyAddress`` the request was made with (no promise, no future: the reply is
    /// handed to its connection with the others of its batch). Only requests made with an address get it.
    case pending
}

/// Where a reply decided later goes without a promise: a connection's ``ReplyBox`` and the reply's place
/// in that connection's order of replies (issue 13: a promise, its future and a callback per claim were a
/// visible part of a claim answered from another thread, as with the journal or a per-user check).
struct ReplyAddress: Sendable {
    let box: ReplyBox
    let seq: Int
}

/// A reply for an address, with the keys it is grouped by on its way (its event loop, then its connection).
struct AddressedReply: Sendable {
    let loop: ObjectIdentifier
    let box: ObjectIdentifier
    let address: ReplyAddress
    let reply: Reply

    init(_ address: ReplyAddress, _ reply: Reply) {
        self.loop = ObjectIdentifier(address.box.loop)
        self.box = ObjectIdentifier(address.box)
        self.address = address
        self.reply = reply
    }
}

/// A connection's receiver of replies decided on other threads. Everything in it happens on `loop`:
/// ``deliver(_:)`` is called there (runtimes reach it with one `execute` per event loop and batch), and
/// the connection detaches it there when it closes; replies that come after are dropped, as the channel
/// is gone.
final class ReplyBox: @unchecked Sendable {
    let loop: any EventLoop
    private var handler: ConnectionHandler?
    private var context: ChannelHandlerContext?

    init(loop: any EventLoop, handler: ConnectionHandler, context: ChannelHandlerContext) {
        self.loop = loop
        self.handler = handler
        self.context = context
    }

    /// On `loop`: hand the connection its replies (in any order; it writes them in its own order).
    func deliver<Items: Sequence>(_ items: Items) where Items.Element == (seq: Int, reply: Reply) {
        loop.preconditionInEventLoop()
        guard let handler, let context else { return }
        handler.fill(items, context: context)
    }

    /// On `loop`: the connection is gone (this also breaks the cycle handler -> box -> handler).
    func detach() {
        loop.preconditionInEventLoop()
        handler = nil
        context = nil
    }
}

extension ByteBuffer {
    /// Append `r` for a client speaking RESP `proto` (2 or 3); a ``Reply/claimNumber(seq:)`` is written after
    /// `claimPrefix` (the process's).
    mutating func writeReply(_ r: Reply, proto: Int = 2, claimPrefix: String) {
        switch r {
        case .map(let pairs):
            if proto >= 3 {
                writeInteger(UInt8(ascii: "%"))
                writeString(String(pairs.count))
                writeStaticString("\r\n")
                for (k, v) in pairs {
                    writeRESPValue(k)
                    writeRESPValue(v)
                }
            } else {
                writeRESPValue(.array(pairs.flatMap { [$0.0, $0.1] }))
            }
        case .null:
            if proto >= 3 { writeStaticString("_\r\n") } else { writeStaticString("$-1\r\n") }
        case .replies(let rs):
            writeInteger(UInt8(ascii: "*"))
            writeString(String(rs.count))
            writeStaticString("\r\n")
            for x in rs { writeReply(x, proto: proto, claimPrefix: claimPrefix) }
        case .claimID(let id):
            writeClaimID(id)
        case .claimNumber(let seq):
            writeClaimID(prefix: claimPrefix, seq: seq)
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

extension ByteBuffer {
    /// `$<length>\r\n<id>\r\n` in one write into the buffer (the claim path's reply: one exclusive access to
    /// the buffer's storage, not five, and the length's digits without a `String`).
    mutating func writeClaimID(_ id: String) {
        id.withUTF8Bytes { bytes in writeBulk(bytes, count: bytes.count, write: { _ in }) }
    }

    /// ``writeClaimID(_:)`` of `prefix` then `seq` in base 36, the id built in the buffer.
    mutating func writeClaimID(prefix: String, seq: Int) {
        let digits = ClaimNumber.count(seq)
        prefix.withUTF8Bytes { head in
            writeBulk(head, count: head.count + digits) { tail in ClaimNumber.write(seq, digits: digits, at: tail) }
        }
    }

    /// `$<count>\r\n<head><tail>\r\n` in one write: `head`'s bytes, then `write` fills the remaining
    /// `count - head.count` bytes at the pointer it is given.
    @inline(__always)
    private mutating func writeBulk(_ head: UnsafeBufferPointer<UInt8>, count n: Int,
                                    write tail: (UnsafeMutablePointer<UInt8>) -> Void) {
        let digits = DecimalDigits.count(UInt64(n))
        let total = 1 + digits + 2 + n + 2
        writeWithUnsafeMutableBytes(minimumWritableBytes: total) { raw in
            let out = raw.baseAddress!.assumingMemoryBound(to: UInt8.self)
            out[0] = UInt8(ascii: "$")
            DecimalDigits.write(UInt64(n), at: raw.baseAddress! + 1)
            out[1 + digits] = UInt8(ascii: "\r")
            out[2 + digits] = UInt8(ascii: "\n")
            if let h = head.baseAddress, head.count > 0 { (out + 3 + digits).update(from: h, count: head.count) }
            if n > head.count { tail(out + 3 + digits + head.count) }
            out[3 + digits + n] = UInt8(ascii: "\r")
            out[4 + digits + n] = UInt8(ascii: "\n")
            return total
        }
    }
}

/// The monotonic clock the sidecar runs on (CLOCK_MONOTONIC: it keeps running while the process is stopped).
@inline(__always)
func monotonicNow() -> Instant { Instant(nanoseconds: NIODeadline.now().uptimeNanoseconds) }
