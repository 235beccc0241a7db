-- lend(KEYS: meta, transfers | ARGV: want, to_shard, transfer_id)
-- The first step of moving stock between the shards of a campaign (gateway/redis/shards.py):
-- takes up to `want` units out of this shard (remaining and total) and records them as
-- lent in `transfers` until lua/settle.lua, so a unit in transit is never lost: it is in
-- meta.lent and the transfer record until the receiving shard has it.
-- returns {units taken, remaining after, lent after}.
local m = redis.call('HMGET', KEYS[1], 'remaining', 'lent')
local remaining, lent = tonumber(m[1]), tonumber(m[2]) or 0
if not remaining or remaining <= 0 then return {0, remaining or 0, lent} end
local n = math.min(remaining, tonumber(ARGV[1]))
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HINCRBY', KEYS[1], 'remaining', -n)
redis.call('HINCRBY', KEYS[1], 'total', -n)
redis.call('HINCRBY', KEYS[1], 'lent', n)
redis.call('HINCRBY', KEYS[1], 'moves', 1)
redis.call('HSET', KEYS[2], ARGV[3], ARGV[2] .. ':' .. n .. ':' .. now)
return {n, remaining - n, lent + n}
