-- One tracked event: check the assignment, dedupe, bump counters, append the
-- write-behind record, all in one atomic step.
--
-- KEYS: 1 meta, 2 asg, 3 succ, 4 conv, 5 refunded, 6 churned, 7 events, 8 cnt, 9 wb,
--       10 cap (this subject's events of this type this hour)
-- ARGV: 1 subject, 2 variant, 3 event_type, 4 value, 5 currency ('' = none),
--       6 event_id, 7 occurred_ms, 8 received_ms, 9 cap (0 = none), 10 cap ttl ms
-- Returns {'A', first_conversion 0|1} accepted, {'D'} duplicate event id,
--         {'N'} subject not assigned, {'M', assigned_variant} variant mismatch,
--         {'R'} hot state missing (rebuild first), {'L'} over the subject's cap.
--
-- Successes per variant: subjects with a conversion; with reward
-- 'conversion_not_refunded', minus those with a refund. Both sides are
-- checked, so the result does not depend on the order events arrive in.
local meta = redis.call('HMGET', KEYS[1], 'ready', 'reward')
if not meta[1] then
  return {'R'}
end
local subject, variant, event_type = ARGV[1], ARGV[2], ARGV[3]
local current = redis.call('HGET', KEYS[2], subject)
if not current then
  return {'N'}
end
local assigned = string.sub(current, 1, string.find(current, '|', 1, true) - 1)
if assigned ~= variant then
  return {'M', assigned}
end
if redis.call('SADD', KEYS[7], ARGV[6]) == 0 then
  return {'D'}
end
-- Per-subject cap (tracking without a service token): refused events leave no trace
-- but the count, and their id stays free for a later retry.
if ARGV[9] and ARGV[9] ~= '0' then
  local seen = redis.call('INCR', KEYS[10])
  if seen == 1 then
    redis.call('PEXPIRE', KEYS[10], ARGV[10])
  end
  if seen > tonumber(ARGV[9]) then
    redis.call('SREM', KEYS[7], ARGV[6])
    return {'L'}
  end
end

local not_refunded = meta[2] == 'conversion_not_refunded'
local has_amount = ARGV[5] ~= '' and tonumber(ARGV[4]) > 0
local first_conversion = 0
local prefix = variant .. '|'

if event_type == 'conversion' then
  redis.call('HINCRBY', KEYS[8], prefix .. 'conversions', 1)
  if has_amount then
    redis.call('HINCRBYFLOAT', KEYS[8], prefix .. 'revenue|' .. ARGV[5], ARGV[4])
  end
  if redis.call('SADD', KEYS[4], subject) == 1 then
    first_conversion = 1
    redis.call('HINCRBY', KEYS[8], prefix .. 'converted_subjects', 1)
    if not (not_refunded and redis.call('SISMEMBER', KEYS[5], subject) == 1) then
      redis.call('HINCRBY', KEYS[3], variant, 1)
    end
  end
elseif event_type == 'refund' then
  redis.call('HINCRBY', KEYS[8], prefix .. 'refunds', 1)
  if has_amount then
    redis.call('HINCRBYFLOAT', KEYS[8], prefix .. 'refund_amount|' .. ARGV[5], ARGV[4])
  end
  if redis.call('SADD', KEYS[5], subject) == 1 then
    redis.call('HINCRBY', KEYS[8], prefix .. 'refunded_subjects', 1)
    -- Reward integrity: a refunded conversion is no longer a success.
    if not_refunded and redis.call('SISMEMBER', KEYS[4], subject) == 1 then
      redis.call('HINCRBY', KEYS[3], variant, -1)
    end
  end
elseif event_type == 'churn' then
  redis.call('HINCRBY', KEYS[8], prefix .. 'churns', 1)
  if redis.call('SADD', KEYS[6], subject) == 1 then
    redis.call('HINCRBY', KEYS[8], prefix .. 'churned_subjects', 1)
  end
else
  redis.call('HINCRBY', KEYS[8], prefix .. 'custom|' .. event_type, 1)
end

redis.call('XADD', KEYS[9], '*',
  't', 'm', 's', subject, 'v', variant, 'e', event_type, 'x', ARGV[4], 'cur', ARGV[5],
  'id', ARGV[6], 'ts', ARGV[7], 'rts', ARGV[8])
return {'A', first_conversion}
