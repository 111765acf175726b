-- Stop waiting.
-- A[1] - request id
-- returns {'cancelled'} | {'granted', fence} (it was granted meanwhile: the caller owns the lease)
--       | {'gone'} (neither waiting nor leased)
local id = A[1]
local raw = redis.call('HGET', K.requests, id)
if raw then
  dequeue(cjson.decode(raw))
  redis.call('DEL', waiter_key(id))
  event('lease.cancelled', {'request', id})
  return {'cancelled'}
end
local fence = redis.call('HGET', lease_key(id), 'fence')
if fence then return {'granted', fence} end
return {'gone'}
