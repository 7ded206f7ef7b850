/// The Lua scripts that are the quota authority. Each runs atomically in one
/// round trip; every key of one voucher shares the hash tag `{ID}` so a voucher
/// lives in one Redis Cluster slot. Times come from Redis's own clock (`TIME`).
///
/// Lease records: `HSET quota:{ID}:leases <lease-id> "<host>|<granted>|<returned>|<expiry-ms>"`,
/// and the expiry in `ZADD quota:{ID}:exp`. Returns carry the *cumulative* returned count,
/// so a retried return changes nothing; a closed lease is deleted, so it can be neither
/// renewed nor returned again. Lease ids come from the voucher's `lease_seq` and are never reused.
enum QuotaScripts {
    static let now = """
        local t = redis.call('TIME')
        local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
        """

    static let parseLease = """
        local function parse(v)
          local host, g, r, e = string.match(v, '^(.*)|(%d+)|(%d+)|(%d+)$')
          return host, tonumber(g), tonumber(r), tonumber(e)
        end
        """

    /// KEYS: meta. ARGV: limit, per_user, total_limit, region.
    static let create = """
        \(now)
        if redis.call('EXISTS', KEYS[1]) == 1 then return {0, 'exists'} end
        redis.call('HSET', KEYS[1], 'limit', ARGV[1], 'pool', ARGV[1], 'state', 'active',
          'per_user', ARGV[2], 'total_limit', ARGV[3], 'region', ARGV[4], 'lease_seq', 0,
          'leased', 0, 'returned', 0, 'created_ms', now)
        return {1, 'created'}
        """

    /// KEYS: meta, leases, exp. ARGV: host, want, need, ttl_ms, exhaustion_fraction, then ids of this
    /// host's fully served leases to close (nothing goes back to the pool for them).
    /// Reply: {1, granted, lease_id, pool_after, ttl_ms} | {0, 0, '', 0} sold out | {-1} unknown | {-2, state}.
    static let lease = """
        \(parseLease)
        for i = 6, #ARGV do
          local v = redis.call('HGET', KEYS[2], ARGV[i])
          if v then
            local host = parse(v)
            if host == ARGV[1] then
              redis.call('HDEL', KEYS[2], ARGV[i])
              redis.call('ZREM', KEYS[3], ARGV[i])
            end
          end
        end
        local m = redis.call('HMGET', KEYS[1], 'state', 'pool')
        if not m[1] then return {-1} end
        if m[1] ~= 'active' then return {-2, m[1]} end
        \(now)
        local pool = tonumber(m[2])
        local want, need, ttl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
        local n = math.min(want, math.max(need, math.ceil(pool * tonumber(ARGV[5]))))
        n = math.min(n, pool)
        if n <= 0 then
          redis.call('HSET', KEYS[1], 'starved_ms', now)
          return {0, 0, '', 0}
        end
        local id = redis.call('HINCRBY', KEYS[1], 'lease_seq', 1)
        redis.call('HINCRBY', KEYS[1], 'pool', -n)
        redis.call('HINCRBY', KEYS[1], 'leased', n)
        local exp = now + ttl
        redis.call('HSET', KEYS[2], id, ARGV[1] .. '|' .. n .. '|0|' .. exp)
        redis.call('ZADD', KEYS[3], exp, id)
        return {1, n, tostring(id), pool - n, ttl}
        """

    /// KEYS: meta, leases, exp. ARGV: lease_id, ttl_ms, host.
    /// Reply: {1, ttl_ms} renewed | {-1} expired (not reclaimed) | {0} closed, reclaimed, unknown or not ours.
    static let renew = """
        \(parseLease)
        local v = redis.call('HGET', KEYS[2], ARGV[1])
        if not v then return {0} end
        local host, g, r, e = parse(v)
        if host ~= ARGV[3] then return {0} end
        \(now)
        if e <= now then return {-1} end
        local exp = now + tonumber(ARGV[2])
        redis.call('HSET', KEYS[2], ARGV[1], host .. '|' .. g .. '|' .. r .. '|' .. exp)
        redis.call('ZADD', KEYS[3], exp, ARGV[1])
        return {1, tonumber(ARGV[2])}
        """

    /// KEYS: meta, leases, exp. ARGV: lease_id, returned_total, close(0|1), host.
    /// Reply: {1, tokens put back now} | {0, 0} closed/reclaimed/unknown (nothing changes) | {-1, 0} not ours.
    static let giveBack = """
        \(parseLease)
        local v = redis.call('HGET', KEYS[2], ARGV[1])
        if not v then return {0, 0} end
        local host, g, r, e = parse(v)
        if host ~= ARGV[4] then return {-1, 0} end
        local total = math.min(tonumber(ARGV[2]), g)
        local delta = 0
        if total > r then
          delta = total - r
          r = total
          redis.call('HINCRBY', KEYS[1], 'pool', delta)
          redis.call('HINCRBY', KEYS[1], 'returned', delta)
        end
        if ARGV[3] == '1' then
          redis.call('HDEL', KEYS[2], ARGV[1])
          redis.call('ZREM', KEYS[3], ARGV[1])
        else
          redis.call('HSET', KEYS[2], ARGV[1], host .. '|' .. g .. '|' .. r .. '|' .. e)
        end
        return {1, delta}
        """

    /// KEYS: meta. ARGV: field, value, field, value, ... Only on an existing voucher.
    static let setFields = """
        if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
        redis.call('HSET', KEYS[1], unpack(ARGV))
        return 1
        """

    /// Per-user checks of many claims, in order. KEYS: the group hashes `quota:u:{ID:g}` involved.
    /// ARGV: then quadruples (key index, limit, user, qty|claim_id)... as: idx, limit, user, qty, claim_id.
    /// Reply: one entry per claim: 1 counted, 0 over the limit. A claim already counted (marker
    /// `#claim_id` present) answers 1 again without counting twice. Two commands per counted claim.
    static let userCheck = """
        local out = {}
        for i = 1, #ARGV, 5 do
          local k = KEYS[tonumber(ARGV[i])]
          local lim, u, q, c = tonumber(ARGV[i + 1]), ARGV[i + 2], tonumber(ARGV[i + 3]), ARGV[i + 4]
          if redis.call('HSETNX', k, '#' .. c, q) == 0 then
            out[#out + 1] = 1
          elseif redis.call('HINCRBY', k, u, q) > lim then
            redis.call('HINCRBY', k, u, -q)
            redis.call('HDEL', k, '#' .. c)
            out[#out + 1] = 0
          else
            out[#out + 1] = 1
          end
        end
        return out
        """

    /// Undo a claim's per-user count (UNCLAIM, or a claim that did not complete). KEYS: group hash.
    /// ARGV: user, claim_id. Reply: the quantity released (0 if it was not counted or already released).
    static let userRelease = """
        local q = redis.call('HGET', KEYS[1], '#' .. ARGV[2])
        if not q then return 0 end
        redis.call('HDEL', KEYS[1], '#' .. ARGV[2])
        local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -tonumber(q))
        if n <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
        return tonumber(q)
        """

    /// Put a cancelled claim's tokens back into the pool when their lease is already closed.
    /// KEYS: meta, restocked set. ARGV: claim_id, qty. Once per claim id. Reply: tokens put back.
    static let restock = """
        if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
        redis.call('HINCRBY', KEYS[1], 'pool', tonumber(ARGV[2]))
        redis.call('HINCRBY', KEYS[1], 'restocked', tonumber(ARGV[2]))
        return tonumber(ARGV[2])
        """
}
