-- wrk script: POST to a path, each request with the next identity token from a file;
-- with DELAY_MS, each connection waits a random whole number of ms, DELAY_MS on average
-- (uniform over 0..2*DELAY_MS), before each request: a fixed offered rate whose arrivals
-- do not march in step. Without it (or 0) no delay() exists, so wrk sends back to back.
-- SKIP: start after that many tokens (users a phase before already used).
-- usage: wrk -s claims.lua URL -- TOKENS_FILE PATH [DELAY_MS [SKIP]]
local tokens, i, path = {}, 0, "/"

init = function(args)
  for line in io.lines(args[1]) do tokens[#tokens + 1] = line end
  path = args[2]
  if args[4] then i = tonumber(args[4]) % #tokens end
  if args[3] and tonumber(args[3]) > 0 then
    local ms = math.floor(tonumber(args[3]) + 0.5)
    math.randomseed(os.time() + math.floor(os.clock() * 1e6))
    delay = function() return math.random(0, 2 * ms) end
  end
end

request = function()
  i = i + 1
  if i > #tokens then i = 1 end
  return wrk.format("POST", path,
    {["Authorization"] = "Bearer " .. tokens[i], ["Content-Type"] = "application/json"}, "{}")
end
