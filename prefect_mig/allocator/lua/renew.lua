-- Renew a lease for another TTL.
-- A[1] - lease id
-- A[2] - fencing token the holder was granted
-- A[3] - new TTL in ms
-- returns {'ok', expires_at} | {'gone'} | {'stale', current fence} | {'expired'} | {'revoked', deadline}
local id, fence = A[1], A[2]
local f = redis.call('HMGET', lease_key(id), 'fence', 'expires_at', 'revoked_at')
if not f[1] then return {'gone'} end
if f[1] ~= fence then return {'stale', f[1]} end
if tonumber(f[2]) < NOW then
  end_lease(id, 'expired')
  return {'expired'}
end
if f[3] then return {'revoked', f[2]} end
local expires = NOW + tonumber(A[3])
redis.call('HSET', lease_key(id), 'expires_at', expires)
redis.call('ZADD', K.leases, 'XX', expires, id)
return {'ok', expires}
