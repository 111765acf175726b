-- Shared by every allocator script (scripts.py prepends it).
-- KEYS: the fixed keys, in the order of prefect_mig.allocator.scripts.FIXED_KEYS; then, in the
--       scripts a node agent runs for its node (see claim_refusal) and forget_node, the node's claim
--       (Keys.agent(node))
-- ARGV[1] - key prefix "pmig:{ns}:"; per-entity keys are built from it with the suffixes in keys.py
-- ARGV[2] - now in ms from an injected clock, or '' to use Redis TIME
-- ARGV[3] - approximate max length of the events stream
-- ARGV[4..] - the script's own arguments
local K = {
  slices = KEYS[1], slice_state = KEYS[2], gpus = KEYS[3], draining = KEYS[4], nodes = KEYS[5],
  node_deadline = KEYS[6], pkeys = KEYS[7], leases = KEYS[8], fence = KEYS[9], seq = KEYS[10],
  requests = KEYS[11], waiting = KEYS[12], wait_deadline = KEYS[13], tenant_slices = KEYS[14],
  tenant_compute = KEYS[15], quotas = KEYS[16], events = KEYS[17], repartitioner = KEYS[18],
  withholding = KEYS[19], config = KEYS[20], epoch = KEYS[21], quarantine = KEYS[22],
  counters = KEYS[23],
  drained_nodes = KEYS[24], awaiting_fence = KEYS[25], announce = KEYS[26], run_id = KEYS[27],
  desired = KEYS[28],
  node_claim = KEYS[29],  -- only the scripts an agent runs for its node and forget_node get it (nil in the others)
}
local P = ARGV[1]
local NOW
if ARGV[2] ~= '' then
  NOW = tonumber(ARGV[2])
else
  local t = redis.call('TIME')
  NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local MAXLEN = tonumber(ARGV[3])
local A = {}
for i = 4, #ARGV do A[#A + 1] = ARGV[i] end

local function lease_key(id) return P .. 'lease:' .. id end
local function waiter_key(id) return P .. 'waiter:' .. id end
local function waitq_key(pkey) return P .. 'waitq:' .. pkey end
local function free_key(pkey) return P .. 'free:' .. pkey end
local function gpu_slices_key(uuid) return P .. 'gpu_slices:' .. uuid end
local function node_slices_key(node) return P .. 'node_slices:' .. node end
local function tenant_waiting_key(tenant) return P .. 'tenant_waiting:' .. tenant end
local function preemptible_key(pkey) return P .. 'preemptible:' .. pkey end
local function notice_key(id) return P .. 'notice:' .. id end
local function warm_key(pkey) return P .. 'warm:' .. pkey end

-- Every transition is appended to the events stream and counted in K.counters ('event:<type>'),
-- which outlives the stream's trimming: metrics read the counters, never the whole stream.
local function event(kind, fields)
  local args = {'XADD', K.events, 'MAXLEN', '~', MAXLEN, '*', 'type', kind, 'at', NOW}
  for i = 1, #fields do args[#args + 1] = fields[i] end
  redis.call(unpack(args))
  redis.call('HINCRBY', K.counters, 'event:' .. kind, 1)
end

-- Transitions that any sweeping process may make (a lease expiry, an agent gone silent) wait in
-- K.announce until a process that emits Prefect events takes them (reap.lua with A[2] > 0): each
-- is taken, so emitted, once. Capped, so a cluster without such a process stays small.
local ANNOUNCE_CAP = 1000
local function announce(t)
  t.at = NOW
  redis.call('RPUSH', K.announce, cjson.encode(t))
  redis.call('LTRIM', K.announce, -ANNOUNCE_CAP, -1)
end

-- Histograms of milliseconds in K.counters: '<name>:<i>' counts observations in bucket i (the first
-- bound >= the value; #HIST_BOUNDS_MS + 1 is +Inf), '<name>:sum' their total. The bounds are
-- prefect_mig.metrics.BUCKETS_MS (a test checks they agree).
local HIST_BOUNDS_MS = {5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000,
  900000, 3600000, 14400000}
local function observe(name, ms)
  local i = 1
  while i <= #HIST_BOUNDS_MS and ms > HIST_BOUNDS_MS[i] do i = i + 1 end
  redis.call('HINCRBY', K.counters, name .. ':' .. i, 1)
  redis.call('HINCRBY', K.counters, name .. ':sum', ms)
end

-- A missing epoch means this Redis lost the cluster's state (FLUSHALL, a new server without AOF):
-- start a new epoch and say so in the (new) events stream, so a checker knows the log restarted.
local EPOCH = redis.call('GET', K.epoch)
local NEW_EPOCH = false
if not EPOCH then
  EPOCH = string.format('%.0f', NOW)
  NEW_EPOCH = true
  redis.call('SET', K.epoch, EPOCH)
  event('cluster.epoch', {'epoch', EPOCH})
end

-- Preemption grace is the cluster's (HASH config, field grace_ms), never shorter than the floor
-- a holder needs to stop its container.
local GRACE_FLOOR_MS = 2000
local function grace_ms()
  local v = tonumber(redis.call('HGET', K.config, 'grace_ms') or '')
  return math.max(v or 10000, GRACE_FLOOR_MS)
end

local function slice(id)
  local raw = redis.call('HGET', K.slices, id)
  if not raw then return nil end
  local s = cjson.decode(raw)
  s._raw = raw
  return s
end

local function gpu_draining(uuid)
  return redis.call('SISMEMBER', K.draining, uuid) == 1
end

-- a node drained for maintenance (`prefect-mig node drain`): its slices get no new grants
local function node_drained(node)
  return redis.call('SISMEMBER', K.drained_nodes, node) == 1
end

-- A node agent's write for its node (publish, heartbeat, withdraw, restore, settle) lands only while
-- the node's claim (K.node_claim) is still the agent's, `claim`: one delayed past the claim's TTL (a
-- pause, a partition) must not undo what the agent that took the node over did since, e.g. put back
-- into service slices it withdrew to destroy. '' = unfenced (a caller that is no agent: the CLI,
-- a fleet published without one). nil when the write may go on, else the script's reply:
-- {'not_claimed', the node's claim now or ''}. Checked here, atomically with the write: the
-- agent's own check in Python comes before the write is sent.
local function claim_refusal(claim)
  if (claim or '') == '' then return nil end
  local holder = redis.call('GET', K.node_claim)
  if holder == claim then return nil end
  return {'not_claimed', holder or ''}
end

local function node_alive(node)
  return redis.call('ZSCORE', K.node_deadline, node) ~= false
end

-- First fit over a fixed GPU order (each GPU gets an ordinal when first published): leases pack
-- onto the first GPUs, so the last ones stay idle and whole for the planner to re-carve. Static
-- scores mean a grant or release never re-scores other slices. Lower score wins.
local function free_score(s)
  return (s.ordinal or 0) * 16 + s.start
end

-- Slice state: 'free', 'draining', 'unavailable', or 'leased|<lease id>'.
local function leased_by(state)
  if state and string.sub(state, 1, 7) == 'leased|' then return string.sub(state, 8) end
  return nil
end

-- Usage is counted only for tenants with a quota (set_quota recounts when one is set).
local function quota_blocks(tenant, compute)
  local raw = redis.call('HGET', K.quotas, tenant)
  if not raw then return false, false end
  local q = cjson.decode(raw)
  local used = tonumber(redis.call('HGET', K.tenant_slices, tenant) or '0')
  local used_c = tonumber(redis.call('HGET', K.tenant_compute, tenant) or '0')
  if q.slices and q.slices ~= cjson.null and used + 1 > q.slices then return true, true end
  if q.compute and q.compute ~= cjson.null and used_c + compute > q.compute then return true, true end
  return false, true
end

-- A request that leaves the queue before its victim acknowledged the revocation undoes it.
local function undo_revocation(r)
  if not r.revoked then return end
  local f = redis.call('HMGET', lease_key(r.revoked), 'revoked_for', 'acked', 'preemptible_pkey', 'priority')
  if f[1] ~= r.id or f[2] then return end
  redis.call('HDEL', lease_key(r.revoked), 'revoked_at', 'revoked_for', 'revoked_priority')
  if f[3] then redis.call('ZADD', preemptible_key(f[3]), f[4], r.revoked) end
  event('lease.unrevoked', {'lease', r.revoked, 'for', r.id})
end

local function dequeue(r)
  undo_revocation(r)
  for _, pkey in ipairs(r.pkeys) do redis.call('ZREM', waitq_key(pkey), r.id) end
  redis.call('ZREM', K.waiting, r.id)
  redis.call('ZREM', K.wait_deadline, r.id)
  redis.call('ZREM', tenant_waiting_key(r.tenant), r.id)
  redis.call('HDEL', K.requests, r.id)
end

-- Fencing tokens must keep growing even if Redis lost its data or a replica that missed the last
-- grants was promoted: the counter never falls behind the clock (1024 tokens per ms), so a token
-- handed out before the loss or failover is below any token handed out after it (when clocks agree
-- to within the outage).
local function next_fence()
  local fence = redis.call('INCR', K.fence)
  local floor = NOW * 1024
  if fence < floor then
    redis.call('SET', K.fence, string.format('%.0f', floor))
    fence = redis.call('INCR', K.fence)
  end
  return fence
end

local function grant(r, id, s, counted)
  local fence = next_fence()
  local expires = NOW + r.ttl_ms
  local waited = NOW - (r.enqueued_at or NOW)
  redis.call('HSET', lease_key(r.id),
    'slice', id, 'fence', fence, 'holder', r.holder, 'tenant', r.tenant, 'priority', r.priority,
    'ttl_ms', r.ttl_ms, 'granted_at', NOW, 'expires_at', expires, 'waited_ms', waited,
    'compute', s.compute_slices)
  if r.preemptible then
    redis.call('HSET', lease_key(r.id), 'preemptible_pkey', s.pkey)
    redis.call('ZADD', preemptible_key(s.pkey), r.priority, r.id)
  end
  redis.call('ZADD', K.leases, expires, r.id)
  redis.call('HSET', K.slice_state, id, 'leased|' .. r.id)
  redis.call('ZREM', free_key(s.pkey), id)
  if counted then
    redis.call('HSET', lease_key(r.id), 'counted', 1)
    redis.call('HINCRBY', K.tenant_slices, r.tenant, 1)
    redis.call('HINCRBY', K.tenant_compute, r.tenant, s.compute_slices)
  end
  event('lease.granted', {'lease', r.id, 'slice', id, 'fence', fence, 'priority', r.priority,
    'pkey', s.pkey, 'order', r.order or '', 'waited_ms', waited, 'holder', r.holder, 'tenant', r.tenant,
    'wants', table.concat(r.pkeys, ',')})
  observe('wait_ms', waited)
  return fence, expires, waited
end

-- nil when the request may not take the slice, else whether its tenant's usage is counted
local function eligible(r, s)
  if r.node ~= '' and r.node ~= s.node then return nil end
  local blocked, counted = quota_blocks(r.tenant, s.compute_slices)
  if blocked then return nil end
  return counted
end

-- Grant a slice to a waiting request and push the grant onto its waiter's key: the waiter learns
-- everything it needs from the push (fence, expiry, waited ms, slice), with no read after waking.
-- A handed-over lease lives only r.claim_ms (when the request has one) until its waiter claims it
-- (renews it, on waking): a grant to a waiter that died meanwhile comes back within that time
-- instead of a whole TTL.
local function hand_over(r, id, s, counted)
  dequeue(r)
  local fence, expires, waited = grant(r, id, s, counted)
  if r.claim_ms and expires > NOW + r.claim_ms then
    expires = NOW + r.claim_ms
    redis.call('HSET', lease_key(r.id), 'expires_at', expires)
    redis.call('ZADD', K.leases, expires, r.id)
  end
  redis.call('RPUSH', waiter_key(r.id), string.format('%.0f|%.0f|%.0f|', fence, expires, waited) .. s._raw)
  redis.call('PEXPIRE', waiter_key(r.id), 600000)
end

-- A waiting request whose caller's wait is over (r.gives_up_at) is dropped, never granted: its caller
-- may have given up without its withdrawal reaching Redis. Returns true when it was dropped.
local function drop_if_given_up(r)
  if not r.gives_up_at or r.gives_up_at >= NOW then return false end
  dequeue(r)
  event('lease.abandoned', {'request', r.id})
  return true
end

-- Lift a slice's quarantine. `by`: 'agent' (its node's agent confirmed no task container of the
-- expired lease runs on it, settle.lua), 'timeout' (the settle time passed), 'removed'.
local function unquarantine(id, by)
  redis.call('ZREM', K.quarantine, id)
  local lease = redis.call('HGET', K.awaiting_fence, id)
  if lease then
    redis.call('HDEL', K.awaiting_fence, id)
    event('slice.settled', {'slice', id, 'lease', lease, 'by', by})
  end
end

-- How long a slice of `node` waits, after its holder's lease expired, for the node's agent to
-- confirm the holder's task container gone (the agent published fence_settle_ms: it fences task
-- containers); nil when the node has no fencing agent (a simulated fleet): offered at once.
local function fence_settle_ms(node)
  local raw = redis.call('HGET', K.nodes, node)
  if not raw then return nil end
  local v = cjson.decode(raw).fence_settle_ms
  if type(v) ~= 'number' then return nil end
  return v
end

-- Give a slice that just became available to the best waiter that accepts it, or mark it free.
-- Waiters are ordered by (enqueue time - priority * aging), so priority is strict until aging wins.
local function offer(id, s)
  if s.busy then
    -- processes run on it that no lease here accounts for (e.g. Redis lost its state): not granted
    -- until the agent reports it idle
    redis.call('HSET', K.slice_state, id, 'unavailable')
    return nil
  end
  local settles = redis.call('ZSCORE', K.quarantine, id)
  if settles then
    if tonumber(settles) > NOW then
      -- published after Redis lost its state, or its holder's lease expired: an old holder may
      -- still use it until settled
      redis.call('ZREM', free_key(s.pkey), id)
      redis.call('HSET', K.slice_state, id, 'quarantined')
      return nil
    end
    unquarantine(id, 'timeout')
  end
  if redis.call('SISMEMBER', K.withholding, id) == 1 then
    -- a re-carve will destroy it: out of service until the publish that removes it
    redis.call('ZREM', free_key(s.pkey), id)
    redis.call('HSET', K.slice_state, id, 'withdrawn')
    return nil
  end
  if gpu_draining(s.gpu_uuid) or node_drained(s.node) then
    redis.call('HSET', K.slice_state, id, 'draining')
    return nil
  end
  if not node_alive(s.node) then
    redis.call('HSET', K.slice_state, id, 'unavailable')
    return nil
  end
  local q = waitq_key(s.pkey)
  -- Look past any number of waiters this slice cannot serve (another node, a quota used up): a
  -- tenant found blocked once is not asked again for this slice.
  local blocked_tenant = {}
  local from = 0
  while true do
    local batch = redis.call('ZRANGE', q, from, from + 63)
    if #batch == 0 then break end
    local removed = 0
    for _, rid in ipairs(batch) do
      local raw = redis.call('HGET', K.requests, rid)
      if not raw then
        redis.call('ZREM', q, rid)
        removed = removed + 1
      else
        local r = cjson.decode(raw)
        if drop_if_given_up(r) then
          removed = removed + 1
        elseif not blocked_tenant[r.tenant] then
          local counted = eligible(r, s)
          if counted ~= nil then
            hand_over(r, id, s, counted)
            return rid
          end
          if r.node == '' or r.node == s.node then blocked_tenant[r.tenant] = true end
        end
      end
    end
    from = from + #batch - removed
  end
  redis.call('HSET', K.slice_state, id, 'free')
  redis.call('ZADD', free_key(s.pkey), free_score(s), id)
  return nil
end

-- After a tenant's usage drops, its quota-blocked waiters may fit a slice that is already free.
local function retry_tenant(tenant)
  for _, rid in ipairs(redis.call('ZRANGE', tenant_waiting_key(tenant), 0, -1)) do
    local raw = redis.call('HGET', K.requests, rid)
    local r = raw and cjson.decode(raw)
    if r and not drop_if_given_up(r) then
      for _, pkey in ipairs(r.pkeys) do
        local best = redis.call('ZRANGE', free_key(pkey), 0, 0)[1]
        if best then
          local s = slice(best)
          local counted = eligible(r, s)
          if counted ~= nil then
            hand_over(r, best, s, counted)
            break
          end
        end
      end
    end
  end
end

-- K.pkeys holds the kinds carved now: a kind whose last slice was removed (re-carved away, its
-- node forgotten) leaves it, or a request for it would read as "every slice leased" and never as
-- uncarved. Called after a removal with the kinds it may have emptied; a kind with a free slice is
-- kept at once, the others by one pass over the GPUs' slices.
local function prune_kinds(kinds)
  local check = {}
  for _, pkey in ipairs(kinds) do
    if redis.call('ZCARD', free_key(pkey)) == 0 then check['|' .. pkey] = pkey end
  end
  if next(check) == nil then return end
  for _, uuid in ipairs(redis.call('HKEYS', K.gpus)) do
    for _, v in ipairs(redis.call('HVALS', gpu_slices_key(uuid))) do
      check[string.sub(v, (string.find(v, '|', 1, true)))] = nil
    end
    if next(check) == nil then return end
  end
  for _, pkey in pairs(check) do redis.call('SREM', K.pkeys, pkey) end
end

-- End a lease (released, expired, revoked): free its slice for the next waiter.
local function end_lease(lease_id, reason)
  local f = redis.call('HMGET', lease_key(lease_id), 'slice', 'fence', 'tenant', 'compute', 'preemptible_pkey', 'counted',
    'granted_at', 'holder')
  local id, fence, tenant = f[1], f[2], f[3]
  local held = NOW - tonumber(f[7] or NOW)
  if f[5] then redis.call('ZREM', preemptible_key(f[5]), lease_id) end
  local warm_pkey = redis.call('HGET', lease_key(lease_id), 'warm_pkey')
  if warm_pkey then redis.call('ZREM', warm_key(warm_pkey), lease_id) end
  redis.call('DEL', lease_key(lease_id))
  redis.call('DEL', notice_key(lease_id))
  redis.call('ZREM', K.leases, lease_id)
  if f[6] then
    redis.call('HINCRBY', K.tenant_slices, tenant, -1)
    redis.call('HINCRBY', K.tenant_compute, tenant, -tonumber(f[4] or '0'))
  end
  -- where the slice was (usage reports the lease there even after its slice is re-carved)
  local where = slice(id) or {}
  event('lease.' .. reason, {'lease', lease_id, 'slice', id, 'fence', fence, 'tenant', tenant or '',
    'compute', f[4] or '', 'held_ms', held, 'gpu', where.node and (where.node .. '/' .. where.gpu_index) or '',
    'profile', where.profile or '', 'model', where.gpu_model or ''})
  if f[7] then observe('held_ms', held) end
  if reason == 'expired' then
    announce({type = 'lease.expired', lease = lease_id, slice = redis.call('HGET', K.slices, id) or '',
      tenant = tenant or '', holder = f[8] or '', held_ms = held})
  end
  if leased_by(redis.call('HGET', K.slice_state, id)) == lease_id then
    local s = slice(id)
    if s.gone then
      redis.call('HDEL', K.slices, id)
      redis.call('HDEL', K.slice_state, id)
      redis.call('HDEL', gpu_slices_key(s.gpu_uuid), id)
      redis.call('SREM', node_slices_key(s.node), id)
      redis.call('SREM', K.withholding, id)
      prune_kinds({s.pkey})
    else
      -- An expired lease's holder died or hung: its task container may still run on the slice
      -- until its node's agent removes it, so the slice waits for the agent (settle.lua), at
      -- most the node's fence_settle_ms. A released lease's holder stopped its container first.
      local settle_ms = reason == 'expired' and fence_settle_ms(s.node)
      if settle_ms then
        local settles = NOW + settle_ms
        redis.call('ZADD', K.quarantine, 'GT', settles, id)
        redis.call('HSET', K.awaiting_fence, id, lease_id)
        redis.call('ZREM', free_key(s.pkey), id)
        redis.call('HSET', K.slice_state, id, 'quarantined')
        event('slice.quarantined', {'slice', id, 'lease', lease_id, 'node', s.node, 'until', settles})
      else
        offer(id, s)
      end
    end
  end
  if f[6] then retry_tenant(tenant) end
end

-- A node out of service (its heartbeat lapsed, or its agent says its Docker engine is down): its
-- free slices get no grants until it heartbeats again; leased ones stay out as their leases end.
local function node_lost(node, why)
  redis.call('ZREM', K.node_deadline, node)
  for _, id in ipairs(redis.call('SMEMBERS', node_slices_key(node))) do
    if redis.call('HGET', K.slice_state, id) == 'free' then
      redis.call('ZREM', free_key(slice(id).pkey), id)
      redis.call('HSET', K.slice_state, id, 'unavailable')
    end
  end
  event('node.lost', {'node', node, 'why', why})
  if why == 'heartbeat' then
    announce({type = 'agent.stale', node = node})
    local raw = redis.call('HGET', K.nodes, node)
    if raw then  -- so its return is announced once as well (node_back)
      local rec = cjson.decode(raw)
      rec.silent_since = NOW
      redis.call('HSET', K.nodes, node, cjson.encode(rec))
    end
  end
end

-- A node whose agent heartbeats or publishes again: if it was out of service because its agent went
-- silent, announce its return (`raw` is its node record as it was before).
local function node_back(node, raw)
  local rec = raw and cjson.decode(raw)
  if rec and rec.silent_since then
    announce({type = 'agent.recovered', node = node, silent_ms = NOW - rec.silent_since})
    rec.silent_since = nil
    return cjson.encode(rec)
  end
  return raw
end

local function reap_expired(limit)
  local n = 0
  for _, lid in ipairs(redis.call('ZRANGEBYSCORE', K.leases, '-inf', '(' .. NOW, 'LIMIT', 0, limit)) do
    end_lease(lid, 'expired')
    n = n + 1
  end
  return n
end

-- Warm leases (warm.lua): a holder keeps its idle task process on the slice for the next task of its
-- runner, but warmth never blocks anyone. When a request that could use a warm lease's slice queues
-- (or a re-carve wants the range), the holder is told at once on its notice key ('handover'); it
-- stops its container and releases. A lease told so is never reused (warm.lua 'take' refuses it).
local function ask_handover(lease_id)
  if redis.call('HSETNX', lease_key(lease_id), 'handover', NOW) == 1 then
    redis.call('RPUSH', notice_key(lease_id), 'handover')
    redis.call('PEXPIRE', notice_key(lease_id), 600000)
    event('lease.handover', {'lease', lease_id})
  end
end

-- Ask the first warm lease on a kind request r accepts (on r's node) to hand its slice over;
-- returns its id, or nil when none is warm.
local function nudge_warm(r)
  for _, pkey in ipairs(r.pkeys) do
    for _, lid in ipairs(redis.call('ZRANGE', warm_key(pkey), 0, -1)) do
      local f = redis.call('HMGET', lease_key(lid), 'slice', 'handover')
      local s = f[1] and slice(f[1])
      if s and not f[2] and (r.node == '' or r.node == s.node) then
        ask_handover(lid)
        return lid
      end
    end
  end
  return nil
end

-- A Redis restart (another server run_id than the scripts last saw: a crash, a restore from backup,
-- a failover) may have lost the last writes: a grant made just before may be gone while its holder's
-- task container runs on, so its slice looks free. Every slice not leased here, on a node whose agent
-- fences task containers, then waits as an expired lease's slice does: 'quarantined', awaiting its
-- agent's next fencing pass (settle.lua; at most the node's fence_settle_ms). Nodes without a fencing
-- agent (a simulated fleet) are not held. Runs before any script's own work, so before any grant.
local function hold_after_restart(run_id)
  local marker = 'restart:' .. run_id
  local held = 0
  local nodes = redis.call('HGETALL', K.nodes)
  for i = 1, #nodes, 2 do
    local node = nodes[i]
    local settle_ms = cjson.decode(nodes[i + 1]).fence_settle_ms
    if type(settle_ms) == 'number' then
      for _, id in ipairs(redis.call('SMEMBERS', node_slices_key(node))) do
        local s = slice(id)
        local state = redis.call('HGET', K.slice_state, id)
        if s and not leased_by(state) then
          redis.call('ZADD', K.quarantine, 'GT', NOW + settle_ms, id)
          -- an expired lease's slice keeps its lease: the agent's check covers the MIG UUID either way
          redis.call('HSETNX', K.awaiting_fence, id, marker)
          if state == 'free' then
            redis.call('ZREM', free_key(s.pkey), id)
            redis.call('HSET', K.slice_state, id, 'quarantined')
          end
          event('slice.quarantined', {'slice', id, 'lease', marker, 'node', node, 'until', NOW + settle_ms})
          held = held + 1
        end
      end
    end
  end
  event('cluster.restarted', {'run_id', run_id, 'held', held})
end

local RUN_ID
do
  local info = redis.pcall('INFO', 'server')
  if type(info) == 'table' and info.err then
    return redis.error_reply('NOPERM prefect-mig needs the INFO command to see Redis restarts (' .. info.err ..
      '): grant it to its Redis user, e.g. ACL SETUSER <user> +info')
  end
  local at = string.find(info, 'run_id:', 1, true)  -- a plain find: a pattern costs more than INFO
  if at then RUN_ID = string.match(string.sub(info, at + 7, at + 60), '^%x+') end
end
local SEEN_RUN_ID = redis.call('GET', K.run_id)
if RUN_ID and SEEN_RUN_ID ~= RUN_ID then
  redis.call('SET', K.run_id, RUN_ID)
  if SEEN_RUN_ID or redis.call('HLEN', K.slices) > 0 then hold_after_restart(RUN_ID) end
end
