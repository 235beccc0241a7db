-- claim(KEYS: meta, users, devices, phones, ips, grants, idem, idem_exp, events, subnets,
--             round_users, codes, code_misses
--       | ARGV: campaign_id, changes_channel, idem_ttl_ms, backlog_max,
--               then per claim: user, device_h, phone_h, ip, idem_key, channel, subnet,
--               region, code_h)
-- Decides a whole batch of claims of one campaign atomically, on Redis TIME.
-- returns {now_ms, remaining, version, code1, data1, code2, data2, ...}; codes are
-- gateway.domain.Outcome: 1 granted ("seq:ms"), 2 replayed ("seq:ms"), 3 sold_out,
-- 4..7 limit user/device/phone/ip (the user's grants "seq:ms,..."), 8 not_started (starts ms),
-- 9 ended, 10 paused, 11 unknown campaign, 12 backlog (the store is behind: shed with 503),
-- 13 admission (over the campaign's admission rate: ms until the next token),
-- 14 limit_subnet (the caller's network has meta.per_subnet grants: the user's grants, as
-- for the other limits; the worker names the network, see subnet() in gateway/http/peer.py),
-- 15 limit_user_per_round (the user's grants), 16 bad_code (wrong guesses the user has left
-- this minute), 17 code_attempts (ms until the user may guess again).
-- The admission rate is a token bucket on Redis TIME (meta adm_rate per s, adm_burst),
-- exact across every gateway; it is taken only by claims that pass the identity limits.
-- Each grant adds one to meta.unwritten; lua/ack.lua takes it off when the writer acks.
-- meta.validity (gateway.domain.validity_template) becomes the event's `validity`:
-- `@` is the grant time, `+N` N ms after it.
-- Rounds (meta r_count set, see the block below): the round is decided here on Redis TIME;
-- `remaining` stays campaign-wide (this round's units plus later rounds'), while stock is
-- taken from the round's r_left. Between rounds (r_open) not_started carries the next drop
-- in data; a sold-out round answers sold_out with a positive remaining in the header and
-- publishes "roundout <id> <round> <version>"; "soldout <id>" means the whole campaign.
-- Redemption codes (meta code_miss_max set, see its block): a claim needs a code whose
-- keyed hash is in the `codes` set; the hash leaves the set with the grant, never otherwise.
local meta, users, devices, phones, ips, grants, idem, idem_exp, events, subnets =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local round_users, codes, code_misses = KEYS[11], KEYS[12], KEYS[13]
local cid, channel, idem_ttl, backlog_max = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local FIELDS, HEAD = 9, 4
local n = (#ARGV - HEAD) / FIELDS

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local m = redis.call('HMGET', meta, 'status', 'starts', 'ends', 'per_user', 'per_device',
  'per_phone', 'per_ip', 'remaining', 'unwritten', 'version', 'adm_rate', 'adm_burst',
  'adm_tokens', 'adm_ts', 'per_subnet', 'validity',
  -- 17..24 rounds, 25 redemption codes, 26..27 shards: read here, in the one call
  'r_count', 'r_every', 'r_stock', 'r_carry', 'r_open', 'r_idx', 'r_left', 'per_user_round',
  'code_miss_max', 'shards', 'shard')
local out = {now, 0, tonumber(m[10]) or 0}

local function all(code, data)
  for _ = 1, n do
    out[#out + 1] = code
    out[#out + 1] = data
  end
  return out
end

if not m[1] then return all(11, '') end
local remaining = tonumber(m[8])
out[2] = remaining
-- a campaign-wide answer; a retry with a known Idempotency-Key still gets its grant back
local wide, wide_data = 0, ''
if m[1] == 'ended' or now >= tonumber(m[3]) then wide = 9
elseif m[1] == 'paused' then wide = 10
elseif now < tonumber(m[2]) then wide, wide_data = 8, m[2]
elseif backlog_max > 0 and (tonumber(m[9]) or 0) >= backlog_max then wide = 12
end

local per_user = tonumber(m[4])
local per_device, per_phone, per_ip = tonumber(m[5]), tonumber(m[6]), tonumber(m[7])
local per_subnet = tonumber(m[15]) or 0
local vtpl = m[16] or ''
local function validity(at)
  local s = string.gsub(vtpl, '@', tostring(at))
  return (string.gsub(s, '%+(%d+)', function(d) return string.format('%d', at + tonumber(d)) end))
end

-- ---- rounds: rolling drops (gateway.domain.Rounds, round_at, round_left) -------------------
-- r_idx/r_left are the round the meta last saw and its units left; a later round rolls
-- forward lazily here: with carry-over the leftover (and any skipped round) adds to it,
-- else it starts afresh and the lapsed units leave `remaining` (counted in `forfeited`).
local rounds = false
local round, r_left, r_rolled, next_drop, per_round = 0, 0, false, '', 0
local r = {m[17], m[18], m[19], m[20], m[21], m[22], m[23], m[24]}
local r_count = tonumber(r[1]) or 0
if r_count > 0 then
  rounds = true
  local every, r_stock, starts = tonumber(r[2]), tonumber(r[3]), tonumber(m[2])
  round = math.max(0, math.min(math.floor((now - starts) / every), r_count - 1))
  local idx = tonumber(r[6])
  r_left = tonumber(r[7])
  per_round = tonumber(r[8]) or 0
  if round > idx then
    r_rolled = true
    if r[4] == '1' then
      r_left = r_left + (round - idx) * r_stock
    else
      local lapsed = math.min(remaining, r_left + (round - idx - 1) * r_stock)
      remaining = remaining - lapsed
      redis.call('HINCRBY', meta, 'forfeited', lapsed)
      r_left = r_stock
    end
    r_left = math.min(r_left, remaining)
  end
  local opens = starts + round * every
  if round < r_count - 1 then next_drop = tostring(opens + every) end
  local open_ms = tonumber(r[5]) or 0
  if wide == 0 and open_ms > 0 and now >= opens + open_ms then
    if next_drop ~= '' then wide, wide_data = 8, next_drop else wide = 9 end
  end
end
-- ---- end rounds ----------------------------------------------------------------------------

-- ---- redemption codes: one-time codes, wrong guesses counted per user per minute ----------
-- code_misses holds "minute:count" per user; a new minute starts the count afresh.
local miss_max = tonumber(m[25]) or 0
local minute = math.floor(now / 60000)
local function misses(user)
  local v = redis.call('HGET', code_misses, user)
  if not v then return 0 end
  local at, count = string.match(v, '^(%d+):(%d+)$')
  if tonumber(at) ~= minute then return 0 end
  return tonumber(count)
end
-- ---- end redemption codes ------------------------------------------------------------------

local function over(key, field, limit)
  return limit > 0 and field ~= '' and (tonumber(redis.call('HGET', key, field)) or 0) >= limit
end

local rate = tonumber(m[11]) or 0
local tokens = 0
if rate > 0 then
  local burst = tonumber(m[12]) or 1
  local last = tonumber(m[14]) or now
  tokens = math.min(burst, (tonumber(m[13]) or burst) + math.max(0, now - last) * rate / 1000)
end

-- shard k of a campaign split in shard_n counts its own grants in meta.seq; claim ids
-- stay unique per campaign as seq = (local - 1) * shard_n + k + 1 (see lua/lend.lua)
local shard_n = tonumber(m[26]) or 1
local shard_k = tonumber(m[27]) or 0

local sold_out_now, granted = false, 0
for i = 0, n - 1 do
  local b = HEAD + i * FIELDS
  local user, dev, phone, ip, ikey, chan, net, region, code_h =
    ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4], ARGV[b + 5], ARGV[b + 6], ARGV[b + 7],
    ARGV[b + 8], ARGV[b + 9]
  local ifield = user .. '\n' .. ikey
  local prior = false
  if ikey ~= '' then prior = redis.call('HGET', idem, ifield) end
  local code, data = 0, ''
  if prior then
    code, data = 2, prior
  elseif wide > 0 then
    code, data = wide, wide_data
  elseif miss_max > 0 and misses(user) >= miss_max then
    code, data = 17, tostring(60000 - now % 60000)
  elseif miss_max > 0 and redis.call('SISMEMBER', codes, code_h) == 0 then
    local missed = misses(user) + 1
    redis.call('HSET', code_misses, user, minute .. ':' .. missed)
    code, data = 16, tostring(miss_max - missed)
  elseif over(users, user, per_user) then
    code = 4
  elseif over(devices, dev, per_device) then
    code = 5
  elseif over(phones, phone, per_phone) then
    code = 6
  elseif over(ips, ip, per_ip) then
    code = 7
  elseif over(subnets, net, per_subnet) then
    code = 14
  elseif rounds and over(round_users, round .. ':' .. user, per_round) then
    code = 15
  elseif remaining <= 0 or (rounds and r_left <= 0) then
    code = 3
  elseif rate > 0 and tokens < 1 then
    code, data = 13, tostring(math.ceil((1 - tokens) * 1000 / rate))
  else
    if rate > 0 then tokens = tokens - 1 end
    remaining = remaining - 1
    local seq = redis.call('HINCRBY', meta, 'seq', 1)
    if shard_n > 1 then seq = (seq - 1) * shard_n + shard_k + 1 end
    data = seq .. ':' .. now
    local nth = redis.call('HINCRBY', users, user, 1)
    -- every identity is counted, limited or not: the operators' anomaly view reads them,
    -- and a limit turned on live (PATCH) counts the grants made before it
    if dev ~= '' then redis.call('HINCRBY', devices, dev, 1) end
    if phone ~= '' then redis.call('HINCRBY', phones, phone, 1) end
    if ip ~= '' then redis.call('HINCRBY', ips, ip, 1) end
    if net ~= '' then redis.call('HINCRBY', subnets, net, 1) end
    local prev = redis.call('HGET', grants, user)
    redis.call('HSET', grants, user, prev and (prev .. ',' .. data) or data)
    if ikey ~= '' then
      redis.call('HSET', idem, ifield, data)
      redis.call('ZADD', idem_exp, now + idem_ttl, ifield)
    end
    local ev = {'v', '1', 'claim_id', cid .. '.' .. seq,
      'campaign_id', cid, 'user_id', user, 'n', nth, 'seq', seq, 'granted_at', now,
      'device', dev, 'phone', phone, 'ip', ip, 'channel', chan, 'region', region,
      'validity', validity(now)}
    if miss_max > 0 then
      redis.call('SREM', codes, code_h)
      ev[#ev + 1] = 'code'
      ev[#ev + 1] = code_h
    end
    if rounds then
      r_left = r_left - 1
      redis.call('HINCRBY', round_users, round .. ':' .. user, 1)
      ev[#ev + 1] = 'round'
      ev[#ev + 1] = round
    end
    redis.call('XADD', events, '*', unpack(ev))
    if remaining == 0 then sold_out_now = true end
    granted = granted + 1
    code = 1
  end
  if (code >= 4 and code <= 7) or code == 14 or code == 15 then
    data = redis.call('HGET', grants, user) or ''
  end
  out[#out + 1] = code
  out[#out + 1] = data
end

redis.call('HSET', meta, 'remaining', remaining)
if granted > 0 then redis.call('HINCRBY', meta, 'unwritten', granted) end
if rate > 0 then redis.call('HSET', meta, 'adm_tokens', tostring(tokens), 'adm_ts', now) end
out[2] = remaining
if sold_out_now then redis.call('PUBLISH', channel, 'soldout ' .. cid) end
if rounds and (r_rolled or granted > 0) then
  redis.call('HSET', meta, 'r_idx', round, 'r_left', r_left)
  if granted > 0 and r_left == 0 and remaining > 0 then
    redis.call('PUBLISH', channel, 'roundout ' .. cid .. ' ' .. round .. ' ' .. out[3])
  end
end

-- forget a few expired idempotency keys per call
local expired = redis.call('ZRANGEBYSCORE', idem_exp, '-inf', now, 'LIMIT', 0, 16)
for _, f in ipairs(expired) do
  redis.call('HDEL', idem, f)
  redis.call('ZREM', idem_exp, f)
end
return out
