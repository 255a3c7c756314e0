-- Pages of services' providers in one round trip, for every lookup of a batch (batch.py): for
-- each KEYS[i] (a service set), the ids from rank ARGV[2i] to ARGV[2i+1] with their scores, then
-- each one's record (nil where the key is gone): {scored, records}. ARGV[1] is the worker key
-- prefix: on Cluster it carries the sets' hash tag, so every key read is in the sets' slot.
-- A read that fails (a key of the wrong type) answers its own error, the others their pages.
local prefix = ARGV[1]
local pages = {}
for i = 1, #KEYS do
  local scored = redis.pcall("ZRANGE", KEYS[i], ARGV[2 * i], ARGV[2 * i + 1], "WITHSCORES")
  if scored.err then
    pages[i] = scored
  elseif #scored == 0 then
    pages[i] = {{}, {}}
  else
    local keys = {}
    for j = 1, #scored, 2 do
      keys[#keys + 1] = prefix .. scored[j]
    end
    pages[i] = {scored, redis.call("MGET", unpack(keys))}
  end
end
return pages
