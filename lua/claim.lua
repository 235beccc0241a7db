-- claim(KEYS: meta, users, devices, phones, ips, grants, idem, idem_exp, events
--       | ARGV: campaign_id, changes_channel, idem_ttl_ms, backlog_max,
--               then per claim: user, device_h, phone_h, ip, idem_key, channel)
-- Decides a whole batch of claims of one campaign atomically, on Redis TIME.
-- returns {now_ms, remaining, version, code1, data1, code2, data2, ...}; codes are
-- gateway.domain.Outcome: 1 granted ("seq:ms"), 2 replayed ("seq:ms"), 3 sold_out,
-- 4..7 limit user/device/phone/ip (the user's grants "seq:ms,..."), 8 not_started (starts ms),
-- 9 ended, 10 paused, 11 unknown campaign, 12 backlog (the store is behind: shed with 503),
-- 13 admission (over the campaign's admission rate: ms until the next token).
-- The admission rate is a token bucket on Redis TIME (meta adm_rate per s, adm_burst),
-- exact across every gateway; it is taken only by claims that pass the identity limits.
-- Each grant adds one to meta.unwritten; lua/ack.lua takes it off when the writer acks.
local meta, users, devices, phones, ips, grants, idem, idem_exp, events =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local cid, channel, idem_ttl, backlog_max = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local FIELDS, HEAD = 6, 4
local n = (#ARGV - HEAD) / FIELDS

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local m = redis.call('HMGET', meta, 'status', 'starts', 'ends', 'per_user', 'per_device',
  'per_phone', 'per_ip', 'remaining', 'unwritten', 'version', 'adm_rate', 'adm_burst',
  'adm_tokens', 'adm_ts')
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
local shard_n = tonumber(redis.call('HGET', meta, 'shards')) or 1
local shard_k = tonumber(redis.call('HGET', meta, 'shard')) or 0

local sold_out_now, granted = false, 0
for i = 0, n - 1 do
  local b = HEAD + i * FIELDS
  local user, dev, phone, ip, ikey, chan =
    ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4], ARGV[b + 5], ARGV[b + 6]
  local ifield = user .. '\n' .. ikey
  local prior = false
  if ikey ~= '' then prior = redis.call('HGET', idem, ifield) end
  local code, data = 0, ''
  if prior then
    code, data = 2, prior
  elseif wide > 0 then
    code, data = wide, wide_data
  elseif over(users, user, per_user) then
    code = 4
  elseif over(devices, dev, per_device) then
    code = 5
  elseif over(phones, phone, per_phone) then
    code = 6
  elseif over(ips, ip, per_ip) then
    code = 7
  elseif remaining <= 0 then
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
    -- devices and addresses are always counted: the operators' anomaly view reads them
    if dev ~= '' then redis.call('HINCRBY', devices, dev, 1) end
    if per_phone > 0 and phone ~= '' then redis.call('HINCRBY', phones, phone, 1) end
    if ip ~= '' then redis.call('HINCRBY', ips, ip, 1) end
    local prev = redis.call('HGET', grants, user)
    redis.call('HSET', grants, user, prev and (prev .. ',' .. data) or data)
    if ikey ~= '' then
      redis.call('HSET', idem, ifield, data)
      redis.call('ZADD', idem_exp, now + idem_ttl, ifield)
    end
    redis.call('XADD', events, '*', 'v', '1', 'claim_id', cid .. '.' .. seq,
      'campaign_id', cid, 'user_id', user, 'n', nth, 'seq', seq, 'granted_at', now,
      'device', dev, 'phone', phone, 'ip', ip, 'channel', chan)
    if remaining == 0 then sold_out_now = true end
    granted = granted + 1
    code = 1
  end
  if code >= 4 and code <= 7 then data = redis.call('HGET', grants, user) or '' end
  out[#out + 1] = code
  out[#out + 1] = data
end

redis.call('HSET', meta, 'remaining', remaining)
if granted > 0 then redis.call('HINCRBY', meta, 'unwritten', granted) end
if rate > 0 then redis.call('HSET', meta, 'adm_tokens', tostring(tokens), 'adm_ts', now) end
out[2] = remaining
if sold_out_now then redis.call('PUBLISH', channel, 'soldout ' .. cid) end

-- forget a few expired idempotency keys per call
local expired = redis.call('ZRANGEBYSCORE', idem_exp, '-inf', now, 'LIMIT', 0, 16)
for _, f in ipairs(expired) do
  redis.call('HDEL', idem, f)
  redis.call('ZREM', idem_exp, f)
end
return out
