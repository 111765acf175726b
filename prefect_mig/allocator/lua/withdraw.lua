-- Take slices out of service before the agent destroys them (a re-carve), so no grant can race
-- the destroy. A withdrawn slice stays out of service (even across publishes) until the publish
-- that no longer lists it, or a restore.
-- A[1] - JSON list of slice ids
-- A[2] - mode: 'now'     all or nothing: refused if one is in use
--               'drain'   idle ones now, those in use as soon as they are not (the range drain;
--                         warm leases among them are asked to hand over at once)
--               'restore' back into service (the re-carve was given up)
-- In use: leased, busy (its agent saw processes or a task container on it: it is 'unavailable'),
-- or quarantined (its holder's lease expired and its container may still run): destroying one
-- would pull the device from under whatever runs there.
-- A[3] - the node agent's claim on the slices' node ('' = unfenced: the CLI, tests): refused unless
--        the node's claim (K.node_claim) is still that (claim_refusal): a stale agent's late
--        restore would put back into service slices the agent that took the node over withdrew
--        to destroy (a waiter granted one as it is destroyed)
-- returns {'ok', withdrawn, still in use} | {'busy', slice id} ('now' only: nothing was withdrawn)
--       | {'not_claimed', the node's claim now or ''}
local refused = claim_refusal(A[3])
if refused then return refused end
local ids = cjson.decode(A[1])
local mode = A[2] or 'now'
if mode == 'restore' then
  for _, id in ipairs(ids) do
    redis.call('SREM', K.withholding, id)
    local s = slice(id)
    if s and redis.call('HGET', K.slice_state, id) == 'withdrawn' then offer(id, s) end
  end
  event('layout.restored', {'slices', table.concat(ids, ',')})
  return {'ok', 0, 0}
end
local function in_use(id, s)
  if leased_by(redis.call('HGET', K.slice_state, id)) then return true end
  if s and s.busy then return true end
  local settles = redis.call('ZSCORE', K.quarantine, id)
  return settles and tonumber(settles) > NOW or false
end
if mode == 'now' then
  for _, id in ipairs(ids) do
    if in_use(id, slice(id)) then return {'busy', id} end
  end
end
local withdrawn, leased = 0, 0
for _, id in ipairs(ids) do
  local s = slice(id)
  if s then
    redis.call('SADD', K.withholding, id)
    local holder = leased_by(redis.call('HGET', K.slice_state, id))
    if holder then
      leased = leased + 1
      -- a warm lease's process is idle: it hands the slice over for the re-carve at once
      if redis.call('HEXISTS', lease_key(holder), 'warm_at') == 1 then ask_handover(holder) end
    elseif in_use(id, s) then
      leased = leased + 1  -- busy or quarantined: withdrawn once its agent reports it idle or settled
    else
      redis.call('ZREM', free_key(s.pkey), id)
      redis.call('HSET', K.slice_state, id, 'withdrawn')
      withdrawn = withdrawn + 1
    end
  end
end
event('layout.withdrawn', {'slices', table.concat(ids, ','), 'mode', mode, 'leased', leased})
return {'ok', withdrawn, leased}
