-- One tracked event: check the assignment, dedupe, bump counters, append the
-- write-behind record, all in one atomic step.
--
-- KEYS: 1 meta, 2 asg, 3 succ, 4 conv, 5 refunded, 6 churned, 7 events, 8 cnt, 9 wb,
--       10 outcome, 11 cap (this subject's events of this type this hour)
-- ARGV: 1 subject, 2 variant, 3 event_type, 4 value, 5 currency ('' = none),
--       6 event_id, 7 occurred_ms, 8 received_ms, 9 cap (0 = none), 10 cap ttl ms
-- Returns {'A', first_conversion 0|1} accepted, {'D'} duplicate event id,
--         {'N'} subject not assigned, {'M', assigned_variant} variant mismatch,
--         {'R'} hot state missing (rebuild first), {'L'} over the subject's cap.
--
-- Successes per variant: subjects with a conversion. With reward
-- 'conversion_not_refunded', a subject counts while no refund occurred at or
-- after its latest conversion: a refund before any conversion blocks nothing,
-- conversion -> refund -> conversion is a success again, repeated refunds
-- change nothing more. "After" is by occurrence time (ARGV 7), so the result
-- does not depend on the order events arrive in (store/rebuild.py agrees):
-- outcome[subject] = "latest conversion ms|latest refund ms" (0 = none).
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
-- Event ids are idempotency keys per subject (store/hot_keys.py, `event_member`): a
-- subject's events live in its shard, so that is all one script can check atomically.
local member = ARGV[6] .. '\0' .. subject
if redis.call('SADD', KEYS[7], member) == 0 then
  return {'D'}
end
-- Per-subject cap (tracking without a service token): refused events leave no trace
-- but the count, and their id stays free for a later retry.
if ARGV[9] and ARGV[9] ~= '0' then
  local seen = redis.call('INCR', KEYS[11])
  if seen == 1 then
    redis.call('PEXPIRE', KEYS[11], ARGV[10])
  end
  if seen > tonumber(ARGV[9]) then
    redis.call('SREM', KEYS[7], member)
    return {'L'}
  end
end

local not_refunded = meta[2] == 'conversion_not_refunded'
local has_amount = ARGV[5] ~= '' and tonumber(ARGV[4]) > 0
local first_conversion = 0
local prefix = variant .. '|'

-- Reward integrity: moves the subject's latest conversion or refund time and
-- adjusts the variant's successes by the change in "converted, not refunded".
local function settle(is_conversion)
  local at = tonumber(ARGV[7])
  local held = redis.call('HGET', KEYS[10], subject)
  local conv_ms, refund_ms = 0, 0
  if held then
    local bar = string.find(held, '|', 1, true)
    conv_ms = tonumber(string.sub(held, 1, bar - 1))
    refund_ms = tonumber(string.sub(held, bar + 1))
  end
  local before = conv_ms > 0 and refund_ms < conv_ms
  if is_conversion then
    conv_ms = math.max(conv_ms, at)
  else
    refund_ms = math.max(refund_ms, at)
  end
  redis.call('HSET', KEYS[10], subject, string.format('%d|%d', conv_ms, refund_ms))
  local after = conv_ms > 0 and refund_ms < conv_ms
  if after and not before then
    redis.call('HINCRBY', KEYS[3], variant, 1)
  elseif before and not after then
    redis.call('HINCRBY', KEYS[3], variant, -1)
  end
end

if event_type == 'conversion' then
  redis.call('HINCRBY', KEYS[8], prefix .. 'conversions', 1)
  if has_amount then
    redis.call('HINCRBYFLOAT', KEYS[8], prefix .. 'revenue|' .. ARGV[5], ARGV[4])
  end
  if redis.call('SADD', KEYS[4], subject) == 1 then
    first_conversion = 1
    redis.call('HINCRBY', KEYS[8], prefix .. 'converted_subjects', 1)
    if not not_refunded then
      redis.call('HINCRBY', KEYS[3], variant, 1)
    end
  end
  if not_refunded then
    settle(true)
  end
elseif event_type == 'refund' then
  redis.call('HINCRBY', KEYS[8], prefix .. 'refunds', 1)
  if has_amount then
    redis.call('HINCRBYFLOAT', KEYS[8], prefix .. 'refund_amount|' .. ARGV[5], ARGV[4])
  end
  if redis.call('SADD', KEYS[5], subject) == 1 then
    redis.call('HINCRBY', KEYS[8], prefix .. 'refunded_subjects', 1)
  end
  if not_refunded then
    settle(false)
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
