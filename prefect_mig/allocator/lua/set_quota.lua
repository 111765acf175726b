-- Set or clear a tenant's quota.
-- A[1] - tenant
-- A[2] - quota JSON {"slices": n|null, "compute": n|null}, or '' to remove the quota
-- returns {'ok'}
local tenant = A[1]
-- recount the tenant's live leases: usage is kept only while a quota exists
local slices, compute = 0, 0
for _, lid in ipairs(redis.call('ZRANGE', K.leases, 0, -1)) do
  local f = redis.call('HMGET', lease_key(lid), 'tenant', 'compute')
  if f[1] == tenant then
    if A[2] == '' then
      redis.call('HDEL', lease_key(lid), 'counted')
    else
      redis.call('HSET', lease_key(lid), 'counted', 1)
      slices = slices + 1
      compute = compute + tonumber(f[2] or '0')
    end
  end
end
if A[2] == '' then
  redis.call('HDEL', K.quotas, tenant)
  redis.call('HDEL', K.tenant_slices, tenant)
  redis.call('HDEL', K.tenant_compute, tenant)
else
  redis.call('HSET', K.quotas, tenant, A[2])
  redis.call('HSET', K.tenant_slices, tenant, slices)
  redis.call('HSET', K.tenant_compute, tenant, compute)
end
event('quota.set', {'tenant', tenant, 'quota', A[2]})
retry_tenant(tenant)
return {'ok'}
