"""The Redis limiter's Lua scripts: each runs atomically inside Redis, on Redis's own clock.

Keys of one inference key share the hash tag ``{<key id>}``, so a script for a key with only its own
limits (and per-model ones) touches one slot (Redis Cluster); a project's limits live under the project's
tag ``{<project id>}``, so an admission that includes them touches two (fine on one Redis server, not on a
Cluster). Layout, for a key or project ``K`` (all with a TTL but the revocation marker, see docs/limits.md):

    qg:{K}:revoked   string  set when the key is revoked, checked by every admission
    qg:{K}:rpm       zset    admission id -> admission time (µs)
    qg:{K}:tpm       zset    reservation id -> admission time (µs)
    qg:{K}:tpmh      hash    reservation id -> tokens (reserved, then actual); "_s" -> their sum
    qg:{K}:pend      hash    reservation id -> "<reserved>:<budget period start or 0>" until settled
    qg:{K}:b:<p>     hash    budget of period kind <p>: "s" period start, "u" used, "r" reserved
    qg:{K}:m:<model>:...     the same five for a key's limits on one model (rpm, tpm, tpmh, pend, b:<p>)

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

# Admission over one or more scopes (a key's own limits, its limits for the request's model, its
# project's): every check of every scope, then every reservation, in one atomic run.
# KEYS: revoked, then per scope: rpm, tpm, tpmh, pend, budget
# ARGV: prompt, max_completion, min_completion, id, now override (''), number of scopes, then per scope:
#       rpm, tpm, limit (0 = none), period, n, then n pairs (reservation id, actual tokens): the scope's queued
#       settlements, applied first
# An admission is idempotent per id (redis-py re-sends a command whose reply timed out): a second run
# answers as the first did without counting again, and one already cancelled refuses itself.
# Returns {admitted, refusal (0 none, 1 rate, 2 budget, 3 revoked, 4 cancelled), scope that refused (1-based,
#          0 none), retry µs, granted (-1: none), reserved, now µs, then per scope: requests in window,
#          requests reset µs, tokens in window, tokens reset µs, budget used, budget reserved, budget end (s)}
ADMIT = PERIODS_LUA + SETTLE_LUA + r"""
local W = 60000000
local now = clock(ARGV[5])
local prompt, maxc, minc, id = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local S = {}
local a = 7
for i = 1, tonumber(ARGV[6]) do
  local k = 1 + (i - 1) * 5
  local s = {rz = KEYS[k + 1], tz = KEYS[k + 2], th = KEYS[k + 3], pend = KEYS[k + 4], bk = KEYS[k + 5],
             rpm = tonumber(ARGV[a]), tpm = tonumber(ARGV[a + 1]), limit = tonumber(ARGV[a + 2]),
             period = ARGV[a + 3], nreq = 0, rr = 0, tsum = 0, tr = 0, bstart = 0, bend = 0, bused = 0, bres = 0}
  local n = tonumber(ARGV[a + 4])
  a = a + 5
  for _ = 1, n do
    settle_one(s.rz, s.pend, s.tz, s.th, s.bk, ARGV[a], tonumber(ARGV[a + 1]))
    a = a + 2
  end
  S[i] = s
end

local function reply(admitted, refusal, bound, retry, granted, reserved)
  local r = {admitted, refusal, bound, retry, granted, reserved, now}
  for _, s in ipairs(S) do
    for _, v in ipairs({s.nreq, s.rr, s.tsum, s.tr, s.bused, s.bres, s.bend}) do r[#r + 1] = v end
  end
  return r
end

if redis.call('EXISTS', KEYS[1]) == 1 then return reply(0, 3, 0, 0, -1, 0) end
local seen, held = false, nil
for _, s in ipairs(S) do
  local prev = redis.call('HGET', s.pend, id)
  if prev == 'c' then return reply(0, 4, 0, 0, -1, 0) end
  if prev then held = held or prev; seen = true end
  if s.rpm > 0 and redis.call('ZSCORE', s.rz, id) then seen = true end
end
if seen then
  local reserved, granted = 0, -1
  if held then
    reserved = tonumber(string.sub(held, 1, string.find(held, ':', 1, true) - 1))
    granted = reserved - prompt
  end
  for _, s in ipairs(S) do
    s.nreq = redis.call('ZCARD', s.rz)
    s.tsum = tonumber(redis.call('HGET', s.th, '_s') or '0')
    if s.limit > 0 then s.bstart, s.bend, s.bused, s.bres = budget(s.bk, s.period, now) end
  end
  return reply(1, 0, 0, 0, granted, reserved)
end

local cutoff = now - W
local refusal, bound, retry, granted = 0, 0, 0, maxc
for i, s in ipairs(S) do
  local code, wait = 0, 0
  if s.rpm > 0 then
    redis.call('ZREMRANGEBYSCORE', s.rz, '-inf', cutoff)
    s.nreq = redis.call('ZCARD', s.rz)
    if s.nreq >= s.rpm then
      local e = redis.call('ZRANGE', s.rz, s.nreq - s.rpm, s.nreq - s.rpm, 'WITHSCORES')
      code, wait = 1, tonumber(e[2]) + W - now
    end
  end
  if s.tpm > 0 then
    s.tsum = prune_tokens(s.tz, s.th, cutoff)
    local room = s.tpm - s.tsum - prompt
    if room < minc then
      code = 1
      local need = prompt + minc
      local twait = W
      if need <= s.tpm then
        -- walk the window from its oldest entry until enough tokens would have left it
        local excess, freed, j0 = s.tsum + need - s.tpm, 0, 0
        while twait == W do
          local es = redis.call('ZRANGE', s.tz, j0, j0 + 99, 'WITHSCORES')
          if #es == 0 then break end
          local ids = {}
          for j = 1, #es, 2 do ids[#ids + 1] = es[j] end
          local toks = redis.call('HMGET', s.th, unpack(ids))
          for j = 1, #ids do
            freed = freed + (tonumber(toks[j]) or 0)
            if freed >= excess then twait = tonumber(es[2 * j]) + W - now; break end
          end
          j0 = j0 + 100
        end
      end
      if twait > wait then wait = twait end
    end
    if room < granted then granted = room end
  end
  if s.limit > 0 then
    s.bstart, s.bend, s.bused, s.bres = budget(s.bk, s.period, now)
    local room = s.limit - s.bused - s.bres - prompt
    if room < minc then
      code = 2
      local bwait = s.bend * 1000000 - now
      if bwait > wait then wait = bwait end
    end
    if room < granted then granted = room end
  end
  -- The scope that holds the request longest is the one a retry has to wait for.
  if code ~= 0 and (refusal == 0 or wait > retry) then refusal, bound, retry = code, i, wait end
end

if refusal ~= 0 then
  for _, s in ipairs(S) do
    if s.rpm > 0 then s.rr = oldest(s.rz, now) end
    if s.tpm > 0 then s.tr = oldest(s.tz, now) end
  end
  return reply(0, refusal, bound, retry, -1, 0)
end

local reserved = prompt + granted
local tracked = false
for _, s in ipairs(S) do
  if s.rpm > 0 then
    redis.call('ZADD', s.rz, now, id)
    redis.call('PEXPIRE', s.rz, 61000)
    s.nreq = s.nreq + 1
    s.rr = oldest(s.rz, now)
  end
  if s.tpm > 0 or s.limit > 0 then
    tracked = true
    local keep = 61000
    if s.tpm > 0 then
      s.tsum = s.tsum + reserved
      redis.call('ZADD', s.tz, now, id)
      redis.call('HSET', s.th, id, reserved, '_s', s.tsum)
      redis.call('PEXPIRE', s.tz, 61000)
      redis.call('PEXPIRE', s.th, 61000)
      s.tr = oldest(s.tz, now)
    end
    if s.limit > 0 then
      s.bres = s.bres + reserved
      redis.call('HSET', s.bk, 's', s.bstart, 'u', s.bused, 'r', s.bres)
      -- The counter lives a minute past its period (a settle just after the end still finds it). TTLs
      -- are relative to the script's clock, which is Redis's own except in tests.
      keep = (s.bend + 60) * 1000 - fdiv(now, 1000)
      redis.call('PEXPIRE', s.bk, keep)
    end
    redis.call('HSET', s.pend, id, reserved .. ':' .. s.bstart)
    if redis.call('PTTL', s.pend) < keep then redis.call('PEXPIRE', s.pend, keep) end
  end
end
if not tracked then return reply(1, 0, 0, 0, -1, 0) end
return reply(1, 0, 0, 0, granted, reserved)
"""

# Extending a reservation while its request runs (a stream's completion, block by block), in every scope
# it holds tokens in; it takes only what each scope's tpm (while the reservation is in its window) and
# budget still allow.
# KEYS: per scope: tpm, tpmh, pend, budget (of the reservation's period kind in that scope)
# ARGV: reservation id, tokens wanted, now override (''), then per scope: tpm (0 = none), limit (0 = none)
# Returns the tokens added (0: nothing left, or the reservation is settled or unknown). Not idempotent: a
# reply lost and the command sent again reserves twice, which only holds back tokens until the settle.
EXTEND = PERIODS_LUA + r"""
local room = tonumber(ARGV[2])
local S = {}
local now = nil
for i = 1, #KEYS / 4 do
  local k = (i - 1) * 4
  local s = {tz = KEYS[k + 1], th = KEYS[k + 2], pend = KEYS[k + 3], bk = KEYS[k + 4],
             tpm = tonumber(ARGV[2 + 2 * i]), limit = tonumber(ARGV[3 + 2 * i])}
  local v = redis.call('HGET', s.pend, ARGV[1])
  if not v or v == 'c' then return 0 end
  local sep = string.find(v, ':', 1, true)
  s.reserved, s.bstart = tonumber(string.sub(v, 1, sep - 1)), tonumber(string.sub(v, sep + 1))
  s.windowed = false
  if s.tpm > 0 and redis.call('ZSCORE', s.tz, ARGV[1]) then
    now = now or clock(ARGV[3])
    local tsum = prune_tokens(s.tz, s.th, now - 60000000)
    -- Still in the window after pruning: its tokens count at its admission time, so the window's limit holds.
    if redis.call('ZSCORE', s.tz, ARGV[1]) then
      s.windowed = true
      if s.tpm - tsum < room then room = s.tpm - tsum end
    end
  end
  s.budgeted = s.limit > 0 and s.bstart > 0 and tonumber(redis.call('HGET', s.bk, 's')) == s.bstart
  if s.budgeted then
    local b = redis.call('HMGET', s.bk, 'u', 'r')
    local left = s.limit - (tonumber(b[1]) or 0) - (tonumber(b[2]) or 0)
    if left < room then room = left end
  end
  S[i] = s
end
if room <= 0 then return 0 end
for _, s in ipairs(S) do
  redis.call('HSET', s.pend, ARGV[1], (s.reserved + room) .. ':' .. s.bstart)
  if s.windowed then
    redis.call('HINCRBY', s.th, ARGV[1], room)
    redis.call('HINCRBY', s.th, '_s', room)
  end
  if s.budgeted then redis.call('HINCRBY', s.bk, 'r', room) end
end
return room
"""

# KEYS: per scope: rpm, tpm, tpmh, budget.  ARGV: now override (''), then per scope its period ('' = no budget).
# Returns per scope {requests in window, tokens in window, budget used, budget reserved, budget end (s)}.
STATE = PERIODS_LUA + r"""
local now = clock(ARGV[1])
local cutoff = now - 60000000
local r = {}
for i = 1, #KEYS / 4 do
  local k = (i - 1) * 4
  local nreq = redis.call('ZCOUNT', KEYS[k + 1], '(' .. cutoff, '+inf')
  local tsum = prune_tokens(KEYS[k + 2], KEYS[k + 3], cutoff)
  local bused, bres, bend = 0, 0, 0
  local period = ARGV[1 + i]
  if period ~= '' then
    local _
    _, bend, bused, bres = budget(KEYS[k + 4], period, now)
  end
  for _, v in ipairs({nreq, tsum, bused, bres, bend}) do r[#r + 1] = v end
end
return r
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
