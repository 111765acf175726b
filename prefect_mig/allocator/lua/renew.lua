-- Renew a lease for another TTL.
-- A[1] - lease id
-- A[2] - fencing token the holder was granted
-- A[3] - new TTL in ms ('' : the lease's own TTL, the one it was granted or last renewed with)
-- returns {'ok', expires_at, ms left} | {'gone'} | {'stale', current fence} | {'expired'}
--       | {'revoked', expires_at, priority of the request it was revoked for, ms left}
-- A revoked lease is not renewed: the holder's call acknowledges the revocation, and the lease keeps
-- at most the cluster's grace from now (never more than it had).
local id, fence = A[1], A[2]
local f = redis.call('HMGET', lease_key(id), 'fence', 'expires_at', 'revoked_at', 'revoked_priority', 'acked', 'ttl_ms')
if not f[1] then return {'gone'} end
if f[1] ~= fence then return {'stale', f[1]} end
if tonumber(f[2]) < NOW then
  end_lease(id, 'expired')
  return {'expired'}
end
if f[3] then
  local deadline = tonumber(f[2])
  if not f[5] then
    deadline = math.min(deadline, NOW + grace_ms())
    redis.call('HSET', lease_key(id), 'expires_at', deadline, 'acked', 1)
    redis.call('ZADD', K.leases, 'XX', deadline, id)
  end
  return {'revoked', deadline, f[4] or '?', deadline - NOW}
end
local ttl = tonumber(A[3])
if ttl then redis.call('HSET', lease_key(id), 'ttl_ms', ttl) else ttl = tonumber(f[6]) or 60000 end
local expires = NOW + ttl
redis.call('HSET', lease_key(id), 'expires_at', expires)
redis.call('ZADD', K.leases, 'XX', expires, id)
return {'ok', expires, expires - NOW}
