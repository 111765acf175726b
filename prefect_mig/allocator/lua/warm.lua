-- Keep a lease warm (its holder's task process idle on the slice for the next task of its runner),
-- or take a warm lease back into use. Warmth never blocks anyone (see ask_handover in _lib.lua).
-- A[1] - lease id
-- A[2] - fencing token the holder was granted
-- A[3] - 'park': the holder's process is idle now
--        'take': the holder wants to run its next task in it
-- A[4] - ('park') JSON list of the holder's own queued request ids that may run in the process
-- returns {'warm'}                  (park: marked warm; a request that could use it asks it back)
--       | {'pass', request id}      (park: the best waiter for this slice is one of the holder's own:
--                                    its request left the queue, it runs in the process)
--       | {'handover'}              (park: another request waits for it; take: it was asked back.
--                                    Stop the process and release the lease.)
--       | {'ok'}                    (take: no longer warm, the holder runs a task in it)
--       | {'gone'} | {'stale', current fence}
local id, fence, mode = A[1], A[2], A[3]
local f = redis.call('HMGET', lease_key(id), 'fence', 'expires_at', 'revoked_at', 'handover', 'slice', 'warm_pkey')
if not f[1] or tonumber(f[2]) < NOW then return {'gone'} end
if f[1] ~= fence then return {'stale', f[1]} end
if f[3] or f[4] then return {'handover'} end
if mode == 'take' then
  if f[6] then redis.call('ZREM', warm_key(f[6]), id) end
  redis.call('HDEL', lease_key(id), 'warm_at', 'warm_pkey')
  event('lease.reused', {'lease', id, 'slice', f[5]})
  return {'ok'}
end
local s = slice(f[5])
if not s or s.gone or gpu_draining(s.gpu_uuid) or node_drained(s.node)
    or redis.call('SISMEMBER', K.withholding, f[5]) == 1 then
  redis.call('HSET', lease_key(id), 'handover', NOW)
  return {'handover'}
end
local own = {}
for _, rid in ipairs(cjson.decode(A[4] or '[]')) do own[rid] = true end
-- the waiter this slice would go to on release (as offer() picks it), without granting
for _, rid in ipairs(redis.call('ZRANGE', waitq_key(s.pkey), 0, -1)) do
  local raw = redis.call('HGET', K.requests, rid)
  if raw then
    local r = cjson.decode(raw)
    if own[rid] and (r.node == '' or r.node == s.node) then
      dequeue(r)
      event('lease.passed', {'lease', id, 'slice', f[5], 'request', rid})
      return {'pass', rid}
    end
    if eligible(r, s) ~= nil then
      redis.call('HSET', lease_key(id), 'handover', NOW)
      event('lease.handover', {'lease', id, 'for', rid})
      return {'handover'}
    end
  end
end
redis.call('HSET', lease_key(id), 'warm_at', NOW, 'warm_pkey', s.pkey)
redis.call('ZADD', warm_key(s.pkey), NOW, id)
event('lease.warm', {'lease', id, 'slice', f[5]})
return {'warm'}
