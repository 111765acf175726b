-- Forget a node that is gone for good (renamed, or taken out of the fleet): its record, heartbeat
-- deadline and drain mark, its slices, and the GPUs still published under its name (with their
-- desired layouts) go, all or
-- nothing, and only while nothing holds it: no agent claims it or one of its GPUs, no lease is
-- held on its slices, and (unless A[2]: its host is gone) no slice waits for an expired holder's
-- task container to be fenced. A lease there past its expiry is reaped first: no agent runs there
-- to reap it, and its slice then waits for the fencing of its holder's container like any other.
-- (A renamed node's GPUs and slices are its new name's already: see publish.lua.)
-- With A[2] the slices awaiting a fence go too (nobody is left to fence them), and the node's
-- tombstone (KEYS[31]) is written: if the host was not gone after all and its agent publishes the
-- node again, every slice starts quarantined awaiting that agent's fencing pass (see publish.lua).
-- KEYS[29] (K.node_claim) - the node's claim (Keys.agent(node))
-- KEYS[30] - the node's slice set (Keys.node_slices(node))
-- KEYS[31] - the node's tombstone (Keys.forgotten(node))
-- KEYS[32..] - the claims of the GPUs the caller read as published under the node (Keys.gpu_agent),
--        in the order of A[3..]
-- A[1] - node name
-- A[2] - '1': its host is gone for good (`node forget --host-is-gone`), '' otherwise
-- A[3..] - the UUIDs of those GPUs
-- returns {'forgotten', slices removed, GPUs removed, slices removed that awaited a fence} | {'unknown'}
--       | {'changed'}: the GPUs published under the node are no longer A[3..] (read them again)
--       | {'claimed', 'node <name>' or 'GPU <uuid>', the claiming agent's identity}
--       | {'leased', lease ids...} | {'fencing', slice ids...}
local node, host_gone = A[1], A[2] == '1'
local node_slices = KEYS[30]
local ids = redis.call('SMEMBERS', node_slices)
local gpus, given = {}, {}
for i = 3, #A do given[A[i]] = true end
local flat = redis.call('HGETALL', K.gpus)
for i = 1, #flat, 2 do
  if cjson.decode(flat[i + 1]).node == node then
    gpus[#gpus + 1] = flat[i]
    if not given[flat[i]] then return {'changed'} end
  end
end
if #gpus ~= #A - 2 then return {'changed'} end
if redis.call('HEXISTS', K.nodes, node) == 0 and #ids == 0 and #gpus == 0 then return {'unknown'} end

local claim = redis.call('GET', K.node_claim)
if claim then return {'claimed', 'node ' .. node, claim} end
for i = 3, #A do
  claim = redis.call('GET', KEYS[29 + i])
  if claim then return {'claimed', 'GPU ' .. A[i], claim} end
end
for _, id in ipairs(ids) do
  local holder = leased_by(redis.call('HGET', K.slice_state, id))
  local expires = holder and redis.call('ZSCORE', K.leases, holder)
  if expires and tonumber(expires) < NOW then end_lease(holder, 'expired') end
end
ids = redis.call('SMEMBERS', node_slices)  -- an expired lease's slice already gone from the GPU goes with it
local leased, fencing, awaited = {'leased'}, {'fencing'}, {}
for _, id in ipairs(ids) do
  local state = redis.call('HGET', K.slice_state, id)
  local holder = leased_by(state)
  if holder then leased[#leased + 1] = holder end
  local lease = redis.call('HGET', K.awaiting_fence, id)
  if lease then
    fencing[#fencing + 1] = id
    awaited[id] = lease
  end
end
if #leased > 1 then return leased end
if #fencing > 1 and not host_gone then return fencing end

local kinds = {}
for _, id in ipairs(ids) do
  local s = slice(id)
  if s then
    redis.call('ZREM', free_key(s.pkey), id)
    redis.call('HDEL', gpu_slices_key(s.gpu_uuid), id)
    kinds[s.pkey] = true
  end
  redis.call('HDEL', K.slices, id)
  redis.call('HDEL', K.slice_state, id)
  redis.call('SREM', K.withholding, id)
  unquarantine(id, 'removed')
end
redis.call('DEL', node_slices)
for _, uuid in ipairs(gpus) do
  redis.call('HDEL', K.gpus, uuid)
  redis.call('SREM', K.draining, uuid)
  redis.call('HDEL', K.desired, uuid)  -- carved, unasked, if the GPU came back
end
local emptied = {}
for pkey in pairs(kinds) do emptied[#emptied + 1] = pkey end
prune_kinds(emptied)
redis.call('HDEL', K.nodes, node)
redis.call('ZREM', K.node_deadline, node)
redis.call('SREM', K.drained_nodes, node)
if host_gone then
  -- the expired leases whose containers were never confirmed gone, for the agent's check if it
  -- comes back (its MIG UUIDs may be the same, the lease ids are)
  redis.call('SET', KEYS[31], cjson.encode({at = NOW, awaiting_fence = next(awaited) and awaited or nil}))
end
-- gone: the slices removed (usage's idle slice-hours end there, as for a publish's 'gone')
event('node.forgotten', {'node', node, 'gpus', #gpus, 'gone', #ids > 0 and cjson.encode(ids) or '[]',
  'host_gone', host_gone and 1 or 0, 'unfenced', #fencing - 1})
return {'forgotten', #ids, #gpus, #fencing - 1}
