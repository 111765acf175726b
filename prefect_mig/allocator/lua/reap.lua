-- Sweep: expire leases past their deadline, drop waiting requests nobody touched, and stop granting
-- on nodes whose heartbeat stopped.
-- A[1] - at most this many of each kind per call
-- returns {expired leases, dropped requests, nodes lost}
local limit = tonumber(A[1])
local expired = reap_expired(limit)
local dropped = 0
for _, rid in ipairs(redis.call('ZRANGEBYSCORE', K.wait_deadline, '-inf', '(' .. NOW, 'LIMIT', 0, limit)) do
  local raw = redis.call('HGET', K.requests, rid)
  if raw then
    dequeue(cjson.decode(raw))
    event('lease.abandoned', {'request', rid})
  else
    redis.call('ZREM', K.wait_deadline, rid)
  end
  dropped = dropped + 1
end
local lost = 0
for _, node in ipairs(redis.call('ZRANGEBYSCORE', K.node_deadline, '-inf', '(' .. NOW, 'LIMIT', 0, limit)) do
  redis.call('ZREM', K.node_deadline, node)
  for _, id in ipairs(redis.call('SMEMBERS', node_slices_key(node))) do
    if redis.call('HGET', K.slice_state, id) == 'free' then
      redis.call('ZREM', free_key(slice(id).pkey), id)
      redis.call('HSET', K.slice_state, id, 'unavailable')
    end
  end
  event('node.lost', {'node', node})
  lost = lost + 1
end
return {expired, dropped, lost}
