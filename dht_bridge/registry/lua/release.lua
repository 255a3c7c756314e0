-- Self-preservation over: end every hold of rma:held in one step.
--
-- A held record whose lease has ended was kept only by the hold: it is removed now (key and
-- service-set entries) and a change event lists the services it left, so routers drop it from
-- their caches. A record still within its lease (a newer heartbeat replaced the held one, or the
-- hold came early) gets its own expiry and its load as score back.
--
-- KEYS[1] rma:held
-- ARGV[1] now (unix ms)   ARGV[2] worker key prefix   ARGV[3] service key prefix
-- ARGV[4] events channel   ARGV[5] PUBLISH, or SPUBLISH on Redis Cluster
--
-- The worker keys and service sets are not declared in KEYS: on Redis Cluster they carry the same
-- hash tag as rma:held, so they are in its slot, on the node running this.
--
-- Returns {removed, restored}.

local now = tonumber(ARGV[1])
local removed, restored = 0, 0

for _, worker_id in ipairs(redis.call("ZRANGE", KEYS[1], 0, -1)) do
  local key = ARGV[2] .. worker_id
  local raw = redis.call("GET", key)
  if raw then
    local ok, record = pcall(cjson.decode, raw)
    if ok and type(record) == "table" and record.tombstone ~= true
        and type(record.expires_at) == "number" then
      local names = service_names(record)
      local expires_ms = math.floor(record.expires_at * 1000)
      if expires_ms <= now then
        redis.call("DEL", key)
        local quoted = {}
        for _, name in ipairs(names) do
          redis.call("ZREM", ARGV[3] .. name, worker_id)
          quoted[#quoted + 1] = '"' .. name .. '"'
        end
        -- The seq is copied from the JSON text: cjson would print a large one rounded.
        local seq = string.match(raw, '"seq":(%d+)') or "0"
        redis.call(ARGV[5], ARGV[4], '{"type":"record","worker_id":"' .. worker_id
          .. '","seq":' .. seq .. ',"tombstone":false,"services":[],"removed":['
          .. table.concat(quoted, ",") .. '],"origin":"bridge","expired":true}')
        removed = removed + 1
      else
        redis.call("PEXPIREAT", key, expires_ms)
        local load = tonumber(record.load) or 0
        for _, name in ipairs(names) do
          redis.call("ZADD", ARGV[3] .. name, load, worker_id)
        end
        restored = restored + 1
      end
    end
  end
  redis.call("ZREM", KEYS[1], worker_id)
end
return {removed, restored}
