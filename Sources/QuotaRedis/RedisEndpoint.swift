/// Where a Redis server listens: `unix:///path/redis.sock`, `redis://host:port`, `host:port` or `/path`.
public enum RedisEndpoint: Sendable, Equatable, CustomStringConvertible {
    case unix(path: String)
    case tcp(host: String, port: Int)

    /// Parse a Redis URL; the error says which forms are accepted.
    public init(url: String) throws(RedisError) {
        let bad = RedisError.invalidURL(
            "'\(url)' is not a Redis address (use redis://HOST:PORT, unix:///PATH or /PATH)")
        if url.hasPrefix("unix://") {
            let path = String(url.dropFirst("unix://".count))
            guard path.hasPrefix("/"), path.count > 1 else { throw bad }
            self = .unix(path: path)
        } else if url.hasPrefix("/") {
            self = .unix(path: url)
        } else {
            var rest = Substring(url)
            if rest.hasPrefix("redis://") { rest = rest.dropFirst("redis://".count) }
            if let slash = rest.firstIndex(of: "/") { rest = rest[..<slash] }
            let parts = rest.split(separator: ":", omittingEmptySubsequences: false)
            guard !rest.isEmpty, parts.count <= 2, !parts[0].isEmpty else { throw bad }
            var port = 6379
            if parts.count == 2 {
                guard let p = Int(parts[1]), p > 0, p < 65536 else { throw bad }
                port = p
            }
            self = .tcp(host: String(parts[0]), port: port)
        }
    }

    public var description: String {
        switch self {
        case .unix(let p): return "unix://\(p)"
        case .tcp(let h, let p): return "redis://\(h):\(p)"
        }
    }
}
