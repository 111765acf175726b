-- A node agent is done with a GPU's desired layout (applied it, or skipped it): the layout goes, but
-- only if it is still the one the agent read (a repartitioner may have written a newer one while the
-- agent carved: that one stays, for the agent's next round), and only while the node's claim is still
-- the agent's (a stale agent's late clear must not delete the layout the agent serving the node now
-- is asked to apply). The outcome is recorded either way.
-- A[1] - GPU UUID
-- A[2] - outcome: applied | skipped
-- A[3] - why (detail)
-- A[4] - the desired layout record as the agent read it (JSON), or '' to clear whatever is desired
-- A[5] - the agent's claim on the node ('' = unfenced): refused unless the node's claim
--        (K.node_claim) is still that (claim_refusal)
-- returns {'cleared'} | {'kept'} (another desired layout, or none) | {'not_claimed', the node's claim now or ''}
local refused = claim_refusal(A[5])
if refused then return refused end

-- the same record: every field equal (a decoded compare: the JSON's key order or spacing may differ)
local function same_record(a, b)
  local x, y = cjson.decode(a), cjson.decode(b)
  for k, v in pairs(x) do if y[k] ~= v then return false end end
  for k, v in pairs(y) do if x[k] ~= v then return false end end
  return true
end

local gpu = A[1]
local current = redis.call('HGET', K.desired, gpu)
local same = current and (A[4] == '' or same_record(current, A[4]))
if same then redis.call('HDEL', K.desired, gpu) end
event('layout.' .. A[2], {'gpu', gpu, 'detail', A[3]})
return {same and 'cleared' or 'kept'}
