-- Self-preservation: keep records whose lease is about to lapse, marked stale.
--
-- A bridge that has lost the DHT side cannot tell a partition from mass death. When many leases
-- would lapse at once it holds those records: the key outlives the lease until ARGV[2], and each
-- service-set score moves to STALE_SCORE + load, above every fresh load, so lookups list held
-- providers after fresh ones. The upsert script undoes a hold by itself: a newer record resets
-- the key's expiry and the score to its load, a tombstone removes the id from the sets.
--
-- KEYS[1]     rma:held, worker id -> hold end (unix ms)
-- KEYS[2..n]  rma:worker:<id> of each candidate
-- ARGV[1] hold only records whose lease ends before this (unix ms)
-- ARGV[2] hold end (unix ms)        ARGV[3] now (unix ms)
-- ARGV[4] service key prefix        ARGV[5] STALE_SCORE
-- ARGV[6..] the candidates' worker ids, in the order of KEYS[2..n]
--
-- The service sets are derived from the stored JSON and so are not declared in KEYS: on Redis
-- Cluster they carry the same hash tag as every registry key, as for the upsert script.
--
-- Returns how many records are held.

local lapse_before = tonumber(ARGV[1])
local hold_until = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local stale_score = tonumber(ARGV[5])
local held = 0

for i = 2, #KEYS do
  local worker_id = ARGV[i + 4]
  local raw = redis.call("GET", KEYS[i])
  if raw then
    local ok, record = pcall(cjson.decode, raw)
    if ok and type(record) == "table" and record.tombstone ~= true
        and type(record.expires_at) == "number" and record.expires_at * 1000 < lapse_before then
      local pttl = redis.call("PTTL", KEYS[i])
      if pttl >= 0 and now + pttl < hold_until then
        redis.call("PEXPIREAT", KEYS[i], hold_until)
      end
      local load = tonumber(record.load) or 0
      for _, name in ipairs(service_names(record)) do
        redis.call("ZADD", ARGV[4] .. name, stale_score + load, worker_id)
      end
      redis.call("ZADD", KEYS[1], hold_until, worker_id)
      held = held + 1
    end
  end
end
return held
