-- Shared by the registry scripts: prepended to each when it is loaded (a Redis script cannot
-- load another).
--
-- The service names of a decoded stored record, keeping only names a validated record could
-- carry: they become key names and event text.
local function service_names(record)
  local names = {}
  if type(record.services) == "table" then
    for _, name in ipairs(record.services) do
      if type(name) == "string" and #name <= 32 and not string.find(name, "[^a-z0-9-]") then
        names[#names + 1] = name
      end
    end
  end
  return names
end

