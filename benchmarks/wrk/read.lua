-- wrk script of benchmarks/api_load.py: GET one of the given job ids in turn.
-- Usage: wrk -s read.lua URL -- PREFIX IDS_FILE BEARER_KEY   (PREFIX: /v1/jobs/ or /bare/)
local ids = {}
local counter = 0
local prefix, key

function init(args)
  prefix = args[1]
  for line in io.lines(args[2]) do ids[#ids + 1] = line end
  key = args[3]
  counter = math.random(1, #ids)
end

function request()
  counter = counter + 1
  local headers = {}
  if key and key ~= "" then headers["Authorization"] = "Bearer " .. key end
  return wrk.format("GET", prefix .. ids[(counter % #ids) + 1], headers)
end

dofile(os.getenv("WRK_REPORT"))
