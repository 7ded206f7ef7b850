import QuotaHarness
import QuotaRedis
import Testing

/// Found in the chaos review: the periodic region check read any error reply (`-LOADING` while a restarted
/// Redis reloads its AOF, `-WRONGTYPE`, an ACL refusal) as "no region marker", and a host that had adopted a
/// generation then decided Redis lost its data and stopped serving for good. An error is not an answer.
@Suite("Region marker", .timeLimit(.minutes(1)))
struct RegionMarkerTests {
    @Test func anErrorReplyToTheRegionCheckIsAnErrorNotAMissingMarker() async throws {
        let redis = try await RedisServer()
        _ = try await redis.command("SET", QuotaStore.region, "not-a-hash")
        await #expect(throws: RedisError.self) { _ = try await redis.store.regionMarker() }
        _ = try await redis.command("DEL", QuotaStore.region)
        let none = try await redis.store.regionMarker()
        #expect(none.generation == nil && none.previous == nil, "a missing marker is still read as missing")
        _ = try await redis.command("HSET", QuotaStore.region, "gen", "g1")
        #expect(try await redis.store.regionMarker().generation == "g1")
    }
}
