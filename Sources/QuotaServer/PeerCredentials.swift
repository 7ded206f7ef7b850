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

extension PeerCredentials {
    /// Does a process accept connections on the Unix socket at `path`? (A stale file refuses them.)
    static func somethingListens(at path: String) -> Bool {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else { return false }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in bytes.enumerated() { raw[i] = b }
            raw[bytes.count] = 0
        }
        return withUnsafePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) == 0
            }
        }
    }
}
