-- Forget a node that is gone for good (renamed, or taken out of the fleet): its record, heartbeat
-- deadline and drain mark, its slices, and the GPUs still published under its name (with their
-- desired layouts) go, all or
-- nothing, and only while nothing holds it: no agent claims it or one of its GPUs, no lease is
-- held on its slices, and no slice waits for an expired holder's task container to be fenced.
-- (A renamed node's GPUs and slices are its new name's already: see publish.lua.)
-- KEYS[29] (K.node_claim) - the node's claim (Keys.agent(node))
-- KEYS[30] - the node's slice set (Keys.node_slices(node))
-- KEYS[31..] - the claims of the GPUs the caller read as published under the node (Keys.gpu_agent),
--        in the order of A[2..]
-- A[1] - node name
-- A[2..] - the UUIDs of those GPUs
-- returns {'forgotten', slices removed, GPUs removed} | {'unknown'}
--       | {'changed'}: the GPUs published under the node are no longer A[2..] (read them again)
--       | {'claimed', 'node <name>' or 'GPU <uuid>', the claiming agent's identity}
--       | {'leased', lease ids...} | {'fencing', slice ids...}
local node = A[1]
local node_slices = KEYS[30]
local ids = redis.call('SMEMBERS', node_slices)
local gpus, given = {}, {}
for i = 2, #A do given[A[i]] = true end
local flat = redis.call('HGETALL', K.gpus)
for i = 1, #flat, 2 do
  if cjson.decode(flat[i + 1]).node == node then
    gpus[#gpus + 1] = flat[i]
    if not given[flat[i]] then return {'changed'} end
  end
end
if #gpus ~= #A - 1 then return {'changed'} end
if redis.call('HEXISTS', K.nodes, node) == 0 and #ids == 0 and #gpus == 0 then return {'unknown'} end

local claim = redis.call('GET', K.node_claim)
if claim then return {'claimed', 'node ' .. node, claim} end
for i = 2, #A do
  claim = redis.call('GET', KEYS[29 + i])
  if claim then return {'claimed', 'GPU ' .. A[i], claim} end
end
local leased, fencing = {'leased'}, {'fencing'}
for _, id in ipairs(ids) do
  local state = redis.call('HGET', K.slice_state, id)
  local holder = leased_by(state)
  if holder then leased[#leased + 1] = holder end
  if redis.call('HEXISTS', K.awaiting_fence, id) == 1 then fencing[#fencing + 1] = id end
end
if #leased > 1 then return leased end
if #fencing > 1 then return fencing end

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
-- gone: the slices removed (usage's idle slice-hours end there, as for a publish's 'gone')
event('node.forgotten', {'node', node, 'gpus', #gpus, 'gone', #ids > 0 and cjson.encode(ids) or '[]'})
return {'forgotten', #ids, #gpus}
