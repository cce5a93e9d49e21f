"""The token-bucket algorithm, twice: as one Lua script that Redis runs atomically
(LUA), and line for line in Python over a dict of hashes for the file backend
(run_script_in_python). Change both together: they run the same contract tests."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

# --- the algorithm --------------------------------------------------------------------
#
# One script, one round trip, atomic. KEYS are bucket hashes (all of one ESP account:
# they share a Redis Cluster hash tag). ARGV:
#   1 op: acquire | success | limited | state
#   2 now override in microseconds ("" = the Redis server's TIME; tests pass a fake clock)
#   3 decrease factor  4 min rate  5 increase step  6 decrease cooldown (µs)
#   7 op argument: success count (success), Retry-After in µs or "" (limited)
#   8 reason recorded by "limited"  9 TTL (s)
#   10 the longest wait (µs) the caller will sleep for (acquire; 0: it will not wait)
#   11 "1" when the caller comes back after being told to wait (acquire)
#   then for each key: ceiling, burst, tokens, adaptive ("1"/"0")
#
# A bucket holds `level` tokens as of time `ts`, refilling at `rate` up to a cap (the
# burst, scaled down while the adaptive rate is below its ceiling). `ts` in the future is
# a pause (Retry-After). A request for more tokens than the cap waits for a full bucket
# and leaves it in debt, so a 500-message batch against a 100 msg/s provider limit is
# still possible and the long-run rate still holds. Nothing is taken until every bucket
# of the request can pay (all or nothing).
#
# Waiters are told how long to sleep. So that N waiters do not all wake for the same
# token (N calls per grant) and a fresh caller does not take the token a waiter was
# told to come back for, the bucket keeps `line`: the time after the waiters it has
# already sent to sleep. A first attempt while the line is in the future queues behind
# it, even if tokens are there; if the caller will wait that long, the line moves on
# by its tokens/rate. A returning caller is not queued again: it gets its tokens if
# they exist, or the time until they will, unless that is more than one interval away
# (a pause or a rate cut came in while it slept: it lines up again). So waiters line
# up 1/rate apart and each grant costs about two calls. The line decides only *when to
# come back*; a grant is decided by the tokens alone, so the limit never depends on
# it. A waiter that never comes back (a killed worker) leaves a gap of tokens/rate.
#
# Times are integer microseconds since the epoch: exact in a double (< 2^53), so
# refills over short intervals do not lose precision to the size of the timestamp.
#
# AIMD: "limited" multiplies the rate by the factor (floor: min rate), drains the bucket
# and, with a Retry-After, pauses it; reports within the cooldown after a decrease do not
# decrease again (a burst of 429s for requests already in flight is one signal, not
# ten). "success" adds `step` req/s for every ceil(rate) clean requests, i.e. about one
# step per second of clean sending, counted in the store so that N workers reporting
# together raise it once, not N times.

LUA = """
local function num(v) if v then return tonumber(v) end return nil end
local function f(x) return string.format('%.17g', x) end
local op = ARGV[1]
local now
if ARGV[2] ~= '' then
  now = tonumber(ARGV[2])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local factor, min_rate, step, cooldown = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local arg, reason, ttl, max_wait = ARGV[7], ARGV[8], tonumber(ARGV[9]), tonumber(ARGV[10])
local returning = ARGV[11] == '1'
local EPS = 1e-9

local function load(i)
  local base = 12 + (i - 1) * 4
  local b = {key = KEYS[i], ceiling = tonumber(ARGV[base]), burst = tonumber(ARGV[base + 1]),
             tokens = tonumber(ARGV[base + 2]), adaptive = ARGV[base + 3] == '1'}
  local h = redis.call('HMGET', b.key, 'level', 'ts', 'rate', 'ceiling', 'successes',
                       'decreased_at', 'reason', 'changed_at', 'line')
  b.reason = h[7] or ''
  b.changed_at = h[8] or ''
  local rate, old_ceiling = num(h[3]), num(h[4])
  -- Only level and ts change on a plain grant; everything else is written when it may
  -- have changed (a new bucket, a new configured rate, the AIMD ops).
  b.full = old_ceiling ~= b.ceiling or rate == nil
  if (not b.adaptive) or rate == nil then
    rate = b.ceiling
  elseif old_ceiling ~= b.ceiling then
    if old_ceiling == nil or rate >= old_ceiling or rate > b.ceiling then
      rate = b.ceiling
      b.reason = 'configured ceiling changed'
      b.changed_at = f(now)
    end
  end
  b.rate = rate
  b.floor = math.min(min_rate, b.ceiling)
  if b.adaptive then b.cap = math.max(1, b.burst * rate / b.ceiling) else b.cap = b.burst end
  local level, ts = num(h[1]), num(h[2])
  if level == nil or ts == nil then level = b.cap; ts = now end
  if now > ts then level = level + (now - ts) * rate / 1000000; ts = now end
  if level > b.cap then level = b.cap end
  b.level, b.ts = level, ts
  b.successes = num(h[5]) or 0
  b.decreased_at = num(h[6])
  b.line = num(h[9])
  return b
end

local function save(b)
  if b.full then
    redis.call('HSET', b.key, 'level', f(b.level), 'ts', f(b.ts), 'rate', f(b.rate),
               'ceiling', f(b.ceiling), 'successes', f(b.successes), 'reason', b.reason,
               'changed_at', b.changed_at)
    if b.decreased_at then redis.call('HSET', b.key, 'decreased_at', f(b.decreased_at)) end
  else
    redis.call('HSET', b.key, 'level', f(b.level), 'ts', f(b.ts))
  end
  redis.call('EXPIRE', b.key, ttl)
end

if op == 'acquire' then
  local buckets, own, interval = {}, 0, 0
  for i = 1, #KEYS do
    local b = load(i)
    buckets[i] = b
    local need = math.min(b.tokens, b.cap)
    local w = 0
    if b.ts > now then w = (b.ts - now) / 1000000 end
    if b.level + EPS < need then w = w + (need - b.level) / b.rate end
    b.w = w
    if w > own then own = w end
    if w > 0 and b.tokens / b.rate > interval then interval = b.tokens / b.rate end
  end
  -- A returning caller further from its tokens than one interval (a pause or a rate
  -- cut came in while it slept) lines up again like a newcomer.
  local lined = (not returning) or own > interval + EPS
  local wait = own
  if lined then
    for i = 1, #KEYS do
      local b = buckets[i]
      if b.line and b.line > now + b.w * 1000000 then b.w = (b.line - now) / 1000000 end
      if b.w > wait then wait = b.w end
    end
  end
  if wait > 0 then
    if lined and wait * 1000000 <= max_wait then
      for i = 1, #KEYS do
        local b = buckets[i]
        if b.w > 0 then
          redis.call('HSET', b.key, 'line', f(now + wait * 1000000 + b.tokens / b.rate * 1000000))
          redis.call('EXPIRE', b.key, ttl)
        end
      end
    end
    return {0, f(wait), f(now)}
  end
  for i = 1, #KEYS do
    local b = buckets[i]
    b.level = b.level - b.tokens
    save(b)
  end
  return {1, '0', f(now)}
elseif op == 'success' then
  local b = load(1)
  b.full = true
  if b.adaptive and b.rate < b.ceiling then
    b.successes = b.successes + tonumber(arg)
    local raised = false
    while b.rate < b.ceiling do
      local need = math.ceil(b.rate)
      if b.successes < need then break end
      b.successes = b.successes - need
      b.rate = math.min(b.ceiling, b.rate + step)
      raised = true
    end
    if raised then
      b.changed_at = f(now)
      if b.rate >= b.ceiling then
        b.successes = 0
        b.reason = 'back at the configured ceiling after clean sends'
      else
        b.reason = 'raised after clean sends (additive increase)'
      end
    end
    save(b)
  end
  return {f(b.rate)}
elseif op == 'limited' then
  local b = load(1)
  b.full = true
  if b.adaptive and (b.decreased_at == nil or now - b.decreased_at >= cooldown) then
    b.rate = math.max(b.floor, b.rate * factor)
    b.decreased_at = now
    b.reason = reason
    b.changed_at = f(now)
  end
  b.successes = 0
  if b.level > 0 then b.level = 0 end
  if arg ~= '' and now + tonumber(arg) > b.ts then b.ts = now + tonumber(arg) end
  save(b)
  return {f(b.rate), f(b.ts)}
elseif op == 'state' then
  local b = load(1)
  local paused = ''
  if b.ts > now then paused = f(b.ts) end
  return {f(b.rate), f(b.ceiling), b.reason, b.changed_at, paused, f(b.level), f(now)}
end
return redis.error_reply('unknown throttle op ' .. tostring(op))
"""


def run_script_in_python(
    store: dict[str, dict[str, Any]], keys: Sequence[str], argv: Sequence[str]
) -> tuple[list[Any], bool]:
    """The Lua script (LUA above), line for line, over a dict of hashes (the file backend).
    Returns the script's answer and whether the store changed. Both implementations run
    the same contract tests (tests/campaigns/test_throttle.py)."""
    op = argv[0]
    now = int(argv[1]) if argv[1] != "" else time.time_ns() // 1000
    factor, min_rate, step, cooldown = (float(argv[i]) for i in (2, 3, 4, 5))
    arg, reason, ttl, max_wait = argv[6], argv[7], float(argv[8]), int(argv[9])
    returning = argv[10] == "1"
    eps = 1e-9
    saved: list[str] = []

    def load(i: int) -> dict[str, Any]:
        base = 11 + i * 4
        b: dict[str, Any] = {
            "key": keys[i],
            "ceiling": float(argv[base]),
            "burst": float(argv[base + 1]),
            "tokens": float(argv[base + 2]),
            "adaptive": argv[base + 3] == "1",
        }
        h = store.get(keys[i], {})
        b["reason"] = h.get("reason", "")
        b["changed_at"] = h.get("changed_at", "")
        rate, old_ceiling = h.get("rate"), h.get("ceiling")
        if not b["adaptive"] or rate is None:
            rate = b["ceiling"]
        elif old_ceiling != b["ceiling"] and (
            old_ceiling is None or rate >= old_ceiling or rate > b["ceiling"]
        ):
            rate = b["ceiling"]
            b["reason"] = "configured ceiling changed"
            b["changed_at"] = repr(now)
        b["rate"] = rate
        b["floor"] = min(min_rate, b["ceiling"])
        b["cap"] = max(1.0, b["burst"] * rate / b["ceiling"]) if b["adaptive"] else b["burst"]
        level, ts = h.get("level"), h.get("ts")
        if level is None or ts is None:
            level, ts = b["cap"], now
        if now > ts:
            level, ts = level + (now - ts) * rate / 1_000_000, now
        b["level"], b["ts"] = min(level, b["cap"]), ts
        b["successes"] = h.get("successes", 0.0)
        b["decreased_at"] = h.get("decreased_at")
        b["line"] = h.get("line")
        return b

    def save(b: dict[str, Any]) -> None:
        fields = (
            "level",
            "ts",
            "rate",
            "ceiling",
            "successes",
            "reason",
            "changed_at",
            "decreased_at",
            "line",
        )
        store[b["key"]] = {name: b[name] for name in fields if b[name] is not None}
        store[b["key"]]["expires_at"] = now + ttl * 1_000_000
        saved.append(b["key"])

    if op == "acquire":
        buckets, own, interval = [], 0.0, 0.0
        for i in range(len(keys)):
            b = load(i)
            buckets.append(b)
            need = min(b["tokens"], b["cap"])
            w = (b["ts"] - now) / 1_000_000 if b["ts"] > now else 0.0
            if b["level"] + eps < need:
                w += (need - b["level"]) / b["rate"]
            b["w"] = w
            own = max(own, w)
            if w > 0:
                interval = max(interval, b["tokens"] / b["rate"])
        lined = not returning or own > interval + eps
        wait = own
        if lined:
            for b in buckets:
                if b["line"] is not None and b["line"] > now + b["w"] * 1_000_000:
                    b["w"] = (b["line"] - now) / 1_000_000
                wait = max(wait, b["w"])
        if wait > 0:
            queued = lined and wait * 1_000_000 <= max_wait
            if queued:
                for b in buckets:
                    if b["w"] > 0:
                        h = store.setdefault(b["key"], {})
                        h["line"] = now + wait * 1_000_000 + b["tokens"] / b["rate"] * 1_000_000
                        h["expires_at"] = now + ttl * 1_000_000
            return [0, repr(wait), repr(now)], queued
        for b in buckets:
            b["level"] -= b["tokens"]
            save(b)
        return [1, "0", repr(now)], True
    if op == "success":
        b = load(0)
        if b["adaptive"] and b["rate"] < b["ceiling"]:
            b["successes"] += float(arg)
            raised = False
            while b["rate"] < b["ceiling"]:
                need = math.ceil(b["rate"])
                if b["successes"] < need:
                    break
                b["successes"] -= need
                b["rate"] = min(b["ceiling"], b["rate"] + step)
                raised = True
            if raised:
                b["changed_at"] = repr(now)
                if b["rate"] >= b["ceiling"]:
                    b["successes"] = 0.0
                    b["reason"] = "back at the configured ceiling after clean sends"
                else:
                    b["reason"] = "raised after clean sends (additive increase)"
            save(b)
        return [repr(b["rate"])], bool(saved)
    if op == "limited":
        b = load(0)
        if b["adaptive"] and (b["decreased_at"] is None or now - b["decreased_at"] >= cooldown):
            b["rate"] = max(b["floor"], b["rate"] * factor)
            b["decreased_at"] = now
            b["reason"] = reason
            b["changed_at"] = repr(now)
        b["successes"] = 0.0
        b["level"] = min(b["level"], 0.0)
        if arg != "" and now + int(arg) > b["ts"]:
            b["ts"] = now + int(arg)
        save(b)
        return [repr(b["rate"]), repr(b["ts"])], True
    if op == "state":
        b = load(0)
        paused = repr(b["ts"]) if b["ts"] > now else ""
        return [
            repr(b["rate"]),
            repr(b["ceiling"]),
            b["reason"],
            b["changed_at"],
            paused,
            repr(b["level"]),
            repr(now),
        ], False
    raise ValueError(f"unknown throttle op {op!r}")
