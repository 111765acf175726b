-- Drain a node for maintenance (or resume it): its slices get no new grants; leases already held
-- run on until they end, and their slices then stay out of service. Kept apart from the GPU drain
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
  elseif drain and state == 'free' then
    redis.call('ZREM', free_key(slice(id).pkey), id)
    redis.call('HSET', K.slice_state, id, 'draining')
  elseif not drain and state == 'draining' then
    offer(id, slice(id))  -- stays draining while its GPU is drained
  end
end
event(drain and 'node.drained' or 'node.resumed', {'node', node, 'leased', #out - 1})
return out
