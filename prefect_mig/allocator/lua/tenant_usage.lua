-- Live leases and compute slices per tenant, for metrics. Read-only, and not prefixed with _lib.lua
-- (which may write a new epoch): prefect_mig.metrics registers it on its own.
-- KEYS[1] - the leases ZSET
-- ARGV[1] - key prefix "pmig:{ns}:" (a lease's hash is <prefix>lease:<id>, as in keys.py)
-- return {tenant, leases, compute slices, tenant, ...}
local count, compute, order = {}, {}, {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local f = redis.call('HMGET', ARGV[1] .. 'lease:' .. id, 'tenant', 'compute')
  local t = f[1] or 'default'
  if not count[t] then
    count[t], compute[t] = 0, 0
    order[#order + 1] = t
  end
  count[t] = count[t] + 1
  compute[t] = compute[t] + (tonumber(f[2] or '0') or 0)
end
local out = {}
for _, t in ipairs(order) do
  out[#out + 1] = t
  out[#out + 1] = count[t]
  out[#out + 1] = compute[t]
end
return out
