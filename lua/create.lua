-- create(KEYS: meta | ARGV: changes_channel, campaign_id, then field/value pairs)
-- Creates a campaign's meta hash unless it exists; `remaining` and `total` start at `stock`.
-- returns 1 created, 0 already exists.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local fields = {}
for i = 3, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('HSET', KEYS[1], 'seq', 0, 'version', 1)
redis.call('PUBLISH', ARGV[1], 'changed ' .. ARGV[2])
return 1
