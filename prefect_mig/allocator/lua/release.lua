-- Release a lease, or (A[3] = 'revoke') revoke it for an admin. Idempotent: releasing a lease that
-- is already gone is not an error.
-- A[1] - lease id
-- A[2] - fencing token the holder was granted (release only)
-- A[3] - 'release' (default) | 'revoke'
-- returns {'ok'} | {'gone'} (already released, expired or revoked) | {'stale', current fence}
--       | {'revoked', expires_at} (revoke: the holder is told, as a preempted one is)
local id, fence = A[1], A[2]
if A[3] == 'revoke' then
  -- Not ended here: its holder may still use the slice. The holder is told at once (a push on its
  -- notice key); its next renew shortens the lease to the cluster's grace, and the slice goes on
  -- when the holder releases it or the lease expires (then, on a fencing node, after its agent has
  -- removed the holder's container), exactly as for a preemption.
  local f = redis.call('HMGET', lease_key(id), 'fence', 'revoked_at', 'expires_at', 'preemptible_pkey', 'tenant', 'slice')
  if not f[1] then return {'gone'} end
  if not f[2] then
    if f[4] then redis.call('ZREM', preemptible_key(f[4]), id) end
    redis.call('HSET', lease_key(id), 'revoked_at', NOW, 'revoked_for', 'admin', 'revoked_priority', 'admin')
    redis.call('RPUSH', notice_key(id), 'revoked|admin')
    redis.call('PEXPIRE', notice_key(id), 600000)
    event('lease.revoked', {'lease', id, 'for', 'admin', 'priority', 'admin', 'deadline', f[3],
      'tenant', f[5] or '', 'slice', f[6] or ''})
  end
  return {'revoked', redis.call('HGET', lease_key(id), 'expires_at')}
end
local current = redis.call('HGET', lease_key(id), 'fence')
if not current then return {'gone'} end
if current ~= fence then return {'stale', current} end
end_lease(id, 'released')
return {'ok'}
