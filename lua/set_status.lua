-- set_status(KEYS: meta | ARGV: changes_channel, campaign_id, status)
-- status is live, paused or ended; ended is final. Publishes "status <id> <version> <status>"
-- so every worker applies the change on receipt, without a round trip.
-- returns 1 changed (or already so), 0 unknown campaign, -1 campaign already ended.
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return 0 end
if cur == 'ended' then return ARGV[3] == 'ended' and 1 or -1 end
if cur ~= ARGV[3] then
  redis.call('HSET', KEYS[1], 'status', ARGV[3])
  local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
  redis.call('PUBLISH', ARGV[1], 'status ' .. ARGV[2] .. ' ' .. version .. ' ' .. ARGV[3])
end
return 1
