/// Where a Redis server listens: `unix:///path/redis.sock`, `redis://host:port`, `host:port` or `/path`;
/// or a Redis Cluster given by seed nodes: `redis-cluster://host:port,host:port,…` (a seed may also be
/// `unix:///path` or `/path`: it is asked for the topology; the nodes themselves are reached at the
/// addresses the cluster announces).
public indirect enum RedisEndpoint: Sendable, Equatable, CustomStringConvertible {
    case unix(path: String)
    case tcp(host: String, port: Int)
    /// A Redis Cluster: the seed nodes asked for its topology (never another `.cluster`).
    case cluster(seeds: [RedisEndpoint])

    public static let clusterScheme = "redis-cluster://"

    /// Parse a Redis URL; the error says which forms are accepted.
    public init(url: String) throws(RedisError) {
        if url.hasPrefix(Self.clusterScheme) {
            let list = url.dropFirst(Self.clusterScheme.count).split(separator: ",", omittingEmptySubsequences: false)
            var seeds: [RedisEndpoint] = []
            for s in list {
                let seed = s.trimmingSpaces
                guard !seed.isEmpty, !seed.hasPrefix("redis-cluster:") else {
                    throw RedisError.invalidURL(
                        "'\(url)' is not a Redis Cluster address (use redis-cluster://HOST:PORT,HOST:PORT,… with at least one seed node)")
                }
                seeds.append(try RedisEndpoint(url: seed))
            }
            self = .cluster(seeds: seeds)
            return
        }
        let bad = RedisError.invalidURL(
            "'\(url)' is not a Redis address (use redis://HOST:PORT, unix:///PATH, /PATH or redis-cluster://HOST:PORT,HOST:PORT,…)")
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

    /// Whether this is a Redis Cluster.
    public var isCluster: Bool {
        if case .cluster = self { return true }
        return false
    }

    public var description: String {
        switch self {
        case .unix(let p): return "unix://\(p)"
        case .tcp(let h, let p): return "redis://\(h):\(p)"
        case .cluster(let seeds):
            return Self.clusterScheme + seeds.map {
                if case .tcp(let h, let p) = $0 { return "\(h):\(p)" }
                return $0.description
            }.joined(separator: ",")
        }
    }
}

extension Substring {
    fileprivate var trimmingSpaces: String {
        String(drop { $0 == " " }.reversed().drop { $0 == " " }.reversed())
    }
}
