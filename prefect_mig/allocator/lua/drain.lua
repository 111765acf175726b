-- Stop (or resume) granting the slices of one GPU. Leases already held run on; warm (idle) leases
-- are asked to hand over at once.
-- A[1] - GPU UUID
-- A[2] - '1' drain, '0' resume
-- returns {'ok', slices still leased on the GPU} | {'unknown'}
local uuid = A[1]
local raw = redis.call('HGET', K.gpus, uuid)
if not raw then return {'unknown'} end
local g = {draining = A[2] == '1'}
if g.draining then redis.call('SADD', K.draining, uuid) else redis.call('SREM', K.draining, uuid) end
local leased = 0
for _, id in ipairs(redis.call('HKEYS', gpu_slices_key(uuid))) do
  local state = redis.call('HGET', K.slice_state, id)
  local holder = leased_by(state)
  if holder then
    leased = leased + 1
    -- a warm lease's process is idle: it hands the slice over for the drain at once
    if g.draining and redis.call('HEXISTS', lease_key(holder), 'warm_at') == 1 then ask_handover(holder) end
  elseif g.draining and state == 'free' then
    redis.call('ZREM', free_key(slice(id).pkey), id)
    redis.call('HSET', K.slice_state, id, 'draining')
  elseif not g.draining and state == 'draining' then
    offer(id, slice(id))
  end
end
event(g.draining and 'gpu.drained' or 'gpu.resumed', {'gpu', uuid, 'leased', leased})
return {'ok', leased}
