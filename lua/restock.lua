-- restock(KEYS: meta | ARGV: changes_channel, campaign_id, quantity)
-- Adds units to a campaign that has not ended, on Redis TIME. Publishes
-- "restock <id> <version> <remaining> <total>" so every worker reopens on receipt.
-- returns {1, remaining, total}; {0} unknown campaign; {-1} ended.
local m = redis.call('HMGET', KEYS[1], 'status', 'ends')
if not m[1] then return {0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if m[1] == 'ended' or now >= tonumber(m[2]) then return {-1} end
local q = tonumber(ARGV[3])
local remaining = redis.call('HINCRBY', KEYS[1], 'remaining', q)
local total = redis.call('HINCRBY', KEYS[1], 'total', q)
local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('PUBLISH', ARGV[1],
  'restock ' .. ARGV[2] .. ' ' .. version .. ' ' .. remaining .. ' ' .. total)
return {1, remaining, total}
