import ArgumentParser
import Foundation
import QuotaCore
import QuotaRedis

/// A sale time: RFC 3339 (`2026-12-01T12:00:00Z`, `…+08:00`, with or without fractions), a time relative
/// to Redis's clock (`+30s`, `+1500ms`, `+5m`, `+2h`, `+1d`), or `none` (no bound). Returns Redis ms (0: none).
func parseSaleTime(_ text: String, option: String, redisNowMs: Int64) throws -> Int64 {
    let ms = try parseSaleTimeUnbounded(text, option: option, redisNowMs: redisNowMs)
    // Ten years either way: further is a typo or a placeholder (use `none`), and stays far from overflow.
    let bound: Int64 = 10 * 366 * 86_400_000
    if ms != 0 && (ms > redisNowMs + bound || ms < redisNowMs - bound) {
        throw ValidationError("\(option): '\(text)' is more than 10 years from now (\(formatUTC(ms: redisNowMs))); "
            + "use none for no bound")
    }
    return ms
}

private func parseSaleTimeUnbounded(_ text: String, option: String, redisNowMs: Int64) throws -> Int64 {
    let s = text.trimmingCharacters(in: .whitespaces)
    if s == "none" || s == "0" { return 0 }
    if s.hasPrefix("+") {
        let body = s.dropFirst()
        let units: [(String, Double)] = [("ms", 0.001), ("s", 1), ("m", 60), ("h", 3600), ("d", 86400)]
        for (u, scale) in units where body.hasSuffix(u) {
            let number = body.dropLast(u.count)
            // "ms" is tried before "s" and "m": "+500ms" is not "+500m" followed by garbage.
            if let v = Double(number), v >= 0, v.isFinite, v * scale < 1e10 {
                return redisNowMs + Int64((v * scale * 1000).rounded())
            }
        }
        throw ValidationError("\(option): '\(text)' is not a relative time; use e.g. +30s, +1500ms, +5m, +2h")
    }
    let f = ISO8601DateFormatter()
    for options: ISO8601DateFormatter.Options in [[.withInternetDateTime, .withFractionalSeconds], [.withInternetDateTime]] {
        f.formatOptions = options
        if let d = f.date(from: s), abs(d.timeIntervalSince1970) < 1e13 { return Int64((d.timeIntervalSince1970 * 1000).rounded()) }
    }
    throw ValidationError("\(option): '\(text)' is not a time; use RFC 3339 (2026-12-01T12:00:00Z) or +30s, or none")
}

/// Describe a schedule for people.
func describeSchedule(startMs: Int64, endMs: Int64, nowMs: Int64) -> String {
    func one(_ ms: Int64) -> String {
        let d = ms - nowMs
        let rel = d >= 0 ? "in \(formatSeconds(.milliseconds(d)))" : "\(formatSeconds(.milliseconds(-d))) ago"
        return "\(formatUTC(ms: ms)) (\(rel))"
    }
    if startMs == 0 && endMs == 0 { return "none" }
    return "opens " + (startMs > 0 ? one(startMs) : "at once") + ", ends " + (endMs > 0 ? one(endMs) : "never")
}

extension VoucherCommand {
    struct SetSchedule: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "set-schedule",
            abstract: "Set when a voucher's sale opens and ends (Redis's clock; CLAIM answers INACTIVE outside it).")
        @Argument var id: String
        @Option(name: .long, help: "Opening: RFC 3339, +30s (from Redis's now), or none.") var start: String?
        @Option(name: .long, help: "End: RFC 3339, +10m (from Redis's now), or none.") var end: String?
        @OptionGroup var conn: Connection

        func run() async throws {
            try requireVoucherID(id)
            guard start != nil || end != nil else { throw ValidationError("nothing to set: give --start and/or --end") }
            let r = try conn.regions()
            var done: [String] = []
            var shown = ""
            for (name, url) in r.regions.sorted(by: { $0.key < $1.key }) {
                let s = try conn.store(url)
                let now = Int64(try await withRedis(url) { () async throws(RedisError) in try await s.nowMs() })
                let startMs = try start.map { try parseSaleTime($0, option: "--start", redisNowMs: now) }
                let endMs = try end.map { try parseSaleTime($0, option: "--end", redisNowMs: now) }
                let id = self.id
                guard let rec = try await withRedis(url, { () async throws(RedisError) in try await s.voucher(id) }) else { continue }
                let newStart = startMs ?? rec.startMs
                let newEnd = endMs ?? rec.endMs
                // Sidecars learn a new schedule within a refresh (~1 s): a change that takes effect sooner
                // than that could be served past. Stopping a sale now is what `voucher pause` is for.
                if let startMs, startMs > now && startMs < now + 2_000 {
                    throw ValidationError("--start must be at least 2 s ahead (sidecars learn a schedule within a refresh); "
                        + "use a time in the past or none to open now")
                }
                if let endMs, endMs > 0 && endMs < now + 2_000 {
                    throw ValidationError("--end must be at least 2 s ahead (sidecars learn a schedule within a refresh); "
                        + "use quotactl voucher pause \(id) to stop a sale now")
                }
                if newStart > 0 && newEnd > 0 && newEnd <= newStart {
                    throw ValidationError("the end (\(formatUTC(ms: newEnd))) must be after the opening (\(formatUTC(ms: newStart)))")
                }
                _ = try await withRedis(url) { () async throws(RedisError) in
                    try await s.setSchedule(voucher: id, startMs: startMs, endMs: endMs)
                }
                done.append(name)
                shown = describeSchedule(startMs: newStart, endMs: newEnd, nowMs: now)
            }
            guard !done.isEmpty else { throw ValidationError("no voucher '\(id)' (see: quotactl voucher list)") }
            if conn.json {
                try emitJSON(["id": id, "regions": done.joined(separator: ","), "schedule": shown])
            } else {
                print("voucher \(id) (\(done.joined(separator: ", "))): \(shown)")
            }
        }
    }

    struct Warm: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Have every sidecar of the region take its opening lease (before a scheduled opening, or now).")
        @Argument var id: String
        @Option(name: .long, help: "Region (default: every region holding the voucher).") var region: String?
        @OptionGroup var conn: Connection

        func run() async throws {
            try requireVoucherID(id)
            let r = try conn.regions()
            var rows: [[String: String]] = []
            for (name, url) in r.regions.sorted(by: { $0.key < $1.key }) where region == nil || region == name {
                let s = try conn.store(url)
                let id = self.id
                let found = try await withRedis(url) { () async throws(RedisError) -> (VoucherRecord, Int64, Int)? in
                    guard let rec = try await s.voucher(id) else { return nil }
                    let now = Int64(try await s.nowMs())
                    let at = try await s.warm(voucher: id, atMs: rec.startMs > now ? rec.startMs : 0)
                    return (rec, at, try await s.liveHosts())
                }
                guard let (rec, at, hosts) = found else { continue }
                let policy = try await withRedis(url) { () async throws(RedisError) in try await s.regionPolicy() }
                    .overlaid(by: rec.policy).applied(to: try conn.loadConfig()?.lease ?? LeasePolicy())
                let opening = policy.openingSize(regionLimit: rec.limit, hosts: hosts)
                let when = rec.startMs > at - 1 && rec.startMs > 0
                    ? "\(formatSeconds(policy.warmup)) before it opens at \(formatUTC(ms: rec.startMs))" : "now"
                rows.append(["region": name, "opening_tokens_per_host": String(opening), "live_hosts": String(hosts),
                             "when": when])
            }
            guard !rows.isEmpty else { throw ValidationError("no voucher '\(id)' (see: quotactl voucher list)") }
            if conn.json { return try emitJSON(rows) }
            for row in rows {
                print("voucher \(id) region \(row["region"]!): \(row["live_hosts"]!) live sidecar(s) take an opening lease of "
                    + "\(row["opening_tokens_per_host"]!) tokens each, \(row["when"]!)")
            }
        }
    }
}

extension LeaseCommand {
    /// `quotactl lease advise`: what each candidate lease size costs and risks, for a claim rate and host count.
    struct Advise: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Candidate lease sizes for a voucher: Redis commands per claim, tokens at risk, tail delay.")
        @Argument var id: String
        @Option(name: .long, help: "Sidecars serving it (default: those reporting a claim rate, else live hosts).")
        var hosts: Int?
        @Option(name: .long, help: "Region-wide claims per second (default: the sum the sidecars report).")
        var rate: Double?
        @Option(name: .long, help: "Region (default: the home region).") var region: String?
        @OptionGroup var conn: Connection

        struct Row: Codable {
            var lease_size: Int
            var lease_lasts_seconds: Double
            var redis_commands_per_claim: Double
            var redis_commands_per_second: Double
            var tokens_at_risk_per_host_crash: Int
            var tokens_at_risk_all_hosts: Int
            var tail_delay_without_recall_ms: Double
            var current: Bool
        }

        struct Advice: Codable {
            var voucher: String
            var region: String
            var hosts: Int
            var rate: Double
            var rate_source: String
            var pool: Int
            var ttl_seconds: Double
            var rows: [Row]
            var suggestion: Int
        }

        func run() async throws {
            try requireVoucherID(id)
            if let hosts, hosts < 1 { throw ValidationError("--hosts must be >= 1") }
            if let rate, !(rate > 0) { throw ValidationError("--rate must be > 0 (claims per second)") }
            let r = try conn.regions()
            let name = region ?? r.home
            guard let url = r.regions[name] else { throw ValidationError("--region \(name): no Redis known for it") }
            let s = try conn.store(url)
            let id = self.id
            let (found, reported, live, regionPolicy) = try await withRedis(url) {
                () async throws(RedisError) -> (VoucherRecord?, [String: Double], Int, LeasePolicyOverride) in
                (try await s.voucher(id), try await s.claimRates(voucher: id), try await s.liveHosts(), try await s.regionPolicy())
            }
            guard let rec = found else { throw ValidationError("no voucher '\(id)' in region \(name)") }
            let policy = regionPolicy.overlaid(by: rec.policy).applied(to: try conn.loadConfig()?.lease ?? LeasePolicy())
            let observed = reported.values.reduce(0, +)
            guard let rate = rate ?? (observed > 0 ? observed : nil) else {
                throw ValidationError("no claim rate observed for '\(id)' (no sidecar is serving it now): give --rate R")
            }
            let h = hosts ?? (reported.isEmpty ? max(1, live) : reported.count)
            let advice = Self.advise(voucher: id, region: name, rate: rate, rateSource: self.rate == nil ? "observed" : "given",
                                     hosts: h, pool: rec.pool, limit: rec.limit, policy: policy)
            if conn.json { return try emitJSON(advice) }
            print("voucher \(id) region \(name): \(String(format: "%.0f", rate)) claims/s (\(advice.rate_source)) over \(h) "
                + "host(s), pool \(rec.pool) of \(rec.limit), lease ttl \(String(format: "%.0f", advice.ttl_seconds)) s")
            print("")
            print("  lease   lasts    Redis cmds   Redis cmds   at risk if   at risk if   tail delay")
            print("  size    on host  per claim    per second   a host dies  all hosts    w/o recall")
            for row in advice.rows {
                let mark = row.current ? " <- now" : row.lease_size == advice.suggestion ? " <- suggested" : ""
                print("  " + [String(row.lease_size).padding(toLength: 7, withPad: " ", startingAt: 0),
                              String(format: "%6.2fs", row.lease_lasts_seconds),
                              String(format: "  %9.5f", row.redis_commands_per_claim),
                              String(format: "  %10.1f", row.redis_commands_per_second),
                              String(format: "  %10d", row.tokens_at_risk_per_host_crash),
                              String(format: "  %10d", row.tokens_at_risk_all_hosts),
                              String(format: "  %8.0f ms", row.tail_delay_without_recall_ms)].joined() + mark)
            }
            print("")
            print("  at risk: stock a host holds (a lease and its refill) that is stranded until the lease expires and")
            print("  reconciliation reclaims it (or the host restarts and returns it from its journal).")
            print("  tail delay: how long the last tokens on a host would wait for a claim there; a recall cuts it to a")
            print("  few ms for claims on other hosts (up to limits.tail_wait_ms).")
            print("  apply: quotactl lease set --voucher \(id) --region \(name) --min \(advice.suggestion) --max \(advice.suggestion)")
        }

        /// The table. Per lease size L at a per-host rate r = rate / hosts: a lease lasts L / r s; Redis
        /// commands per second are the leases (rate / L, each closing the previous one in the same call),
        /// their renewals (one per `ttl - margin - renew_ahead` s a lease lives past its first), and each
        /// host's refresh and heartbeat (2 per second); at risk per host is a lease plus its refill
        /// (L × (1 + low_watermark)), capped by the pool's share; the tail delay is L / (2r).
        static func advise(voucher: String, region: String, rate: Double, rateSource: String, hosts: Int, pool: Int,
                           limit: Int, policy: LeasePolicy) -> Advice {
            let perHost = rate / Double(hosts)
            let current = policy.leaseSize(rate: perHost)
            var sizes = Swift.Set([1, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 20_000, 50_000, 100_000])
            sizes.insert(current)
            let cap = max(1, limit)
            let candidates = sizes.filter { $0 <= cap }.sorted()
            let serve = (policy.ttl - policy.safetyMargin - policy.renewAhead).seconds
            var rows: [Row] = []
            for l in candidates {
                let lasts = Double(l) / perHost
                let renewals = serve > 0 && lasts > serve ? ((lasts - serve) / serve).rounded(.up) : 0
                let perSecond = rate / Double(l) * (1 + renewals) + 2 * Double(hosts)
                let risk = min(Int((Double(l) * (1 + policy.lowWatermark)).rounded(.up)), max(1, limit / hosts))
                rows.append(Row(lease_size: l, lease_lasts_seconds: lasts, redis_commands_per_claim: perSecond / rate,
                                redis_commands_per_second: perSecond, tokens_at_risk_per_host_crash: risk,
                                tokens_at_risk_all_hosts: min(limit, risk * hosts),
                                tail_delay_without_recall_ms: lasts / 2 * 1000, current: l == current))
            }
            // Suggest the smallest size at which leases cost at most 1% of a claim per claim, i.e. the hot key
            // is touched about once per hundred claims, and a lease lasts at least a second.
            let suggestion = rows.first { $0.redis_commands_per_claim <= 0.01 + 2 * Double(hosts) / rate && $0.lease_lasts_seconds >= 1 }?
                .lease_size ?? rows.last?.lease_size ?? current
            return Advice(voucher: voucher, region: region, hosts: hosts, rate: rate, rate_source: rateSource, pool: pool,
                          ttl_seconds: policy.ttl.seconds, rows: rows, suggestion: suggestion)
        }
    }
}
