-- Atomic upsert of one worker record under the merge rule of records.supersedes.
--
-- Running the comparison here, not in Python, is what makes concurrent writers safe: the read of
-- the stored record, the decision and every write below happen in one step that no other client
-- can interleave with.
--
-- KEYS[1]     rma:worker:<id>, the stored record
-- KEYS[2..n]  rma:svc:<service> for each service the new record lists
-- ARGV[1]  record JSON            ARGV[2]  seq              ARGV[3]  "1" for a tombstone
-- ARGV[4]  signature (hex)        ARGV[5]  expires_at, unix ms
-- ARGV[6]  load (the set score)   ARGV[7]  worker id        ARGV[8]  service key prefix
-- ARGV[9]  events channel         ARGV[10] event JSON without its closing brace
-- ARGV[11] PUBLISH, or SPUBLISH on Redis Cluster (a shard channel in the keys' slot)
--
-- The service sets of the replaced record are derived from its stored JSON and so are not
-- declared in KEYS. That is safe on Redis Cluster too: every registry key carries the same hash
-- tag there ({rma}:...), so they all live in the slot of KEYS[1], on the node running this.
--
-- Returns 1 when the record was applied, 0 when an equal or newer record is already stored.

-- Byte order, as Python compares hex strings; Lua's own string `<` follows the server's
-- collation locale.
local function bytes_greater(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then
      return x > y
    end
  end
  return #a > #b
end

local function supersedes(seq, tombstone, signature, old)
  local old_seq = tonumber(old.seq)
  if old_seq == nil then
    return true -- not a record we wrote: replace it
  end
  if seq ~= old_seq then
    return seq > old_seq
  end
  local old_tombstone = old.tombstone == true
  if tombstone ~= old_tombstone then
    return tombstone
  end
  return bytes_greater(signature, tostring(old.signature))
end

-- The services of the stored record, or nothing when there is none or it cannot be read.
-- Returns false when the stored record wins.
local function replaced_services(raw, seq, tombstone, signature)
  if not raw then
    return {}
  end
  local ok, old = pcall(cjson.decode, raw)
  if not ok or type(old) ~= "table" then
    return {} -- a corrupt value never blocks a valid record
  end
  if not supersedes(seq, tombstone, signature, old) then
    return false
  end
  return service_names(old)
end

local seq = tonumber(ARGV[2])
local tombstone = ARGV[3] == "1"
local worker_id = ARGV[7]

local old_services = replaced_services(redis.call("GET", KEYS[1]), seq, tombstone, ARGV[4])
if old_services == false then
  return 0
end

-- A tombstone is stored too, so that it keeps blocking lower seqs until its own lease ends.
redis.call("SET", KEYS[1], ARGV[1])
redis.call("PEXPIREAT", KEYS[1], ARGV[5])

local listed = {}
for i = 2, #KEYS do
  listed[KEYS[i]] = true
  if tombstone then
    redis.call("ZREM", KEYS[i], worker_id)
  else
    redis.call("ZADD", KEYS[i], ARGV[6], worker_id)
  end
end

local removed = {}
for _, name in ipairs(old_services) do
  local key = ARGV[8] .. name
  if not listed[key] then
    redis.call("ZREM", key, worker_id)
    removed[#removed + 1] = '"' .. name .. '"'
  end
end

-- Built by concatenation because cjson.encode prints numbers with 14 digits, which would round
-- a large seq, and encodes an empty list as an object.
redis.call(ARGV[11], ARGV[9], ARGV[10] .. ',"removed":[' .. table.concat(removed, ",") .. "]}")
return 1
