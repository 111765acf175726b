-- Drain a node for maintenance (or resume it): its slices get no new grants; leases already held
-- run on until they end, and their slices then stay out of service; warm (idle) leases are asked to
-- hand over at once, and a lease parked later is not kept warm (warm.lua). Kept apart from the GPU drain
-- (KEYS draining) that the repartitioner uses, so neither undoes the other.
-- A[1] - node name
-- A[2] - '1' drain, '0' resume
-- returns {'ok', lease ids still held on the node...} | {'unknown'} (the node never published)
local node = A[1]
if redis.call('HEXISTS', K.nodes, node) == 0 then return {'unknown'} end
local drain = A[2] == '1'
if drain then redis.call('SADD', K.drained_nodes, node) else redis.call('SREM', K.drained_nodes, node) end
local out = {'ok'}
for _, id in ipairs(redis.call('SMEMBERS', node_slices_key(node))) do
  local state = redis.call('HGET', K.slice_state, id)
  local holder = leased_by(state)
  if holder then
    out[#out + 1] = holder
    -- a warm lease's process is idle: it hands the slice over for the drain at once, as for a GPU
    if drain and redis.call('HEXISTS', lease_key(holder), 'warm_at') == 1 then ask_handover(holder) end
  elseif drain and state == 'free' then
    redis.call('ZREM', free_key(slice(id).pkey), id)
    redis.call('HSET', K.slice_state, id, 'draining')
  elseif not drain and state == 'draining' then
    offer(id, slice(id))  -- stays draining while its GPU is drained
  end
end
event(drain and 'node.drained' or 'node.resumed', {'node', node, 'leased', #out - 1})
return out
