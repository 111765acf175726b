-- Take idle slices out of service before the agent destroys them (a re-carve), so no grant can race
-- the destroy. All or nothing.
-- A[1] - JSON list of slice ids
-- returns {'ok', n} | {'busy', slice id} (one is leased: nothing was withdrawn)
local ids = cjson.decode(A[1])
for _, id in ipairs(ids) do
  if leased_by(redis.call('HGET', K.slice_state, id)) then return {'busy', id} end
end
for _, id in ipairs(ids) do
  local s = slice(id)
  if s then
    redis.call('ZREM', free_key(s.pkey), id)
    redis.call('HSET', K.slice_state, id, 'withdrawn')
  end
end
event('layout.withdrawn', {'slices', table.concat(ids, ',')})
return {'ok', #ids}
