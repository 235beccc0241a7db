-- room_enter(KEYS: meta, room | ARGV: user, shuffle_score)
-- Puts a user in the campaign's waiting room once, on Redis TIME: before the start at
-- `shuffle_score` (a keyed pseudo-random number below 2^48, so arrival order buys nothing),
-- after it at 2^48 + arrival number (first come, first served, behind the pre-queue).
-- returns the user's score (the same one on every call).
local prior = redis.call('ZSCORE', KEYS[2], ARGV[1])
if prior then return prior end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local starts = tonumber(redis.call('HGET', KEYS[1], 'starts'))
local score
if starts and now < starts then
  score = ARGV[2]
else
  score = tostring(281474976710656 + redis.call('HINCRBY', KEYS[1], 'room_seq', 1))
end
redis.call('ZADD', KEYS[2], 'NX', score, ARGV[1])
return score
