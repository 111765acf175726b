-- A node agent confirms, right after its fencing step, that no task container of this cluster
-- runs any more on slices whose holder's lease expired: they leave quarantine and go to waiters.
-- A[1] - node name
-- A[2] - JSON list of [slice id, expired lease id] pairs, as the agent read them from
--        K.awaiting_fence before it listed the node's containers; a pair no longer current (the
--        slice settled and was quarantined again meanwhile) is ignored
-- A[3] - the agent's claim on the node ('' = unfenced): refused unless the node's claim
--        (K.node_claim) is still that (claim_refusal): a stale agent looked at the containers of
--        another engine, or before the agent that took the node over started one
-- returns {slices settled, slices handed to waiters} | {'not_claimed', the node's claim now or ''}
local node = A[1]
local refused = claim_refusal(A[3])
if refused then return refused end
local settled, handed = 0, 0
for _, pair in ipairs(cjson.decode(A[2])) do
  local id, lease = pair[1], pair[2]
  local s = slice(id)
  if s and s.node == node and redis.call('HGET', K.awaiting_fence, id) == lease
      and redis.call('HGET', K.slice_state, id) == 'quarantined' then
    unquarantine(id, 'agent')
    settled = settled + 1
    if offer(id, s) then handed = handed + 1 end
  end
end
return {settled, handed}
