import Logging

/// A region's Redis as the store sees it: one standalone server (one ``HiredisConnection``) or a Redis
/// Cluster (a ``RedisClusterRouter``: one connection per node, commands routed by their key's slot).
public final class RedisClient: Sendable {
    private enum Backend: Sendable {
        case single(HiredisConnection)
        case cluster(RedisClusterRouter)
    }

    private let backend: Backend
    /// What was configured: the server, or the cluster's seeds.
    public let endpoint: RedisEndpoint

    public init(_ connection: HiredisConnection) {
        backend = .single(connection)
        endpoint = connection.endpoint
    }

    public init(cluster: RedisClusterRouter) {
        backend = .cluster(cluster)
        endpoint = .cluster(seeds: cluster.seeds)
    }

    /// A client for `endpoint`: a cluster router for `.cluster`, else one connection.
    public convenience init(endpoint: RedisEndpoint, timeout: Duration, logger: Logger) {
        if case .cluster(let seeds) = endpoint {
            self.init(cluster: RedisClusterRouter(seeds: seeds, timeout: timeout, logger: logger))
        } else {
            self.init(HiredisConnection(endpoint: endpoint, timeout: timeout, logger: logger))
        }
    }

    /// The cluster router, when this is a cluster.
    public var cluster: RedisClusterRouter? {
        if case .cluster(let c) = backend { return c }
        return nil
    }

    public var isCluster: Bool { cluster != nil }

    /// Send one command and wait for its reply. Error replies come back as `.error`, not thrown.
    public func send(_ args: [String]) async throws(RedisError) -> RedisValue {
        switch backend {
        case .single(let c): return try await c.send(args)
        case .cluster(let r): return try await r.send(args)
        }
    }

    /// Send several commands as one pipeline (on a cluster: one per node); replies in order.
    public func send(batch: [[String]]) async throws(RedisError) -> [RedisValue] {
        switch backend {
        case .single(let c): return try await c.send(batch: batch)
        case .cluster(let r): return try await r.send(batch: batch)
        }
    }

    /// Send several commands; per command in order, its reply or its own failure. On a cluster the
    /// parts on different nodes succeed or fail apart (``RedisClusterRouter/sendEach(batch:)``); on one
    /// server the pipeline succeeds or fails as a whole.
    public func sendEach(batch: [[String]]) async -> [Result<RedisValue, RedisError>] {
        switch backend {
        case .single(let c):
            do { return try await c.send(batch: batch).map { .success($0) } } catch { return batch.map { _ in .failure(error) } }
        case .cluster(let r): return await r.sendEach(batch: batch)
        }
    }

    /// Send `args` to every master (the one server when standalone): each one's reply or failure.
    public func sendToMasters(_ args: [String]) async throws(RedisError) -> [(node: String, reply: Result<RedisValue, RedisError>)] {
        switch backend {
        case .single(let c):
            do { return [(c.endpoint.description, .success(try await c.send(args)))] } catch { return [(c.endpoint.description, .failure(error))] }
        case .cluster(let r): return try await r.sendToMasters(args)
        }
    }

    /// Send `args` to every replica of a cluster (none when standalone): each one's reply or failure.
    public func sendToReplicas(_ args: [String]) async throws(RedisError) -> [(node: String, reply: Result<RedisValue, RedisError>)] {
        switch backend {
        case .single: return []
        case .cluster(let r): return try await r.sendToReplicas(args)
        }
    }

    /// Stop every connection; queued requests fail with ``RedisError/closed``.
    public func close() {
        switch backend {
        case .single(let c): c.close()
        case .cluster(let r): r.close()
        }
    }

    /// Replies read (round trips are batches; this counts commands), over every node.
    public var commandsSent: Int {
        switch backend {
        case .single(let c): return c.commandsSent
        case .cluster(let r): return r.commandsSent
        }
    }

    /// Replies that came after their call had timed out, over every node.
    public var lateReplies: Int {
        switch backend {
        case .single(let c): return c.lateReplies
        case .cluster(let r): return r.lateReplies
        }
    }
}
