-- Acquire a slice or join the wait queue.
-- A[1] - request JSON: id, pkeys (acceptable "<model>/<profile>", best fit first), node ('' = any),
--        priority, tenant, holder, ttl_ms, preemptible
-- A[2] - '1' to wait when nothing fits now, '0' to fail instead
-- A[3] - ms a waiting request lives without being touched (a dead waiter's request is reaped then)
-- A[4] - aging: ms of waiting worth one priority level
-- A[5] - '1' to let this request revoke a lower-priority preemptible lease (the grace is the cluster's)
-- A[6] - '1' to queue for kinds no GPU is carved into yet; they also queue while a repartitioner
--        announces itself (KEYS repartitioner), since it will carve them
-- A[7] - ms its caller waits at most ('' = no end): after that the request is dropped, never granted
-- returns {'granted', lease_id, fence, expires_at, slice_id, slice_json}
--       | {'queued', request_id, queue_length}
--       | {'no_capacity', 'busy' | 'quota' | 'uncarved'}
--       | {'unsatisfiable', pkeys in the inventory (comma-separated)}
--       | {'exists', 'leased' | 'waiting'}   (this request id was seen: a retried call)
--       | {'unknown_node', published nodes (comma-separated)}
local r = cjson.decode(A[1])
local wait = A[2] == '1'
reap_expired(10)

if redis.call('EXISTS', lease_key(r.id)) == 1 then return {'exists', 'leased'} end
if redis.call('HEXISTS', K.requests, r.id) == 1 then return {'exists', 'waiting'} end

-- A node no agent ever published is refused, not queued: nothing would ever serve it. A node that
-- published once stays in K.nodes when it is drained or its heartbeat lapses (it may come back).
-- With no node published at all (agents still starting), the request is judged as before.
if r.node ~= '' and redis.call('HEXISTS', K.nodes, r.node) == 0 and redis.call('HLEN', K.nodes) > 0 then
  return {'unknown_node', table.concat(redis.call('HKEYS', K.nodes), ',')}
end

local quota_hit = false
local function try_grant(id, pkey)
  -- The hot path needs only the kind and its compute slices (the 'g' in the profile name), so it
  -- does not decode the slice's JSON; the raw JSON goes back to the caller.
  local s = {pkey = pkey, compute_slices = tonumber(string.match(pkey, '/(%d+)g')),
    _raw = redis.call('HGET', K.slices, id)}
  local blocked, counted = quota_blocks(r.tenant, s.compute_slices)
  if blocked then quota_hit = true; return nil end
  local fence, expires = grant(r, id, s, counted)
  return {'granted', r.id, fence, expires, id, s._raw}
end

for _, pkey in ipairs(r.pkeys) do
  if r.node == '' then
    local best = redis.call('ZRANGE', free_key(pkey), 0, 0)[1]
    if best then
      local got = try_grant(best, pkey)
      if got then return got end
    end
  else
    -- a node constraint: look only at that node's slices (at most a few dozen)
    local best, best_score = nil, nil
    for _, id in ipairs(redis.call('SMEMBERS', node_slices_key(r.node))) do
      local score = redis.call('ZSCORE', free_key(pkey), id)
      if score and (not best_score or tonumber(score) < best_score) then best, best_score = id, tonumber(score) end
    end
    if best then
      local got = try_grant(best, pkey)
      if got then return got end
    end
  end
end

local carved = false
for _, pkey in ipairs(r.pkeys) do
  if redis.call('SISMEMBER', K.pkeys, pkey) == 1 then carved = true; break end
end
if not (carved or A[6] == '1' or redis.call('EXISTS', K.repartitioner) == 1) then
  return {'unsatisfiable', table.concat(redis.call('SMEMBERS', K.pkeys), ',')}
end

if not wait then return {'no_capacity', quota_hit and 'quota' or (carved and 'busy' or 'uncarved')} end

local seq = redis.call('INCR', K.seq)
local order = (NOW - r.priority * tonumber(A[4])) * 1024 + (seq % 1024)
r.enqueued_at = NOW
if A[7] ~= '' then r.gives_up_at = NOW + tonumber(A[7]) end
r.order = string.format('%.0f', order)
for _, pkey in ipairs(r.pkeys) do redis.call('ZADD', waitq_key(pkey), order, r.id) end
redis.call('ZADD', K.waiting, order, r.id)
redis.call('ZADD', K.wait_deadline, NOW + tonumber(A[3]), r.id)
redis.call('ZADD', tenant_waiting_key(r.tenant), order, r.id)
redis.call('HSET', K.requests, r.id, cjson.encode(r))
event('lease.queued', {'request', r.id, 'priority', r.priority, 'tenant', r.tenant, 'holder', r.holder,
  'order', order, 'pkeys', table.concat(r.pkeys, ',')})

-- Preemption: revoke the lowest-priority preemptible lease on a slice this request accepts, if its
-- priority is strictly lower and the request's quota would let it take that slice. The holder is
-- told at once (a push on its notice key); its lease keeps its expiry until the holder acknowledges
-- (renews), which shortens it to at most the cluster's grace. The slice goes to the best waiter when
-- the holder releases it or the lease expires; leaving the queue before the holder acknowledged
-- undoes the revocation.
-- A warm (idle) lease on a kind this request accepts is handed over before anyone is revoked.
local nudged = nudge_warm(r)
if A[5] == '1' and not nudged then
  local victim, victim_prio = nil, nil
  for _, pkey in ipairs(r.pkeys) do
    local low = redis.call('ZRANGE', preemptible_key(pkey), 0, 0, 'WITHSCORES')
    if low[1] and tonumber(low[2]) < r.priority and (not victim_prio or tonumber(low[2]) < victim_prio) then
      local f = redis.call('HMGET', lease_key(low[1]), 'slice', 'tenant', 'compute')
      local s = f[1] and slice(f[1])
      local fits = s and (r.node == '' or s.node == r.node) and not node_drained(s.node)
      if fits and f[2] ~= r.tenant and quota_blocks(r.tenant, tonumber(f[3] or '0')) then fits = false end
      if fits then victim, victim_prio = low[1], tonumber(low[2]) end
    end
  end
  if victim then
    local pkey = redis.call('HGET', lease_key(victim), 'preemptible_pkey')
    redis.call('ZREM', preemptible_key(pkey), victim)
    redis.call('HSET', lease_key(victim), 'revoked_at', NOW, 'revoked_for', r.id, 'revoked_priority', r.priority)
    redis.call('RPUSH', notice_key(victim), 'revoked|' .. r.priority)
    redis.call('PEXPIRE', notice_key(victim), 600000)
    r.revoked = victim
    redis.call('HSET', K.requests, r.id, cjson.encode(r))
    local v = redis.call('HMGET', lease_key(victim), 'expires_at', 'tenant', 'slice')
    event('lease.revoked', {'lease', victim, 'for', r.id, 'priority', victim_prio,
      'deadline', v[1], 'tenant', v[2] or '', 'slice', v[3] or ''})
  end
end
return {'queued', r.id, redis.call('ZCARD', K.waiting)}
