-- A node agent is alive. A node that was lost gets its idle slices back into service.
-- A[1] - node name
-- A[2] - heartbeat TTL in ms
-- A[3] - optional: why the node is out of service now (its agent is alive but its Docker engine is
--        down): the node is taken out of service at once instead, as if its heartbeat had lapsed
-- A[4] - the agent's claim on the node ('' = unfenced): refused unless the node's claim
--        (K.node_claim) is still that (claim_refusal): a stale agent's late heartbeat must not put
--        back into service a node the agent that took it over took out
-- returns {'ok'} | {'back', slices offered} | {'down'} | {'unknown'} (never published: publish first)
--       | {'not_claimed', the node's claim now or ''}
local node = A[1]
local refused = claim_refusal(A[4])
if refused then return refused end
if redis.call('HEXISTS', K.nodes, node) == 0 then return {'unknown'} end
if (A[3] or '') ~= '' then
  if node_alive(node) then node_lost(node, A[3]) end
  return {'down'}
end
local was_alive = node_alive(node)
redis.call('ZADD', K.node_deadline, NOW + tonumber(A[2]), node)
if was_alive then return {'ok'} end
local n = 0
for _, id in ipairs(redis.call('SMEMBERS', node_slices_key(node))) do
  if redis.call('HGET', K.slice_state, id) == 'unavailable' then
    offer(id, slice(id))
    n = n + 1
  end
end
event('node.back', {'node', node})
local raw = redis.call('HGET', K.nodes, node)
local now_raw = node_back(node, raw)
if now_raw ~= raw then redis.call('HSET', K.nodes, node, now_raw) end
return {'back', n}
