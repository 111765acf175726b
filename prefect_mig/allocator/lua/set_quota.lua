-- Set or clear a tenant's quota.
-- A[1] - tenant
-- A[2] - quota JSON {"slices": n|null, "compute": n|null}, or '' to remove the quota
-- returns {'ok'}
local tenant = A[1]
if A[2] == '' then
  redis.call('HDEL', K.quotas, tenant)
else
  redis.call('HSET', K.quotas, tenant, A[2])
end
event('quota.set', {'tenant', tenant, 'quota', A[2]})
retry_tenant(tenant)
return {'ok'}
