import Glibc
import NIOCore
import NIOPosix

/// The peer of a Unix socket connection (SO_PEERCRED).
struct PeerCredentials {
    var pid: Int32?
    var uid: UInt32?
    var gid: UInt32?

    /// Layout of `struct ucred` (not exported by Swift's Glibc module).
    private struct UCred {
        var pid: Int32 = 0
        var uid: UInt32 = 0
        var gid: UInt32 = 0
    }

    static func of(_ channel: any Channel) -> EventLoopFuture<PeerCredentials> {
        guard let provider = channel as? any SocketOptionProvider else {
            return channel.eventLoop.makeSucceededFuture(PeerCredentials())
        }
        return provider.unsafeGetSocketOption(
            level: NIOBSDSocket.OptionLevel(rawValue: SOL_SOCKET),
            name: NIOBSDSocket.Option(rawValue: SO_PEERCRED)
        ).map { (c: UCred) in PeerCredentials(pid: c.pid, uid: c.uid, gid: c.gid) }
            .recover { _ in PeerCredentials() }
    }

    /// Why this peer may not connect, or nil.
    func refusal(allowedUIDs: [UInt32], allowedGIDs: [UInt32]) -> String? {
        if allowedUIDs.isEmpty && allowedGIDs.isEmpty { return nil }
        guard let uid, let gid else { return "peer credentials unavailable" }
        if uid == 0 || allowedUIDs.contains(uid) || allowedGIDs.contains(gid) { return nil }
        return "uid \(uid) gid \(gid) is not in socket.allowed_uids / socket.allowed_gids"
    }
}
