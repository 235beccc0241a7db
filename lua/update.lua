-- update(KEYS: meta | ARGV: changes_channel, campaign_id, expected_version, spec_json,
--        then field/value pairs)
-- A live change of a campaign's limits, eligibility or admission: the spec that records it
-- and the meta fields lua/claim.lua reads (per_*, adm_rate, adm_burst), in one step, so
-- every claim decided after it sees the new values. Refused when the meta version moved
-- since the caller read the spec (another change came first). The admission bucket keeps
-- its tokens, capped at the new burst. Publishes "changed <id>": every worker reloads.
-- returns {1, version, seq} changed (seq: the grants decided before the change),
-- {0} unknown campaign, {-1} ended, {-2} version moved.
local m = redis.call('HMGET', KEYS[1], 'status', 'ends', 'adm_tokens', 'version')
if not m[1] then return {0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if m[1] == 'ended' or now >= tonumber(m[2]) then return {-1} end
if (tonumber(m[4]) or 0) ~= tonumber(ARGV[3]) then return {-2} end
local fields = {'spec', ARGV[4]}
local burst
for i = 5, #ARGV, 2 do
  fields[#fields + 1] = ARGV[i]
  fields[#fields + 1] = ARGV[i + 1]
  if ARGV[i] == 'adm_burst' then burst = tonumber(ARGV[i + 1]) end
end
if burst and m[3] then
  fields[#fields + 1] = 'adm_tokens'
  fields[#fields + 1] = tostring(math.min(tonumber(m[3]), burst))
end
redis.call('HSET', KEYS[1], unpack(fields))
local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq')) or 0
redis.call('PUBLISH', ARGV[1], 'changed ' .. ARGV[2])
return {1, version, seq}
