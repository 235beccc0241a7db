-- wrk script: POST to a path, each request with the next identity token from a file
-- usage: wrk -s claims.lua URL -- TOKENS_FILE PATH
local tokens, i, path = {}, 0, "/"

init = function(args)
  for line in io.lines(args[1]) do tokens[#tokens + 1] = line end
  path = args[2]
end

request = function()
  i = i + 1
  if i > #tokens then i = 1 end
  return wrk.format("POST", path,
    {["Authorization"] = "Bearer " .. tokens[i], ["Content-Type"] = "application/json"}, "{}")
end
