-- set_admission(KEYS: meta | ARGV: changes_channel, campaign_id, admit_per_s, burst, spec_json)
-- Changes a live campaign's admission rate (0 turns it off) and the spec that records it;
-- the bucket keeps its tokens, capped at the new burst.
-- returns 1 changed, 0 unknown campaign, -1 campaign ended.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 0 end
if status == 'ended' then return -1 end
local burst = tonumber(ARGV[4])
local tokens = tonumber(redis.call('HGET', KEYS[1], 'adm_tokens') or burst)
redis.call('HSET', KEYS[1], 'adm_rate', ARGV[3], 'adm_burst', ARGV[4],
  'adm_tokens', tostring(math.min(tokens, burst)), 'spec', ARGV[5])
redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('PUBLISH', ARGV[1], 'changed ' .. ARGV[2])
return 1
