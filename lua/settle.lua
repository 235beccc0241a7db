-- settle(KEYS: meta, transfers | ARGV: transfer_id)
-- The last step of a stock move, after the receiving shard has the units (lua/receive.lua):
-- forgets the transfer and takes its units off meta.lent.
-- returns 1 settled, 0 unknown (already settled).
local rec = redis.call('HGET', KEYS[2], ARGV[1])
if not rec then return 0 end
local n = tonumber(string.match(rec, '^[^:]*:([^:]*):'))
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'lent', -n)
redis.call('HINCRBY', KEYS[1], 'moves', 1)
return 1
