"""The Redis limiter's Lua scripts: each runs atomically inside Redis, on Redis's own clock.

Keys of one inference key share the hash tag ``{<key id>}``, so every script touches one slot (Redis
Cluster). Layout, for key ``K`` (all with a TTL but the revocation marker, see docs/limits.md):

    qg:{K}:revoked   string  set when the key is revoked, checked by every admission
    qg:{K}:rpm       zset    admission id -> admission time (µs)
    qg:{K}:tpm       zset    reservation id -> admission time (µs)
    qg:{K}:tpmh      hash    reservation id -> tokens (reserved, then actual); "_s" -> their sum
    qg:{K}:pend      hash    reservation id -> "<reserved>:<budget period start or 0>" until settled
    qg:{K}:b:<p>     hash    budget of period kind <p>: "s" period start, "u" used, "r" reserved

Times are microseconds (Lua numbers are doubles: exact up to 2^53 µs, beyond the year 2255).
"""

from __future__ import annotations

import hashlib

# Shared helpers: UTC calendar periods with integer arithmetic, the same as limits/periods.py.
PERIODS_LUA = r"""
local function fdiv(a, b) return math.floor(a / b) end

local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = fdiv(y, 400)
  local yoe = y - era * 400
  local mp = m + 9
  if m > 2 then mp = m - 3 end
  local doy = fdiv(153 * mp + 2, 5) + d - 1
  local doe = yoe * 365 + fdiv(yoe, 4) - fdiv(yoe, 100) + doy
  return era * 146097 + doe - 719468
end

local function civil_from_days(z)
  z = z + 719468
  local era = fdiv(z, 146097)
  local doe = z - era * 146097
  local yoe = fdiv(doe - fdiv(doe, 1460) + fdiv(doe, 36524) - fdiv(doe, 146096), 365)
  local doy = doe - (365 * yoe + fdiv(yoe, 4) - fdiv(yoe, 100))
  local mp = fdiv(5 * doy + 2, 153)
  local m = mp - 9
  if mp < 10 then m = mp + 3 end
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end

-- [start, end) in Unix seconds of the UTC period holding second t (weeks start Monday).
local function bounds(period, t)
  if period == 'minute' then local s = t - t % 60; return s, s + 60 end
  if period == 'hour' then local s = t - t % 3600; return s, s + 3600 end
  local days = fdiv(t, 86400)
  if period == 'day' then return days * 86400, (days + 1) * 86400 end
  if period == 'week' then
    local monday = days - (days + 3) % 7
    return monday * 86400, (monday + 7) * 86400
  end
  local y, m = civil_from_days(days)
  local first = days_from_civil(y, m, 1)
  local nxt
  if m == 12 then nxt = days_from_civil(y + 1, 1, 1) else nxt = days_from_civil(y, m + 1, 1) end
  return first * 86400, nxt * 86400
end

local function clock(override)
  if override ~= '' then return tonumber(override) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- Drop the tokens window's entries at or before cutoff; returns the window's token sum.
local function prune_tokens(tz, th, cutoff)
  local sum = tonumber(redis.call('HGET', th, '_s') or '0')
  local old = redis.call('ZRANGEBYSCORE', tz, '-inf', cutoff)
  if #old > 0 then
    for i = 1, #old, 500 do
      local chunk = {unpack(old, i, math.min(i + 499, #old))}
      local toks = redis.call('HMGET', th, unpack(chunk))
      for j = 1, #toks do sum = sum - (tonumber(toks[j]) or 0) end
      redis.call('HDEL', th, unpack(chunk))
    end
    redis.call('ZREMRANGEBYSCORE', tz, '-inf', cutoff)
    if sum < 0 then sum = 0 end
    redis.call('HSET', th, '_s', sum)
  end
  return sum
end

local function oldest(z, now)
  local e = redis.call('ZRANGE', z, 0, 0, 'WITHSCORES')
  if #e == 0 then return 0 end
  return tonumber(e[2]) + 60000000 - now
end

local function budget(bk, period, now)
  local bstart, bend = bounds(period, fdiv(now, 1000000))
  local b = redis.call('HMGET', bk, 's', 'u', 'r')
  if tonumber(b[1]) == bstart then return bstart, bend, tonumber(b[2]) or 0, tonumber(b[3]) or 0 end
  return bstart, bend, 0, 0
end
"""

# Settling one reservation: replace its reserved tokens by the actual ones, once. ``actual`` < 0
# cancels the admission instead: its caller never got the reply (Redis went away between running the
# script and answering) and refused the request, so it is taken out of every window and the budget, and
# a tombstone ('c', kept 61 s) makes the admission refuse itself should it still be queued in Redis.
SETTLE_LUA = r"""
local function settle_one(rz, pend, tz, th, bk, id, actual)
  local v = redis.call('HGET', pend, id)
  if actual < 0 then
    redis.call('ZREM', rz, id)
    redis.call('HSET', pend, id, 'c')
    if redis.call('PTTL', pend) < 61000 then redis.call('PEXPIRE', pend, 61000) end
  elseif v then
    redis.call('HDEL', pend, id)
  end
  if not v or v == 'c' then return 0 end
  local sep = string.find(v, ':', 1, true)
  local reserved, bstart = tonumber(string.sub(v, 1, sep - 1)), tonumber(string.sub(v, sep + 1))
  local a = actual
  if a < 0 then a = 0 end
  if redis.call('ZSCORE', tz, id) then
    local before = tonumber(redis.call('HGET', th, id) or reserved)
    if actual < 0 then
      redis.call('ZREM', tz, id)
      redis.call('HDEL', th, id)
    else
      redis.call('HSET', th, id, a)
    end
    redis.call('HINCRBY', th, '_s', a - before)
  end
  -- Only the counter of the admission's own period: after a rollover the old one is gone or replaced.
  if bstart > 0 and tonumber(redis.call('HGET', bk, 's')) == bstart then
    redis.call('HINCRBY', bk, 'r', -reserved)
    redis.call('HINCRBY', bk, 'u', a)
  end
  return 1
end
"""

# KEYS: rpm, pend, tpm, tpmh, budget (of the admission's period kind)
# ARGV: reservation id, actual tokens (-1: cancel).  Returns 1 if applied, 0 if already settled (or
# forgotten).
SETTLE = SETTLE_LUA + r"""
return settle_one(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[1], tonumber(ARGV[2]))
"""

# KEYS: revoked, rpm, tpm, tpmh, pend, budget
# ARGV: prompt, max_completion, min_completion, rpm, tpm, limit (0 = none), period, id, now override (''),
#       n, then n pairs (reservation id, actual tokens): this key's queued settlements, applied first
# An admission is idempotent per id (redis-py re-sends a command whose reply timed out): a second run
# answers as the first did without counting again, and one already cancelled refuses itself.
# Returns {admitted, refusal (0 none, 1 rate, 2 budget, 3 revoked, 4 cancelled), retry µs, granted (-1: none),
#          reserved, requests in window, requests reset µs, tokens in window, tokens reset µs,
#          budget used, budget reserved, budget end (s), now µs}
ADMIT = PERIODS_LUA + SETTLE_LUA + r"""
local W = 60000000
local now = clock(ARGV[9])
for i = 1, tonumber(ARGV[10] or '0') do
  settle_one(KEYS[2], KEYS[5], KEYS[3], KEYS[4], KEYS[6], ARGV[9 + 2 * i], tonumber(ARGV[10 + 2 * i]))
end
if redis.call('EXISTS', KEYS[1]) == 1 then return {0, 3, 0, -1, 0, 0, 0, 0, 0, 0, 0, 0, now} end
local prompt, maxc, minc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local rpm, tpm, limit, period, id = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7], ARGV[8]
if rpm == 0 and tpm == 0 and limit == 0 then return {1, 0, 0, -1, 0, 0, 0, 0, 0, 0, 0, 0, now} end
local prev = redis.call('HGET', KEYS[5], id)
if prev == 'c' then return {0, 4, 0, -1, 0, 0, 0, 0, 0, 0, 0, 0, now} end
if prev or (rpm > 0 and redis.call('ZSCORE', KEYS[2], id)) then
  local reserved, granted = 0, -1
  if prev then
    reserved = tonumber(string.sub(prev, 1, string.find(prev, ':', 1, true) - 1))
    granted = reserved - prompt
  end
  local pb, pe, pu, pr = 0, 0, 0, 0
  if limit > 0 then pb, pe, pu, pr = budget(KEYS[6], period, now) end
  return {1, 0, 0, granted, reserved, redis.call('ZCARD', KEYS[2]), 0,
          tonumber(redis.call('HGET', KEYS[4], '_s') or '0'), 0, pu, pr, pe, now}
end
local cutoff = now - W
local refusal, retry, granted = 0, 0, maxc
local nreq, tsum, bstart, bend, bused, bres = 0, 0, 0, 0, 0, 0

if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', cutoff)
  nreq = redis.call('ZCARD', KEYS[2])
  if nreq >= rpm then
    local e = redis.call('ZRANGE', KEYS[2], nreq - rpm, nreq - rpm, 'WITHSCORES')
    refusal, retry = 1, tonumber(e[2]) + W - now
  end
end

if tpm > 0 then
  tsum = prune_tokens(KEYS[3], KEYS[4], cutoff)
  local room = tpm - tsum - prompt
  if room < minc then
    refusal = 1
    local need = prompt + minc
    local wait = W
    if need <= tpm then
      -- walk the window from its oldest entry until enough tokens would have left it
      local excess, freed, i = tsum + need - tpm, 0, 0
      while wait == W do
        local es = redis.call('ZRANGE', KEYS[3], i, i + 99, 'WITHSCORES')
        if #es == 0 then break end
        local ids = {}
        for j = 1, #es, 2 do ids[#ids + 1] = es[j] end
        local toks = redis.call('HMGET', KEYS[4], unpack(ids))
        for j = 1, #ids do
          freed = freed + (tonumber(toks[j]) or 0)
          if freed >= excess then wait = tonumber(es[2 * j]) + W - now; break end
        end
        i = i + 100
      end
    end
    if wait > retry then retry = wait end
  end
  if room < granted then granted = room end
end

if limit > 0 then
  bstart, bend, bused, bres = budget(KEYS[6], period, now)
  local room = limit - bused - bres - prompt
  if room < minc then
    refusal = 2
    local wait = bend * 1000000 - now
    if wait > retry then retry = wait end
  end
  if room < granted then granted = room end
end

if refusal ~= 0 then
  local rr, tr = 0, 0
  if rpm > 0 then rr = oldest(KEYS[2], now) end
  if tpm > 0 then tr = oldest(KEYS[3], now) end
  return {0, refusal, retry, -1, 0, nreq, rr, tsum, tr, bused, bres, bend, now}
end

local rr, tr = 0, 0
if rpm > 0 then
  redis.call('ZADD', KEYS[2], now, id)
  redis.call('PEXPIRE', KEYS[2], 61000)
  nreq = nreq + 1
  rr = oldest(KEYS[2], now)
end
if tpm == 0 and limit == 0 then return {1, 0, 0, -1, 0, nreq, rr, 0, 0, 0, 0, 0, now} end

local reserved = prompt + granted
local keep = 61000
if tpm > 0 then
  tsum = tsum + reserved
  redis.call('ZADD', KEYS[3], now, id)
  redis.call('HSET', KEYS[4], id, reserved, '_s', tsum)
  redis.call('PEXPIRE', KEYS[3], 61000)
  redis.call('PEXPIRE', KEYS[4], 61000)
  tr = oldest(KEYS[3], now)
end
if limit > 0 then
  bres = bres + reserved
  redis.call('HSET', KEYS[6], 's', bstart, 'u', bused, 'r', bres)
  -- The counter lives a minute past its period (a settle just after the end still finds it). TTLs
  -- are relative to the script's clock, which is Redis's own except in tests.
  keep = (bend + 60) * 1000 - fdiv(now, 1000)
  redis.call('PEXPIRE', KEYS[6], keep)
end
redis.call('HSET', KEYS[5], id, reserved .. ':' .. bstart)
if redis.call('PTTL', KEYS[5]) < keep then redis.call('PEXPIRE', KEYS[5], keep) end
return {1, 0, 0, granted, reserved, nreq, rr, tsum, tr, bused, bres, bend, now}
"""

# Extending a reservation while its request runs (a stream's completion, block by block).
# KEYS: tpm, tpmh, pend, budget (of the reservation's period kind)
# ARGV: reservation id, tokens wanted, tpm (0 = none), limit (0 = none), now override ('')
# Returns the tokens added (0: nothing left, or the reservation is settled or unknown). Not idempotent: a
# reply lost and the command sent again reserves twice, which only holds back tokens until the settle.
EXTEND = PERIODS_LUA + r"""
local v = redis.call('HGET', KEYS[3], ARGV[1])
if not v or v == 'c' then return 0 end
local sep = string.find(v, ':', 1, true)
local reserved, bstart = tonumber(string.sub(v, 1, sep - 1)), tonumber(string.sub(v, sep + 1))
local room, tpm, limit = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local windowed = false
if tpm > 0 and redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  local tsum = prune_tokens(KEYS[1], KEYS[2], clock(ARGV[5]) - 60000000)
  -- Still in the window after pruning: its tokens count at its admission time, so the window's limit holds.
  if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
    windowed = true
    if tpm - tsum < room then room = tpm - tsum end
  end
end
local budgeted = limit > 0 and bstart > 0 and tonumber(redis.call('HGET', KEYS[4], 's')) == bstart
if budgeted then
  local b = redis.call('HMGET', KEYS[4], 'u', 'r')
  local left = limit - (tonumber(b[1]) or 0) - (tonumber(b[2]) or 0)
  if left < room then room = left end
end
if room <= 0 then return 0 end
redis.call('HSET', KEYS[3], ARGV[1], (reserved + room) .. ':' .. bstart)
if windowed then
  redis.call('HINCRBY', KEYS[2], ARGV[1], room)
  redis.call('HINCRBY', KEYS[2], '_s', room)
end
if budgeted then redis.call('HINCRBY', KEYS[4], 'r', room) end
return room
"""

# KEYS: rpm, tpm, tpmh, budget.  ARGV: period ('' = no budget), now override ('').
# Returns {requests in window, tokens in window, budget used, budget reserved, budget end (s)}.
STATE = PERIODS_LUA + r"""
local now = clock(ARGV[2])
local cutoff = now - 60000000
local nreq = redis.call('ZCOUNT', KEYS[1], '(' .. cutoff, '+inf')
local tsum = prune_tokens(KEYS[2], KEYS[3], cutoff)
local bused, bres, bend = 0, 0, 0
if ARGV[1] ~= '' then
  local _
  _, bend, bused, bres = budget(KEYS[4], ARGV[1], now)
end
return {nreq, tsum, bused, bres, bend}
"""

# Test aid: the script's own period arithmetic.  ARGV: period, Unix seconds.
BOUNDS = PERIODS_LUA + r"""
local s, e = bounds(ARGV[1], tonumber(ARGV[2]))
return {s, e}
"""


# The names Redis knows the scripts by (EVALSHA): SHA-1 is what Redis uses, not a security measure.
ADMIT_SHA = hashlib.sha1(ADMIT.encode(), usedforsecurity=False).hexdigest()
SETTLE_SHA = hashlib.sha1(SETTLE.encode(), usedforsecurity=False).hexdigest()
EXTEND_SHA = hashlib.sha1(EXTEND.encode(), usedforsecurity=False).hexdigest()
