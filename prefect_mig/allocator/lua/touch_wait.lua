-- A waiter says it is still there.
-- A[1] - request id
-- A[2] - ms it may stay silent from now on
-- returns {'waiting'} | {'granted'} | {'gone'}
local id = A[1]
if redis.call('HEXISTS', K.requests, id) == 1 then
  redis.call('ZADD', K.wait_deadline, 'XX', NOW + tonumber(A[2]), id)
  return {'waiting'}
end
if redis.call('EXISTS', lease_key(id)) == 1 then return {'granted'} end
return {'gone'}
