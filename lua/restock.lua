-- restock(KEYS: meta | ARGV: changes_channel, campaign_id, quantity, max_total)
-- Adds units to a campaign that has not ended, on Redis TIME, never past `max_total` units
-- put up in all (what a budget cap pays for; 0: no cap). Publishes
-- "restock <id> <version> <remaining> <total>" so every worker reopens on receipt.
-- returns {1, remaining, total}; {0} unknown campaign; {-1} ended; {-2, total} over the cap.
local m = redis.call('HMGET', KEYS[1], 'status', 'ends', 'total')
if not m[1] then return {0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if m[1] == 'ended' or now >= tonumber(m[2]) then return {-1} end
local q = tonumber(ARGV[3])
local max_total = tonumber(ARGV[4]) or 0
if max_total > 0 and tonumber(m[3]) + q > max_total then return {-2, tonumber(m[3])} end
local remaining = redis.call('HINCRBY', KEYS[1], 'remaining', q)
local total = redis.call('HINCRBY', KEYS[1], 'total', q)
local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('PUBLISH', ARGV[1],
  'restock ' .. ARGV[2] .. ' ' .. version .. ' ' .. remaining .. ' ' .. total)
return {1, remaining, total}
