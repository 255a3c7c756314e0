-- One page of a service's providers in one round trip (KEYS[1] the service set): the ids from
-- rank ARGV[1] to ARGV[2] with their scores, then each one's record (nil where the key is gone).
-- ARGV[3] is the worker key prefix: on Cluster it carries the set's hash tag, so every key read
-- is in the set's slot.
local scored = redis.call("ZRANGE", KEYS[1], ARGV[1], ARGV[2], "WITHSCORES")
if #scored == 0 then
  return {{}, {}}
end
local keys = {}
for i = 1, #scored, 2 do
  keys[#keys + 1] = ARGV[3] .. scored[i]
end
return {scored, redis.call("MGET", unpack(keys))}
