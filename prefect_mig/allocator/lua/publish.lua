-- A node agent publishes its GPUs and MIG slices (the whole node: what it leaves out is gone).
-- A[1] - node name
-- A[2] - node JSON (docker_url, agent info)
-- A[3] - heartbeat TTL in ms: no heartbeat for that long and the node gets no new grants
-- A[4] - GPUs JSON list: {uuid, index, gpu_model, ...}
-- A[5] - slices JSON list: {id, node, gpu_uuid, gpu_model, profile, pkey, start, size, mig_uuid,
--        compute_slices, memory_mib, generation, busy, ...}; busy = NVML shows processes on it.
--        A busy slice without a lease here (Redis lost its state, or work outside prefect-mig)
--        is 'unavailable' until a later publish reports it idle.
-- A[6] - the cluster epoch this publisher saw before ('' = none): if Redis has a newer one, it lost
--        its state while this node ran, and slices not leased here stay 'quarantined' (granted to
--        nobody) until the new epoch is A[7] ms old, so every holder from before has stopped
-- A[7] - settle time in ms (the cluster's longest lease TTL)
-- A[8] - the publishing agent's claim on the node ('' = none: a fleet published without an agent):
--        refused unless the node's claim (K.node_claim) is still that (claim_refusal: a publish
--        delayed past the claim's TTL must not undo what the agent that took the node over published)
-- KEYS[30] - the node's tombstone (Keys.forgotten(node)), written by `node forget --host-is-gone`: the
--        node was taken for gone while a task container of an expired holder may still have run on
--        it. If its agent publishes it again, every slice waits, quarantined, for that agent's next
--        fencing pass (settle.lua; at most the node's fence_settle_ms), and the tombstone goes. A
--        node without a fencing agent (a simulated fleet) is not held, as after an expiry.
-- returns {slices published, slices removed, slices handed to waiters, current epoch}
--       | {'not_claimed', the node's claim now or ''}
local node = A[1]
local refused = claim_refusal(A[8])
if refused then return refused end
local settle_until = nil
if (A[6] or '') ~= '' and A[6] ~= EPOCH then
  settle_until = tonumber(EPOCH) + tonumber(A[7])
  if settle_until <= NOW then settle_until = nil end
end
local fence_hold = nil  -- {settles = ms, leases = {slice id = expired lease}, marker}
local tomb = redis.call('GET', KEYS[30])
if tomb then
  redis.call('DEL', KEYS[30])
  local settle_ms = cjson.decode(A[2]).fence_settle_ms
  if type(settle_ms) == 'number' then
    local t = cjson.decode(tomb)
    fence_hold = {settles = NOW + settle_ms, leases = type(t.awaiting_fence) == 'table' and t.awaiting_fence or {},
      marker = 'forgotten:' .. string.format('%.0f', tonumber(t.at) or NOW)}
  end
end
node_back(node, redis.call('HGET', K.nodes, node))  -- the new record has no silent_since
redis.call('HSET', K.nodes, node, A[2])
redis.call('ZADD', K.node_deadline, NOW + tonumber(A[3]), node)

local ordinal = {}
for _, g in ipairs(cjson.decode(A[4])) do
  local old = redis.call('HGET', K.gpus, g.uuid)
  g.ordinal = old and cjson.decode(old).ordinal or redis.call('INCR', K.seq)
  g.node = node
  ordinal[g.uuid] = g.ordinal
  redis.call('HSET', K.gpus, g.uuid, cjson.encode(g))
end

local listed = cjson.decode(A[5])
local new = {}
for _, s in ipairs(listed) do new[s.id] = true end

local removed = 0
local had, gone, added = {}, {}, {}
for _, id in ipairs(redis.call('SMEMBERS', node_slices_key(node))) do
  had[id] = true
  if not new[id] then
    gone[#gone + 1] = id
    local s = slice(id)
    if leased_by(redis.call('HGET', K.slice_state, id)) then
      s.gone = true  -- deleted when its lease ends
      s._raw = nil
      redis.call('HSET', K.slices, id, cjson.encode(s))
    else
      redis.call('HDEL', K.slices, id)
      redis.call('HDEL', K.slice_state, id)
      redis.call('ZREM', free_key(s.pkey), id)
      redis.call('HDEL', gpu_slices_key(s.gpu_uuid), id)
      redis.call('SREM', node_slices_key(node), id)
      redis.call('SREM', K.withholding, id)
      unquarantine(id, 'removed')
      removed = removed + 1
    end
  end
end

local handed = 0
for _, s in ipairs(listed) do
  if not had[s.id] then added[#added + 1] = {s.id, s.node .. '/' .. s.gpu_index, s.profile} end
  local state = redis.call('HGET', K.slice_state, s.id)
  if leased_by(state) then s.busy = false end  -- its processes are the holder's own
  -- A slice another node name published (the node was renamed, or two agents name one GPU) is
  -- this node's now: left in the old name's set, that name's lapsed heartbeat would take it out
  -- of service, and the old name's next publish would remove it from under this one.
  local before = not had[s.id] and redis.call('HGET', K.slices, s.id)
  if before then
    local was = cjson.decode(before).node
    if was and was ~= node then redis.call('SREM', node_slices_key(was), s.id) end
  end
  s.ordinal = ordinal[s.gpu_uuid] or 0
  local raw = cjson.encode(s)
  redis.call('HSET', K.slices, s.id, raw)
  s._raw = raw  -- a hand-over pushes the slice's JSON to the waiter
  redis.call('SADD', node_slices_key(node), s.id)
  redis.call('HSET', gpu_slices_key(s.gpu_uuid), s.id, s.start .. '|' .. s.pkey)
  redis.call('SADD', K.pkeys, s.pkey)
  if settle_until and not leased_by(state) then
    redis.call('ZADD', K.quarantine, 'GT', settle_until, s.id)
    redis.call('ZADD', K.quarantine, 'NX', settle_until, s.id)
    if state == 'free' then state = 'quarantined' end
  end
  if fence_hold and not leased_by(state) then
    local lease = fence_hold.leases[s.id] or fence_hold.marker
    redis.call('ZADD', K.quarantine, 'GT', fence_hold.settles, s.id)
    redis.call('HSETNX', K.awaiting_fence, s.id, lease)
    if state == 'free' then state = 'quarantined' end
    event('slice.quarantined', {'slice', s.id, 'lease', lease, 'node', node, 'until', fence_hold.settles})
  end
  if state == 'free' and s.busy then
    redis.call('ZREM', free_key(s.pkey), s.id)
    redis.call('HSET', K.slice_state, s.id, 'unavailable')
  elseif state == 'free' then
    redis.call('ZADD', free_key(s.pkey), free_score(s), s.id)
  elseif not leased_by(state) then
    if offer(s.id, s) then handed = handed + 1 end
  end
end
-- A GPU of this node it no longer lists (replaced, or another fleet) goes with its desired layout
-- and drain mark once none of its slices is left (a leased one stays until its lease ends and the
-- next publish), so `gpus()`, `up` and `layout apply` do not show it beside the new one.
-- (every record here was written by cjson.encode above, so a plain find skips other nodes' GPUs
-- without decoding them: a publish in a 1,000-GPU cluster decodes only its own)
local flat, mine = redis.call('HGETALL', K.gpus), '"node":' .. cjson.encode(node)
for i = 1, #flat, 2 do
  local uuid = flat[i]
  if not ordinal[uuid] and string.find(flat[i + 1], mine, 1, true) and cjson.decode(flat[i + 1]).node == node
      and redis.call('HLEN', gpu_slices_key(uuid)) == 0 then
    redis.call('HDEL', K.gpus, uuid)
    redis.call('SREM', K.draining, uuid)
    redis.call('HDEL', K.desired, uuid)
  end
end
-- every kind, not only those this publish removed: a kind an older version left in K.pkeys goes too
prune_kinds(redis.call('SMEMBERS', K.pkeys))
if settle_until then event('slices.quarantined', {'node', node, 'until', settle_until}) end
-- added/gone: the slices carved or gone since the node's last publish (usage's idle slice-hours);
-- a JSON list of [id, "node/gpu index", profile], and of ids ('[]' when none)
event('inventory.published', {'node', node, 'slices', #listed, 'removed', removed,
  'added', #added > 0 and cjson.encode(added) or '[]', 'gone', #gone > 0 and cjson.encode(gone) or '[]'})
return {#listed, removed, handed, EPOCH}
