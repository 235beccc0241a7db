-- restock(KEYS: meta | ARGV: changes_channel, campaign_id, quantity, max_total)
-- Adds units to a campaign that has not ended, on Redis TIME, never past `max_total` units
-- put up in all (what a budget cap pays for; 0: no cap). Publishes
-- "restock <id> <version> <remaining> <total>" so every worker reopens on receipt.
-- A campaign with rounds gets the units in its current round (rolled forward first, the
-- same way lua/claim.lua does); without carry-over they lapse with that round.
-- returns {1, remaining, total}; {0} unknown campaign; {-1} ended; {-2, total} over the cap.
local m = redis.call('HMGET', KEYS[1], 'status', 'ends', 'total')
if not m[1] then return {0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if m[1] == 'ended' or now >= tonumber(m[2]) then return {-1} end
local q = tonumber(ARGV[3])
local max_total = tonumber(ARGV[4]) or 0
if max_total > 0 and tonumber(m[3]) + q > max_total then return {-2, tonumber(m[3])} end

-- ---- rounds: roll forward to the current round, then add to it ----------------------------
local r = redis.call('HMGET', KEYS[1], 'r_count', 'r_every', 'r_stock', 'r_carry', 'r_idx',
  'r_left', 'starts', 'remaining')
local r_count = tonumber(r[1]) or 0
if r_count > 0 then
  local every, r_stock, idx, left = tonumber(r[2]), tonumber(r[3]), tonumber(r[5]), tonumber(r[6])
  local round = math.max(0, math.min(math.floor((now - tonumber(r[7])) / every), r_count - 1))
  if round > idx then
    local remaining = tonumber(r[8])
    if r[4] == '1' then
      left = left + (round - idx) * r_stock
    else
      local lapsed = math.min(remaining, left + (round - idx - 1) * r_stock)
      redis.call('HINCRBY', KEYS[1], 'remaining', -lapsed)
      redis.call('HINCRBY', KEYS[1], 'forfeited', lapsed)
      remaining = remaining - lapsed
      left = r_stock
    end
    left = math.min(left, remaining)
  end
  redis.call('HSET', KEYS[1], 'r_idx', round, 'r_left', left + q)
end
-- ---- end rounds ----------------------------------------------------------------------------

local remaining = redis.call('HINCRBY', KEYS[1], 'remaining', q)
local total = redis.call('HINCRBY', KEYS[1], 'total', q)
local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('PUBLISH', ARGV[1],
  'restock ' .. ARGV[2] .. ' ' .. version .. ' ' .. remaining .. ' ' .. total)
return {1, remaining, total}
