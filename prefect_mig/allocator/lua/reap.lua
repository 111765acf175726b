-- Sweep: expire leases past their deadline, drop waiting requests nobody touched, and stop granting
-- on nodes whose heartbeat stopped.
-- A[1] - at most this many of each kind per call
-- A[2] - optional: take at most this many announcements (JSON, see announce() in _lib.lua) for the
--        caller to emit; 0 or absent leaves them for a process that emits them
-- returns {expired leases, dropped requests, nodes lost, announcement...}
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
  node_lost(node, 'heartbeat')
  lost = lost + 1
end
-- quarantined slices whose settle time has passed; one waiting for its node's agent to fence an
-- expired holder's container waits on while that node is out of service (nobody fences there)
for _, id in ipairs(redis.call('ZRANGEBYSCORE', K.quarantine, '-inf', NOW, 'LIMIT', 0, limit)) do
  local s = slice(id)
  local settle_ms = s and redis.call('HEXISTS', K.awaiting_fence, id) == 1 and fence_settle_ms(s.node)
  if settle_ms and not node_alive(s.node) then
    redis.call('ZADD', K.quarantine, NOW + settle_ms, id)
  else
    unquarantine(id, 'timeout')
    if s and redis.call('HGET', K.slice_state, id) == 'quarantined' then offer(id, s) end
  end
end
-- Re-offer: a free slice while requests of its kind wait (a hand-off that found nobody eligible
-- then, before a quota or node constraint changed) goes to the best eligible waiter now.
for _, pkey in ipairs(redis.call('SMEMBERS', K.pkeys)) do
  if redis.call('ZCARD', waitq_key(pkey)) > 0 then
    for _, id in ipairs(redis.call('ZRANGE', free_key(pkey), 0, 3)) do
      local s = slice(id)
      redis.call('ZREM', free_key(pkey), id)
      if s then offer(id, s) end
    end
  end
end
local reply = {expired, dropped, lost}
local take = tonumber(A[2] or '0')
if take > 0 then
  for _, a in ipairs(redis.call('LRANGE', K.announce, 0, take - 1)) do reply[#reply + 1] = a end
  redis.call('LTRIM', K.announce, take, -1)
end
return reply
