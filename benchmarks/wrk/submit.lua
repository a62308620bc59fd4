-- wrk script of benchmarks/api_load.py: POST a generation job with a fresh Idempotency-Key each time.
-- Usage: wrk -s submit.lua URL -- PATH BEARER_KEY   (PATH: /v1/generations or /bare)
local counter = 0
local path, key
local tid = tostring(math.random(1, 1e9))

function init(args)
  path = args[1]
  key = args[2]
  tid = tostring(math.random(1, 1e9)) .. "-" .. tostring(os.time())
end

function request()
  counter = counter + 1
  local headers = {["Content-Type"] = "application/json", ["Idempotency-Key"] = "wrk-" .. tid .. "-" .. counter}
  if key and key ~= "" then headers["Authorization"] = "Bearer " .. key end
  return wrk.format("POST", path, headers, '{"n": 4, "seed": ' .. counter .. '}')
end

dofile(os.getenv("WRK_REPORT"))
