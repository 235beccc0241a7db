-- ack(KEYS: events, meta | ARGV: group, id1, id2, ...)
-- XACKs entries the writer has committed (or dead-lettered) and, in the same atomic step,
-- takes them off meta.unwritten, the backlog that lua/claim.lua sheds on.
-- returns the number of entries acked (entries already acked are not counted twice).
local ids = {}
for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end
if #ids == 0 then return 0 end
local acked = redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
if acked > 0 then redis.call('HINCRBY', KEYS[2], 'unwritten', -acked) end
return acked
