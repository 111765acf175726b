-- Release a lease. Idempotent: releasing a lease that is already gone is not an error.
-- A[1] - lease id
-- A[2] - fencing token the holder was granted
-- returns {'ok'} | {'gone'} (already released, expired or revoked) | {'stale', current fence}
local id, fence = A[1], A[2]
local current = redis.call('HGET', lease_key(id), 'fence')
if not current then return {'gone'} end
if current ~= fence then return {'stale', current} end
end_lease(id, 'released')
return {'ok'}
