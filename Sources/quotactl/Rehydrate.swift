import ArgumentParser
import Foundation
import QuotaCore
import QuotaLedger
import QuotaRedis

/// `quotactl rehydrate --region R`: rebuild a region's Redis from the ledger after Redis lost its data.
struct RehydrateCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rehydrate",
        abstract: "Rebuild a region's Redis state (vouchers, pools, leases, per-user counts) from the ledger.",
        discussion: """
            For a Redis that lost its data (sidecars then answer UNAVAILABLE for the region, never serving or
            returning anything). First reads the Kafka tail into the ledger; the hosts' journals must have been
            shipped to Kafka (every quotad shows journal_unshipped_claims:0 and kafka_enabled:1, or dead hosts'
            journals were shipped with quotactl journal ship) — say so with --confirm-shipped. A host that runs
            without a kafka section never ships its claims: the ledger cannot know them, and a rehydrate would
            sell them again. Per voucher defined in the region: the
            pool becomes limit − net claims − what leases open at the loss may still have sold (their whole
            unsold part is held back: under-issue, never re-granted); those leases are recreated open and
            expired, so their hosts return them on their journal's word or reconciliation reclaims them with
            proof. Per-user counts and claim markers are rebuilt from the standing claims. The region then gets a
            new generation that succeeds the lost one: sidecars that ran on it adopt it and serve again; a voucher
            that still exists in Redis is never overwritten.
            """)

    @Option(name: .long, help: "The region whose Redis is rebuilt.") var region: String
    @Flag(name: .long, help: "Every host's journal has been shipped to Kafka (required).") var confirmShipped = false
    @Option(name: .long, help: "The lost generation (default: the one the ledger's voucher definitions carry).")
    var previousGeneration: String?
    @Option(name: .long, help: "Override ledger.db.") var ledger: String?
    @OptionGroup var conn: Connection

    struct Line: Codable {
        var voucher: String
        var limit: Int
        var netClaims: Int
        var heldBack: Int
        var pool: Int
        var openLeases: Int
        var users: Int
        var result: String
    }

    func run() async throws {
        guard confirmShipped else {
            throw ValidationError("--confirm-shipped: rehydrate only once every host's journal is on Kafka (journal_unshipped_claims:0 "
                + "and kafka_enabled:1 on every quotad, or quotactl journal ship for dead hosts); claims not yet shipped would be sold again")
        }
        let access = try await LedgerAccess.open(conn, ledgerURL: ledger, catchUp: true)
        guard let url = access.config.regions[region] else { throw ValidationError("--region \(region): no regions.\(region).redis in the config") }
        let store = try conn.store(url)
        let defs = try await access.ledger.vouchers(region: region)
        guard !defs.isEmpty else { throw ValidationError("the ledger has no voucher defined in region \(region)") }
        let known = Set(defs.map(\.generation).filter { !$0.isEmpty })
        guard let previous = previousGeneration ?? (known.count == 1 ? known.first : defs.max { $0.tsMs < $1.tsMs }?.generation),
            !previous.isEmpty
        else {
            throw ValidationError("the ledger does not say which generation was lost: give --previous-generation (INFO region_generation of a sidecar)")
        }
        let marker = try await withRedis(url) { () async throws(RedisError) in try await store.regionMarker() }
        if let g = marker.generation, g == previous {
            throw ValidationError("region \(region) still holds generation \(g): Redis did not lose it; nothing to rehydrate")
        }
        let generation = QuotaStore.newGeneration()
        let views = try await access.ledger.leaseViews(region: region)
        let net = try await access.ledger.netClaimed(region: region)
        var lines: [Line] = []
        for d in defs {
            let leases = views[d.voucher] ?? [:]
            if let l = leases.values.first(where: { QuotaStore.shardIndex(ofLease: $0.lease) > 0 }) {
                // Its leases name shards the rebuilt voucher would not have: not supported (yet); left as is.
                lines.append(Line(voucher: d.voucher, limit: d.limit, netClaims: net[d.voucher] ?? 0, heldBack: 0, pool: 0,
                                  openLeases: 0, users: 0,
                                  result: "REFUSED: sharded (lease \(l.lease)); rehydrating sharded vouchers is not supported"))
                continue
            }
            var open: [(id: String, host: String, granted: Int, restocked: Int, durability: String)] = []
            var heldBack = 0
            var leased = 0, returned = 0, restocked = 0, archivedGranted = 0, archivedReturned = 0, archivedRestocked = 0
            var maxLease = 0
            for v in leases.values {
                maxLease = max(maxLease, Int(v.lease) ?? 0)
                guard let g = v.granted else {
                    // Claims of a lease whose grant the ledger never saw: count what they sold as gone for good.
                    leased += v.soldNet
                    archivedGranted += v.soldNet
                    continue
                }
                leased += g
                if let ret = v.closedReturned {
                    // Closed: archived, keeping exactly what it sold.
                    archivedGranted += g
                    archivedReturned += ret
                    archivedRestocked += max(0, g - ret - v.soldNet)
                    returned += ret
                    restocked += max(0, g - ret - v.soldNet)
                } else {
                    // Open at the loss: what it did not sell yet is held back (its host may still have sold it).
                    open.append((v.lease, v.host ?? "?", g, v.cancelledToPool, v.durability ?? ""))
                    restocked += v.cancelledToPool
                    heldBack += g - v.cancelledToPool - v.soldNet
                }
            }
            let sold = net[d.voucher] ?? 0
            let pool = d.limit - (leased - returned - restocked)
            let standing = try await access.ledger.standingClaims(voucher: d.voucher, region: region)
            var counts: [String: Int] = [:]
            for c in standing { counts[c.user, default: 0] += c.qty }
            let fields: [String: String] = [
                "limit": String(d.limit), "pool": String(max(0, pool)), "state": d.state, "per_user": String(d.perUser),
                "total_limit": String(d.totalLimit), "region": region, "lease_seq": String(maxLease + 1000),
                "leased": String(leased), "returned": String(returned), "restocked": String(restocked),
                "archived_granted": String(archivedGranted), "archived_returned": String(archivedReturned),
                "archived_restocked": String(archivedRestocked), "archived_leases": String(leases.count - open.count),
                "created_ms": String(Int(Date().timeIntervalSince1970 * 1000)), "gen": generation,
                "closed_retention_ms": String(QuotaStore.closedRetention.milliseconds), "rehydrated_from": previous,
            ]
            guard pool >= 0 else {
                lines.append(Line(voucher: d.voucher, limit: d.limit, netClaims: sold, heldBack: heldBack, pool: pool,
                                  openLeases: open.count, users: counts.count,
                                  result: "REFUSED: the ledger accounts for more than the limit (\(d.limit - pool) > \(d.limit))"))
                continue
            }
            if d.perUser > 0 {
                try await withRedis(url) { () async throws(RedisError) in
                    try await store.rehydrateUsers(voucher: d.voucher, groups: access.config.perUser.groups, counts: counts,
                                                   markers: standing.map { ($0.claimID, $0.user, $0.qty) })
                }
            }
            let ok = try await withRedis(url) { () async throws(RedisError) in
                try await store.rehydrate(.init(id: d.voucher, fields: fields, openLeases: open))
            }
            lines.append(Line(voucher: d.voucher, limit: d.limit, netClaims: sold, heldBack: heldBack, pool: pool,
                              openLeases: open.count, users: counts.count,
                              result: ok ? "rebuilt" : "skipped: the voucher exists in Redis (never overwritten)"))
        }
        // Last: the new generation, succeeding the lost one. Sidecars adopt it and load the rebuilt vouchers.
        try await withRedis(url) { () async throws(RedisError) in try await store.setRegion(generation: generation, previous: previous) }
        if let brokers = access.config.kafka.brokers {
            let now = Int64(Date().timeIntervalSince1970 * 1000)
            _ = try produceEvents(brokers: brokers, topic: access.config.kafka.topic, defs.map {
                var d = $0
                d.generation = generation
                d.tsMs = now
                return ($0.voucher, d.kafkaValue)
            })
        }
        await access.ledger.db.close()
        if conn.json {
            try emitJSON(["generation": generation, "previous": previous, "vouchers": String(lines.count)])
            try emitJSON(lines)
            return
        }
        print("region \(region): generation \(generation) succeeds \(previous)")
        print("| voucher | limit | net claims | held back (open leases) | pool | open leases | users | result |")
        print("|---|---:|---:|---:|---:|---:|---:|---|")
        for l in lines {
            print("| \(l.voucher) | \(l.limit) | \(l.netClaims) | \(l.heldBack) | \(l.pool) | \(l.openLeases) | \(l.users) | \(l.result) |")
        }
    }
}
