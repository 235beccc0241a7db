-- receive(KEYS: meta, received | ARGV: transfer_id, n)
-- The second step of a stock move: adds a lent transfer's units to this shard once (a
-- repeated call after a crash adds nothing). Transfer ids older than a day are forgotten.
-- returns 1 added, 0 already added.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 86400000)
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 0 end
local n = tonumber(ARGV[2])
redis.call('HINCRBY', KEYS[1], 'remaining', n)
redis.call('HINCRBY', KEYS[1], 'total', n)
redis.call('HINCRBY', KEYS[1], 'moves', 1)
redis.call('ZADD', KEYS[2], now, ARGV[1])
return 1
