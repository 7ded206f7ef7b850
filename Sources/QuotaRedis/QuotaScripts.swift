/// The Lua scripts that are the quota authority. Each runs atomically in one round trip; every key
/// of one voucher shares the hash tag `{ID}` so a voucher lives in one Redis Cluster slot. Times
/// come from Redis's own clock (`TIME`). docs/accounting.md states what they keep.
///
/// A lease record: `HSET quota:{ID}:leases <id> "<host>|<granted>|<returned>|<restocked>|<expiry-ms>|<state>|<mode>|<req>"`,
/// state `o` (open), `c` (closed by its host), `x` (reclaimed by reconciliation); mode the durability its
/// host answers claims under (`k` kafka, `j` journal, `n` none, empty if unknown). Open leases are in
/// the expiry zset `quota:{ID}:exp`; closed ones in `quota:{ID}:closed` (by close time) until they
/// are archived into the voucher's `archived_*` counters after `closed_retention_ms`.
///
/// Per lease, always: `returned + restocked <= granted`. Per voucher, always:
/// `pool + leased - returned - restocked == limit`.
///
/// Every script that acts for a sidecar takes the voucher generation the sidecar knows (`gen`;
/// empty for operator tools) and answers `{-3, actual}` when Redis holds another one: the voucher
/// was created again, or Redis lost its data. Lease ids come from `lease_seq` and are never reused.
enum QuotaScripts {
    static let now = """
        local t = redis.call('TIME')
        local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
        """

    static let lib = """
        local function parse(v)
          local host, g, r, k, e, st, mode, req = string.match(v, '^([^|]*)|(%d+)|(%d+)|(%d+)|(%d+)|(%a)|(%a?)|(.*)$')
          if not host then return nil end
          return {host = host, g = tonumber(g), r = tonumber(r), k = tonumber(k), e = tonumber(e), st = st, mode = mode, req = req}
        end
        local function fmt(l)
          return l.host .. '|' .. l.g .. '|' .. l.r .. '|' .. l.k .. '|' .. l.e .. '|' .. l.st .. '|' .. (l.mode or '') .. '|' .. l.req
        end
        local function gencheck(meta, gen)
          local g = redis.call('HGET', meta, 'gen')
          if not g then return {-5} end
          if gen ~= '' and g ~= gen then return {-3, g} end
          return nil
        end
        -- Removals that can empty a key (ZREM, HDEL) are deferred to the end of the script (`flush`):
        -- Redis deletes an emptied key, and in a MIGRATING slot Redis Cluster aborts a script that then
        -- touches the missing key ("Script attempted to access a non local key"), after the writes before
        -- it (scripts are not rolled back). So no key is touched after a removal from it.
        local removals, removal_keys = {}, {}
        local function remove_later(cmd, key, member)
          local r = removals[key]
          if not r then
            r = {cmd = cmd, members = {}, skip = {}}
            removals[key] = r
            removal_keys[#removal_keys + 1] = key
          end
          r.members[#r.members + 1] = member
        end
        -- A member written again after its removal was deferred stays (as if removed, then written).
        local function readded(key, member)
          local r = removals[key]
          if r then r.skip[member] = true end
        end
        local function flush()
          for _, key in ipairs(removal_keys) do
            local r, ms = removals[key], {}
            for _, m in ipairs(r.members) do
              if not r.skip[m] then ms[#ms + 1] = m end
            end
            if #ms > 0 then redis.call(r.cmd, key, unpack(ms)) end
          end
        end
        """

    /// A cumulative return of lease `id` by `host` (KEYS[1] meta, KEYS[2] leases, KEYS[3] exp, KEYS[4] closed).
    /// Returns the tokens put back, or nil when the lease is unknown, not this host's, or not open.
    static let applyReturn = """
        local function give_back(id, total, close, host, now)
          local v = redis.call('HGET', KEYS[2], id)
          if not v then return nil, 'gone' end
          local l = parse(v)
          if l.host ~= host then return nil, 'not ours' end
          if l.st ~= 'o' then return nil, 'gone' end
          total = math.min(tonumber(total), l.g - l.k)
          local delta = 0
          if total > l.r then
            delta = total - l.r
            l.r = total
            redis.call('HINCRBY', KEYS[1], 'pool', delta)
            redis.call('HINCRBY', KEYS[1], 'returned', delta)
          end
          if close then
            l.st = 'c'
            redis.call('ZADD', KEYS[4], now, id)
            remove_later('ZREM', KEYS[3], id)
          end
          redis.call('HSET', KEYS[2], id, fmt(l))
          return delta, nil
        end
        """

    /// Archive a few closed leases older than the voucher's retention (KEYS as above, KEYS[5] reqs).
    /// Their removals from `leases`, `reqs` and `closed` are deferred (`flush`); the script treats the
    /// archived request ids as gone (`archived_req`).
    static let archive = """
        local archived_req = {}
        local function archive(now)
          local keep = tonumber(redis.call('HGET', KEYS[1], 'closed_retention_ms') or '604800000')
          local old = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now - keep, 'LIMIT', 0, 8)
          local g, r, k, n = 0, 0, 0, 0
          for _, id in ipairs(old) do
            -- `-<req>`: a request resolved "nothing, ever" (see `lease`): only its `reqs` entry goes.
            local v = string.sub(id, 1, 1) ~= '-' and redis.call('HGET', KEYS[2], id)
            if string.sub(id, 1, 1) == '-' then
              local rq = string.sub(id, 2)
              remove_later('HDEL', KEYS[5], rq)
              archived_req[rq] = true
            elseif v then
              local l = parse(v)
              g, r, k, n = g + l.g, r + l.r, k + l.k, n + 1
              remove_later('HDEL', KEYS[2], id)
              if l.req ~= '' then
                remove_later('HDEL', KEYS[5], l.req)
                archived_req[l.req] = true
              end
            end
            remove_later('ZREM', KEYS[4], id)
          end
          if n > 0 then
            redis.call('HINCRBY', KEYS[1], 'archived_granted', g)
            redis.call('HINCRBY', KEYS[1], 'archived_returned', r)
            redis.call('HINCRBY', KEYS[1], 'archived_restocked', k)
            redis.call('HINCRBY', KEYS[1], 'archived_leases', n)
          end
        end
        """

    /// KEYS: the region marker `quota:region`. ARGV: a new generation id (used if there is none yet).
    /// Reply: the region's generation.
    static let region = """
        \(now)
        redis.call('HSETNX', KEYS[1], 'gen', ARGV[1])
        redis.call('HSETNX', KEYS[1], 'created_ms', now)
        return redis.call('HGET', KEYS[1], 'gen')
        """

    /// KEYS: meta. ARGV: limit, per_user, total_limit, region, gen, closed_retention_ms, start_ms, end_ms
    /// (Redis ms; 0: no schedule).
    static let create = """
        \(now)
        if redis.call('EXISTS', KEYS[1]) == 1 then return {0, 'exists'} end
        local state = ARGV[9]
        if not state or state == '' then state = 'active' end
        redis.call('HSET', KEYS[1], 'limit', ARGV[1], 'allocated', ARGV[1], 'pool', ARGV[1], 'state', state,
          'per_user', ARGV[2], 'total_limit', ARGV[3], 'region', ARGV[4], 'lease_seq', 0,
          'leased', 0, 'returned', 0, 'restocked', 0, 'created_ms', now, 'gen', ARGV[5],
          'closed_retention_ms', ARGV[6], 'start_ms', ARGV[7], 'end_ms', ARGV[8])
        for i = 10, #ARGV - 1, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
        return {1, 'created'}
        """

    /// A sidecar's heartbeat, once per refresh. KEYS: the region's hosts zset, the region's warm list.
    /// ARGV: host, warmup_ms. Records the host as alive (hosts silent for 30 s drop out), and answers
    /// Redis's clock, the number of live hosts, and the vouchers to warm now: those whose warm-list time
    /// (a scheduled opening, or when `quotactl voucher warm` was run) is within the warm-up window, and
    /// not more than an hour ago. Reply: {now_ms, hosts, {voucher, ...}}.
    static let heartbeat = """
        \(now)
        local warm = redis.call('ZRANGEBYSCORE', KEYS[2], now - 3600000, now + tonumber(ARGV[2]), 'LIMIT', 0, 1000)
        redis.call('ZADD', KEYS[1], now, ARGV[1])
        redis.call('PEXPIRE', KEYS[1], 86400000)
        -- The hosts that the trim keeps, counted before it: the trim is the script's last access to the
        -- set (a removal can empty a key; see `lib`).
        local live = redis.call('ZCOUNT', KEYS[1], '(' .. (now - 30000), '+inf')
        redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 30000)
        return {now, live, warm}
        """

    /// Put a voucher on the region's warm list. KEYS: warm list. ARGV: voucher, at_ms (0: now).
    /// Entries older than a day are dropped; the list expires a day after its last write.
    /// Reply: the time it was listed at.
    static let warmAdd = """
        \(now)
        local at = tonumber(ARGV[2])
        if at <= 0 then at = now end
        redis.call('ZADD', KEYS[1], at, ARGV[1])
        redis.call('PEXPIRE', KEYS[1], 86400000 + math.max(0, at - now))
        -- Last: the trim can empty the list (a removal can empty a key; see `lib`).
        redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 86400000)
        return at
        """

    /// KEYS: meta, leases, exp, closed, reqs. Requests answered "nothing, ever" (`want` 0) are also listed in
    /// `closed` as `-<req>`, so that `archive` drops them and their `reqs` entries an hour later (or after
    /// `closed_retention_ms` if shorter; a host that retries a request after longer than that has had its
    /// leases expire meanwhile) (no extra key: a key missing in a MIGRATING slot makes Redis refuse the
    /// script with TRYAGAIN). ARGV: host, want, need, ttl_ms, exhaustion_fraction, req,
    /// gen, mode (`k`|`j`|`n`), warmup_ms, recall (`1`: an empty pool may recall; `0`: not, for a shard
    /// that is not the caller's last resort; see `recall`), then pairs (lease id, returned total) of this host's leases to
    /// close first. The same `req` gets the same answer: the lease it was granted while it is open (with
    /// its remaining ttl, which may be negative), or nothing. `want` 0 only resolves `req` (nothing is
    /// granted to it afterwards).
    ///
    /// Schedule (`start_ms`, `end_ms` on Redis's clock): no lease after the end, nor earlier than
    /// `warmup_ms` before the start (the opening lease is taken in that window).
    ///
    /// The end of the sale: when the pool is empty, other hosts' open leases whose expiry is not more than
    /// 3 s past (`held`: their hosts may still serve or return them) mean the quota is not gone yet: the
    /// voucher's `recall_ms`/`recall_host` are set and `quota:{ID}|host` is published on `quota:recall`
    /// (at most every 50 ms, never before the opening), so that their hosts give back what they do not
    /// need, and the caller asks again. With none held, the pool is exhausted as far as the caller can
    /// get (`abandoned`: leases silent longer, left to reconciliation).
    /// Reply: {1, granted, lease_id, pool_after, ttl_ms} | {0, 0, '', pool, held, abandoned} nothing |
    /// {-2, state} | {-6, 'early'|'ended', start_ms|end_ms, now} outside the schedule |
    /// {-3, gen} another generation | {-5} unknown voucher.
    static let lease = """
        \(lib)
        \(applyReturn)
        \(archive)
        local bad = gencheck(KEYS[1], ARGV[7])
        if bad then return bad end
        \(now)
        local host = ARGV[1]
        local function run()
        for i = 11, #ARGV, 2 do give_back(ARGV[i], ARGV[i + 1], true, host, now) end
        archive(now)
        local m = redis.call('HMGET', KEYS[1], 'state', 'pool', 'start_ms', 'end_ms', 'recall_ms', 'lease_prefix')
        local pool = tonumber(m[2])
        local start_ms, end_ms = tonumber(m[3] or '0') or 0, tonumber(m[4] or '0') or 0
        -- The pool is empty: leases of OTHER hosts that may still serve or return tokens (expiry at most
        -- 3 s past) are recalled; older ones are abandoned (their hosts are silent). The caller's own
        -- leases are its own business: recalling them would only make it give back what it waits for.
        local function empty()
          local held, abandoned = 0, 0
          local ids = redis.call('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES')
          for i = 1, #ids, 2 do
            local v = redis.call('HGET', KEYS[2], ids[i])
            local l = v and parse(v)
            if l and l.host ~= host then
              if tonumber(ids[i + 1]) > now - 3000 then held = held + 1 else abandoned = abandoned + 1 end
            end
          end
          if held > 0 then
            -- Only for claims waiting (need > 0; a refill ahead of demand recalls nobody), not before the
            -- opening (opening leases are meant to be held then), at most every 50 ms (or after Redis's
            -- clock went back).
            local last = tonumber(m[5] or '0') or 0
            if ARGV[10] == '1' and tonumber(ARGV[3]) > 0 and now >= start_ms and (now - last >= 50 or now < last) then
              redis.call('HSET', KEYS[1], 'recall_ms', now, 'recall_host', host)
              redis.call('PUBLISH', 'quota:recall', KEYS[1] .. '|' .. host)
            end
          else
            redis.call('HSET', KEYS[1], 'starved_ms', now)
          end
          return {0, 0, '', 0, held, abandoned}
        end
        local req = ARGV[6]
        local prior = redis.call('HGET', KEYS[5], req)
        if archived_req[req] then prior = nil end
        if prior then
          if prior ~= '-' then
            local v = redis.call('HGET', KEYS[2], prior)
            local l = v and parse(v)
            -- Granted to this request before: answer it again, even if it expired meanwhile (the
            -- sidecar then returns it at once), so a lease granted unseen is never left outstanding.
            if l and l.host == host and l.st == 'o' then
              return {1, l.g, prior, pool, l.e - now}
            end
          end
          if pool <= 0 and tonumber(ARGV[2]) > 0 then return empty() end
          return {0, 0, '', pool}
        end
        local want, need, ttl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
        if want <= 0 then
          redis.call('HSET', KEYS[5], req, '-')
          readded(KEYS[5], req)
          -- Dropped an hour from now (or after the retention, if shorter): scored as if closed earlier.
          local keep = tonumber(redis.call('HGET', KEYS[1], 'closed_retention_ms') or '604800000')
          redis.call('ZADD', KEYS[4], now - math.max(0, keep - 3600000), '-' .. req)
          readded(KEYS[4], '-' .. req)
          return {0, 0, '', pool}
        end
        if m[1] ~= 'active' then return {-2, m[1]} end
        if end_ms > 0 and now >= end_ms then return {-6, 'ended', end_ms, now} end
        if start_ms > 0 and now < start_ms - tonumber(ARGV[9]) then return {-6, 'early', start_ms, now} end
        local n = math.min(want, math.max(need, math.ceil(pool * tonumber(ARGV[5]))))
        n = math.min(n, pool)
        if n <= 0 then return empty() end
        -- A hot-key shard's leases are numbered `<shard>.<n>` (its `lease_prefix`), so a lease id names its shard.
        local id = (m[6] or '') .. tostring(redis.call('HINCRBY', KEYS[1], 'lease_seq', 1))
        redis.call('HINCRBY', KEYS[1], 'pool', -n)
        redis.call('HINCRBY', KEYS[1], 'leased', n)
        local exp = now + ttl
        redis.call('HSET', KEYS[2], id, fmt({host = host, g = n, r = 0, k = 0, e = exp, st = 'o', mode = ARGV[8], req = req}))
        redis.call('ZADD', KEYS[3], exp, id)
        redis.call('HSET', KEYS[5], req, id)
        readded(KEYS[5], req)
        return {1, n, id, pool - n, ttl}
        end
        local out = run()
        flush()
        return out
        """

    /// A recall without a lease (a sharded voucher whose every shard came back empty while other hosts
    /// held leases of some): the LEASE script's recall, on one shard. KEYS: meta. ARGV: host.
    /// Reply: 1 published | 0 not now (before the opening, within 50 ms of the last, unknown voucher).
    static let recall = """
        if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
        \(now)
        local m = redis.call('HMGET', KEYS[1], 'start_ms', 'recall_ms')
        local start_ms, last = tonumber(m[1] or '0') or 0, tonumber(m[2] or '0') or 0
        if now < start_ms or (now - last < 50 and now >= last) then return 0 end
        redis.call('HSET', KEYS[1], 'recall_ms', now, 'recall_host', ARGV[1])
        redis.call('PUBLISH', 'quota:recall', KEYS[1] .. '|' .. ARGV[1])
        return 1
        """

    /// KEYS: meta, leases, exp. ARGV: lease_id, ttl_ms, host, gen.
    /// Reply: {1, ttl_ms} renewed | {-1} expired (not reclaimed) | {0} closed, reclaimed, unknown or not
    /// ours | {-3, gen} | {-5} unknown voucher.
    static let renew = """
        \(lib)
        local bad = gencheck(KEYS[1], ARGV[4])
        if bad then return bad end
        local v = redis.call('HGET', KEYS[2], ARGV[1])
        if not v then return {0} end
        local l = parse(v)
        if l.host ~= ARGV[3] or l.st ~= 'o' then return {0} end
        \(now)
        if l.e <= now then return {-1} end
        -- Past the sale's end nothing more is served: the lease is not renewed (its host returns it).
        local end_ms = tonumber(redis.call('HGET', KEYS[1], 'end_ms') or '0') or 0
        if end_ms > 0 and now >= end_ms then return {-1} end
        l.e = now + tonumber(ARGV[2])
        redis.call('HSET', KEYS[2], ARGV[1], fmt(l))
        redis.call('ZADD', KEYS[3], l.e, ARGV[1])
        return {1, tonumber(ARGV[2])}
        """

    /// KEYS: meta, leases, exp, closed. ARGV: lease_id, returned_total, close(0|1), host, gen.
    /// Reply: {1, tokens put back now} | {0, 0} closed/reclaimed/unknown (nothing changes) |
    /// {-1, 0} not ours | {-3, gen} | {-5, ''} unknown voucher.
    static let giveBack = """
        \(lib)
        \(applyReturn)
        local bad = gencheck(KEYS[1], ARGV[5])
        if bad then return {bad[1], bad[2] or ''} end
        \(now)
        local delta, why = give_back(ARGV[1], ARGV[2], ARGV[3] == '1', ARGV[4], now)
        flush()
        if delta then return {1, delta} end
        if why == 'not ours' then return {-1, 0} end
        return {0, 0}
        """

    /// A cancelled claim's tokens whose lease this host no longer holds: back to the pool, once per
    /// claim id, through each lease's record (`restocked`), never past `granted - returned`.
    /// KEYS: meta, leases, restocked (zset claim id → ms). ARGV: claim_id, claim ts_ms, horizon_ms,
    /// host, gen, then pairs (lease id, tokens). Markers older than the horizon are dropped (and the set
    /// expires a horizon after its newest marker), and a restock of a claim cancelled longer ago than the
    /// horizon is refused (left to reconciliation).
    /// Reply: {1, tokens put back} | {0, 0} already done | {-4, 0} too old | {-3, gen} | {-5} unknown voucher.
    static let restock = """
        \(lib)
        local bad = gencheck(KEYS[1], ARGV[5])
        if bad then return bad end
        \(now)
        local horizon = tonumber(ARGV[3])
        -- Markers older than the horizon are dropped last, on every path (a removal can empty a key; see
        -- `lib`); until then one counts only while the trim would keep it.
        local function trim() redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - horizon) end
        local done = tonumber(redis.call('ZSCORE', KEYS[3], ARGV[1]) or '')
        if done and done > now - horizon then
          trim()
          return {0, 0}
        end
        if now - tonumber(ARGV[2]) > horizon - 60000 then
          trim()
          return {-4, 0}
        end
        local total = 0
        for i = 6, #ARGV, 2 do
          local v = redis.call('HGET', KEYS[2], ARGV[i])
          if v then
            local l = parse(v)
            if l.host == ARGV[4] and l.st ~= 'x' then
              local q = math.min(tonumber(ARGV[i + 1]), l.g - l.r - l.k)
              if q > 0 then
                l.k = l.k + q
                total = total + q
                redis.call('HSET', KEYS[2], ARGV[i], fmt(l))
              end
            end
          end
        end
        redis.call('HINCRBY', KEYS[1], 'pool', total)
        redis.call('HINCRBY', KEYS[1], 'restocked', total)
        redis.call('ZADD', KEYS[3], now, ARGV[1])
        -- Every marker is dropped `horizon` after it was written, so the set can go with its newest one.
        redis.call('PEXPIRE', KEYS[3], horizon)
        trim()
        return {1, total}
        """

    /// Reconciliation reclaims an open lease whose host is gone: once its expiry (Redis's clock) is more
    /// than `grace_ms` past, it gives back everything the lease did not sell, `granted - restocked - sold`
    /// (cumulative, like a return), and marks it reclaimed (`x`): it can be neither renewed nor returned
    /// again, and restocks through it are refused. With `forfeit` it is marked reclaimed and gives back
    /// nothing (its unproven tokens are written off: under-issue, never oversell).
    /// KEYS: meta, leases, exp, closed. ARGV: lease_id, sold (net, proven), grace_ms, forfeit(0|1).
    /// Reply: {1, tokens put back} | {0, state} not open: nothing changes | {-1, ms to wait} not expired
    /// long enough | {-2, most it can have sold} `sold` is more than the lease can have sold: refused |
    /// {-4} unknown lease | {-5} unknown voucher.
    static let reclaim = """
        \(lib)
        if redis.call('EXISTS', KEYS[1]) == 0 then return {-5} end
        local v = redis.call('HGET', KEYS[2], ARGV[1])
        if not v then return {-4} end
        local l = parse(v)
        if l.st ~= 'o' then return {0, l.st} end
        \(now)
        local due = l.e + tonumber(ARGV[3])
        if now < due then return {-1, due - now} end
        local delta = 0
        if ARGV[4] ~= '1' then
          local total = l.g - l.k - tonumber(ARGV[2])
          if total < l.r then return {-2, l.g - l.k - l.r} end
          delta = total - l.r
          l.r = total
          redis.call('HINCRBY', KEYS[1], 'pool', delta)
          redis.call('HINCRBY', KEYS[1], 'returned', delta)
        end
        l.st = 'x'
        redis.call('HSET', KEYS[2], ARGV[1], fmt(l))
        redis.call('ZADD', KEYS[4], now, ARGV[1])
        redis.call('ZREM', KEYS[3], ARGV[1])
        return {1, delta}
        """

    /// Transfers of unleased quota between regions (`quotactl rebalance`). A record in
    /// `quota:{ID}:transfers`: `HSET <transfer id> "<dir>|<peer region>|<amount>|<state>|<ms>|<peer gen>"`,
    /// dir `out` (this region gave) or `in` (this region received), state `t` taken (the source's side,
    /// not yet confirmed delivered) or `d` done. The region's allocation is `limit`; `allocated` is the
    /// allocation it was created with, `sent` and `received` the sums of its out and in records, so that
    /// `limit == allocated - sent + received` and R1 (`pool + leased - returned - restocked == limit`) hold
    /// after every step.
    static let transferLib = """
        local function tparse(v)
          local dir, peer, n, st, ts, pg = string.match(v, '^(%a+)|([^|]*)|(%d+)|(%a)|(%d+)|(.*)$')
          if not dir then return nil end
          return {dir = dir, peer = peer, n = tonumber(n), st = st, ts = ts, pg = pg}
        end
        local function tfmt(t)
          return t.dir .. '|' .. t.peer .. '|' .. t.n .. '|' .. t.st .. '|' .. t.ts .. '|' .. t.pg
        end
        """

    /// Step 1, in the source region: take `amount` from the pool and the allocation, record the transfer
    /// `taken`. Once per transfer id: a second call answers the record and changes nothing.
    /// KEYS: meta, transfers. ARGV: transfer id, destination region, amount, gen, destination's gen.
    /// Reply: {1, record} taken now | {2, record} taken before (the same destination and amount) | {-7, pool}
    /// the pool has less than `amount`: nothing changed | {-8, record} the id is recorded here otherwise (an
    /// `in` record, or `out` to another region or amount): nothing changed | {-3, gen} | {-5} unknown voucher.
    static let transferTake = """
        \(lib)
        \(transferLib)
        local bad = gencheck(KEYS[1], ARGV[4])
        if bad then return bad end
        local n = tonumber(ARGV[3])
        local prior = redis.call('HGET', KEYS[2], ARGV[1])
        if prior then
          -- Only this transfer's own `out` record makes a re-run; any other record of the id (an `in`
          -- one: the id was used the other way) is a conflict: nothing changed.
          local p = tparse(prior)
          if p and p.dir == 'out' and p.peer == ARGV[2] and p.n == n then return {2, prior} end
          return {-8, prior}
        end
        local m = redis.call('HMGET', KEYS[1], 'pool', 'limit')
        local pool, limit = tonumber(m[1]), tonumber(m[2])
        if n > pool then return {-7, pool} end
        \(now)
        redis.call('HSETNX', KEYS[1], 'allocated', limit)
        redis.call('HINCRBY', KEYS[1], 'pool', -n)
        redis.call('HINCRBY', KEYS[1], 'limit', -n)
        redis.call('HINCRBY', KEYS[1], 'sent', n)
        local rec = tfmt({dir = 'out', peer = ARGV[2], n = n, st = 't', ts = now, pg = ARGV[5]})
        redis.call('HSET', KEYS[2], ARGV[1], rec)
        return {1, rec}
        """

    /// Step 2, in the destination region: add `amount` to the pool and the allocation, record the transfer
    /// received. Once per transfer id: a re-run never adds twice.
    /// KEYS: meta, transfers. ARGV: transfer id, source region, amount, gen.
    /// Reply: {1, record} given now | {2, record} given before (nothing changed) | {-8, record} this region
    /// holds an `out` record of the id (used the other way): nothing changed | {-3, gen} | {-5}.
    static let transferGive = """
        \(lib)
        \(transferLib)
        local bad = gencheck(KEYS[1], ARGV[4])
        if bad then return bad end
        local prior = redis.call('HGET', KEYS[2], ARGV[1])
        if prior then
          -- An `out` record of the id here: the id was used the other way (this region is its source):
          -- a conflict, nothing changed.
          local p = tparse(prior)
          if not p or p.dir == 'out' then return {-8, prior} end
          return {2, prior}
        end
        local n = tonumber(ARGV[3])
        \(now)
        redis.call('HSETNX', KEYS[1], 'allocated', redis.call('HGET', KEYS[1], 'limit'))
        redis.call('HINCRBY', KEYS[1], 'pool', n)
        redis.call('HINCRBY', KEYS[1], 'limit', n)
        redis.call('HINCRBY', KEYS[1], 'received', n)
        local rec = tfmt({dir = 'in', peer = ARGV[2], n = n, st = 'd', ts = now, pg = ''})
        redis.call('HSET', KEYS[2], ARGV[1], rec)
        return {1, rec}
        """

    /// Step 3, in the source region: mark the transfer done (the destination has it).
    /// KEYS: meta, transfers. ARGV: transfer id, gen.
    /// Reply: {1} marked now | {0} done before | {-4} no such outgoing transfer | {-3, gen} | {-5}.
    static let transferDone = """
        \(lib)
        \(transferLib)
        local bad = gencheck(KEYS[1], ARGV[2])
        if bad then return bad end
        local v = redis.call('HGET', KEYS[2], ARGV[1])
        local t = v and tparse(v)
        if not t or t.dir ~= 'out' then return {-4} end
        if t.st == 'd' then return {0} end
        t.st = 'd'
        redis.call('HSET', KEYS[2], ARGV[1], tfmt(t))
        return {1}
        """

    /// Rebuild one voucher's state from the ledger (`quotactl rehydrate`), atomically. Refused when the
    /// voucher exists (a live voucher is never overwritten). KEYS: meta, leases, exp, reqs. ARGV: one JSON
    /// object: the meta fields (`fields`: name → value) and the leases open at the loss (`leases`: id,
    /// host, granted, restocked), recreated open and already expired so that their hosts can return them
    /// on their journal's word, or reconciliation reclaim them with proof.
    /// Reply: 1 | 0 exists.
    static let rehydrate = """
        \(lib)
        if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
        local s = cjson.decode(ARGV[1])
        \(now)
        for k, v in pairs(s.fields) do redis.call('HSET', KEYS[1], k, tostring(v)) end
        for _, l in ipairs(s.leases) do
          redis.call('HSET', KEYS[2], l.id, fmt({host = l.host, g = l.granted, r = 0, k = l.restocked, e = now, st = 'o',
            mode = l.mode, req = ''}))
          redis.call('ZADD', KEYS[3], now, l.id)
        end
        return 1
        """

    /// KEYS: meta. ARGV: field, value, field, value, ... Only on an existing voucher.
    static let setFields = """
        if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
        redis.call('HSET', KEYS[1], unpack(ARGV))
        return 1
        """

    /// Per-user checks of many claims, in order. KEYS: pairs of (counts hash `quota:u:{ID:g}`, markers
    /// hash `quota:u:{ID:g}:m`). ARGV: quintuples (key pair index, limit, user, qty, claim_id).
    /// Reply: one entry per claim: 1 counted, 0 over the limit, 2 released (the claim was given up and
    /// its count released before this check ran: it is never counted). A claim already counted (its
    /// marker holds its quantity) answers 1 again without counting twice. Markers live a week after
    /// their hash's last write.
    static let userCheck = """
        local out = {}
        local touched = {}
        for i = 1, #ARGV, 5 do
          local j = tonumber(ARGV[i]) * 2 - 1
          local k, mk = KEYS[j], KEYS[j + 1]
          -- The quantity stays the decimal string it came as: a Lua number passed to redis.call is
          -- formatted with printf (%.17g), which was a visible part of Redis's time per check.
          local lim, u, qs, c = tonumber(ARGV[i + 1]), ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
          local prior = redis.call('HGET', mk, c)
          if prior == '-' then
            out[#out + 1] = 2
          elseif prior then
            out[#out + 1] = 1
          elseif redis.call('HINCRBY', k, u, qs) > lim then
            redis.call('HINCRBY', k, u, '-' .. qs)
            out[#out + 1] = 0
          else
            redis.call('HSET', mk, c, qs)
            out[#out + 1] = 1
            touched[mk] = true
          end
        end
        for mk in pairs(touched) do redis.call('PEXPIRE', mk, 604800000) end
        return out
        """

    /// Undo a claim's per-user count (UNCLAIM, or a claim that did not complete). KEYS: counts hash,
    /// markers hash. ARGV: user, claim_id. The marker becomes a tombstone `-`, so a check of the same
    /// claim that runs later (its reply was lost, it was still queued) can never count it again.
    /// Reply: the quantity released (0 if it was not counted or already released).
    static let userRelease = """
        local q = redis.call('HGET', KEYS[2], ARGV[2])
        if q == '-' then return 0 end
        redis.call('HSET', KEYS[2], ARGV[2], '-')
        redis.call('PEXPIRE', KEYS[2], 604800000)
        if not q then return 0 end
        local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -tonumber(q))
        if n <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
        return tonumber(q)
        """
}
