"""The shared send rate limit: one token bucket per ESP account (requests/s), optional
per-mailbox-provider buckets (messages/s), and adaptive throttling (AIMD) on 429s.

All state lives in one store that every worker on every machine shares: Redis when
REDIS_URL is set (one Lua script, atomic, timed by the Redis server's clock), otherwise a
JSON file under VAR_DIR guarded by flock (same algorithm, same semantics, one machine).

How the delivery loop uses it, per ESP request (a single send or one /email/batch call):

    acquire_for_batch(recipients=[...], timeout=...)   # outside any DB transaction
    send
    report_success() | report_rate_limited(retry_after=...)

A request costs one token of the "esp" bucket however many messages it carries; a
provider bucket (MAILAUTO["PROVIDER_RATE_LIMITS"]) costs one token per message to that
provider. A batch takes every token it needs at once or none (no partial holds).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import redis
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import connections

__all__ = [
    "PROVIDERS",
    "Decision",
    "FileBackend",
    "RateState",
    "RedisBackend",
    "Throttle",
    "ThrottleError",
    "ThrottleInTransaction",
    "ThrottleTimeout",
    "ThrottleUnavailable",
    "acquire",
    "acquire_for_batch",
    "configuration_errors",
    "default_throttle",
    "effective_rate",
    "esp_account",
    "group_by_provider",
    "provider_for",
    "rate_states",
    "report_rate_limited",
    "report_success",
]

ESP_BUCKET = "esp"
# Buckets idle this long are forgotten (a new provider list, a rotated API key).
STATE_TTL_SECONDS = 7 * 24 * 3600
# A worker about to sleep longer than this first closes its idle DB connections, so that
# a fleet of throttled workers does not pin Postgres connections while it waits.
RELEASE_DB_CONNECTIONS_AFTER_SECONDS = 1.0


# --- errors ---------------------------------------------------------------------------


class ThrottleError(Exception):
    """Base class: no token was taken."""


class ThrottleTimeout(ThrottleError):
    """No token within `timeout`. `wait` is how long the bucket said the next try would
    need: requeue the messages with send_after = now + wait rather than spinning."""

    def __init__(self, *, bucket: str, wait: float, waited: float) -> None:
        super().__init__(f"rate limit {bucket!r}: no token within the timeout (next in {wait:.3f}s)")
        self.bucket = bucket
        self.wait = wait
        self.waited = waited


class ThrottleInTransaction(ThrottleError, RuntimeError):
    """acquire() was called inside a DB transaction: waiting there would hold row locks
    and a connection for as long as the rate limit says. Claim and commit first."""


class ThrottleUnavailable(ThrottleError):
    """The shared store (Redis, or the state file) could not be reached. Treat like a
    retryable send error: nothing left the building."""


# --- mailbox providers ----------------------------------------------------------------

PROVIDERS = ("gmail", "outlook", "yahoo", "icloud", "other")

# Recipient domain → provider, in one place. A "*" entry matches any public suffix
# after that first label (hotmail.co.uk, yahoo.co.jp).
_PROVIDER_DOMAINS: dict[str, str] = {
    "gmail.com": "gmail",
    "googlemail.com": "gmail",
    "outlook.com": "outlook",
    "hotmail.*": "outlook",
    "live.com": "outlook",
    "msn.com": "outlook",
    "yahoo.*": "yahoo",
    "ymail.com": "yahoo",
    "aol.com": "yahoo",
    "icloud.com": "icloud",
    "me.com": "icloud",
    "mac.com": "icloud",
}
_PROVIDER_EXACT = {d: p for d, p in _PROVIDER_DOMAINS.items() if not d.endswith(".*")}
_PROVIDER_FIRST_LABEL = {d.removesuffix(".*"): p for d, p in _PROVIDER_DOMAINS.items() if d.endswith(".*")}


def provider_for(email: str) -> str:
    """The mailbox provider of an address: gmail, outlook, yahoo, icloud or other."""
    domain = email.rpartition("@")[2].strip().rstrip(".").lower()
    provider = _PROVIDER_EXACT.get(domain)
    if provider is not None:
        return provider
    first, dot, rest = domain.partition(".")
    if dot and rest:
        return _PROVIDER_FIRST_LABEL.get(first, "other")
    return "other"


T = TypeVar("T")


def group_by_provider(items: Iterable[T], *, email: Callable[[T], str]) -> dict[str, list[T]]:
    """Split items (e.g. claimed messages) by provider, keeping their order, so that a
    caller can send provider-homogeneous batches: a batch for a slow provider then never
    holds back mail to the others. `email` maps an item to its recipient address."""
    groups: dict[str, list[T]] = {}
    for item in items:
        groups.setdefault(provider_for(email(item)), []).append(item)
    return groups


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

_LUA = """
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


def _run_script_in_python(
    store: dict[str, dict[str, Any]], keys: Sequence[str], argv: Sequence[str]
) -> tuple[list[Any], bool]:
    """The Lua script above, line for line, over a dict of hashes (the file backend).
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


# --- backends -------------------------------------------------------------------------


class Backend(Protocol):
    """Runs the bucket script atomically against the shared store."""

    def run(self, keys: Sequence[str], argv: Sequence[str]) -> list[Any]: ...


class RedisBackend:
    """Redis: EVALSHA of the script (redis-py's Script loads it again after a
    NOSCRIPT, e.g. a Redis restart), timed by the server's clock."""

    def __init__(self, *, url: str) -> None:
        self.url = url
        self.client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=5)
        self._script = self.client.register_script(_LUA)

    def run(self, keys: Sequence[str], argv: Sequence[str]) -> list[Any]:
        try:
            result = self._script(keys=list(keys), args=list(argv))
        except redis.RedisError as err:
            raise ThrottleUnavailable(f"rate-limit store unavailable: {err}") from err
        return [item.decode() if isinstance(item, bytes) else item for item in result]

    def describe(self) -> str:
        return "Redis (shared by every machine)"


class FileBackend:
    """One JSON state file under VAR_DIR for the embedded mode (no Redis): every process
    on this machine takes an exclusive flock on a lock file, runs the same algorithm as
    the Lua script, and replaces the state file atomically (a crash mid-write loses at
    most one refill, never corrupts the file). Timed by the machine's wall clock, which
    all its processes share."""

    def __init__(self, *, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_path = self.path.with_suffix(".lock")
        self._fd: int | None = None
        self._pid = 0
        self._thread_lock = threading.Lock()

    def _lock_fd(self) -> int:
        # flock belongs to the open file description, which a fork shares: a child must
        # open its own, or parent and child would never exclude each other.
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            self._pid = os.getpid()
        return self._fd

    def run(self, keys: Sequence[str], argv: Sequence[str]) -> list[Any]:
        try:
            with self._thread_lock:
                fd = self._lock_fd()
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    return self._run_locked(keys, argv)
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError as err:
            raise ThrottleUnavailable(f"rate-limit state file unavailable: {err}") from err

    def _run_locked(self, keys: Sequence[str], argv: Sequence[str]) -> list[Any]:
        try:
            store = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            store = {}
        except ValueError:
            store = {}  # unreadable: start from full buckets rather than stop sending
        result, changed = _run_script_in_python(store, keys, argv)
        if changed:
            now = time.time_ns() // 1000 if argv[1] == "" else int(argv[1])
            live = {k: v for k, v in store.items() if v.get("expires_at", now + 1) > now}
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(live))
            os.replace(tmp, self.path)
        return result

    def describe(self) -> str:
        return f"state file {self.path} (this machine only)"


# --- the client -----------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """One answer of the bucket script. `now` is the store's clock at the decision."""

    granted: bool
    wait: float
    now: float


@dataclass(frozen=True)
class RateState:
    bucket: str
    rate: float  # effective rate now (requests/s for "esp", messages/s for providers)
    ceiling: float  # the configured rate
    reason: str  # why it last changed
    changed_at: datetime | None
    paused_until: datetime | None  # a Retry-After pause in force
    available: float  # tokens in the bucket now (negative: debt from a large batch)

    @property
    def throttled(self) -> bool:
        return self.rate < self.ceiling or self.paused_until is not None


@dataclass(frozen=True)
class _Bucket:
    name: str
    ceiling: float
    burst: float
    tokens: int
    adaptive: bool


def esp_account() -> str:
    """Which ESP account the limit belongs to: MAILAUTO["RATE_LIMIT_ACCOUNT"] if set,
    else a short SHA-256 of the ESP's credentials from ANYMAIL (never the key itself), so
    that every deployment sharing a key shares the limit and a new key starts fresh."""
    configured = settings.MAILAUTO.get("RATE_LIMIT_ACCOUNT") or ""
    if configured:
        return str(configured)
    prefix = f"{settings.ESP_NAME.upper()}_"
    secrets = sorted(
        str(value)
        for key, value in settings.ANYMAIL.items()
        if key.startswith(prefix) and ("KEY" in key or "TOKEN" in key) and "WEBHOOK" not in key
    )
    if not secrets:
        return "default"
    return hashlib.sha256("\n".join(secrets).encode()).hexdigest()[:12]


def configuration_errors(options: Mapping[str, Any] | None = None) -> list[str]:
    """What is wrong with the rate-limit options (for a system check); empty when fine."""
    o: Mapping[str, Any] = settings.MAILAUTO if options is None else options
    errors: list[str] = []
    positive = ["RATE_LIMIT_PER_SECOND", "THROTTLE_MIN_RATE", "THROTTLE_INCREASE_FRACTION"]
    errors += [
        f"MAILAUTO[{n!r}] must be positive, not {o.get(n)!r}." for n in positive if not _positive(o.get(n))
    ]
    if not _number(o.get("RATE_LIMIT_BURST")) or o["RATE_LIMIT_BURST"] < 1:
        errors.append(f"MAILAUTO['RATE_LIMIT_BURST'] must be at least 1, not {o.get('RATE_LIMIT_BURST')!r}.")
    factor: Any = o.get("THROTTLE_DECREASE_FACTOR")
    if not _number(factor) or not 0 < factor < 1:
        errors.append(f"MAILAUTO['THROTTLE_DECREASE_FACTOR'] must be between 0 and 1, not {factor!r}.")
    cooldown: Any = o.get("THROTTLE_DECREASE_COOLDOWN_SECONDS")
    if not _number(cooldown) or cooldown < 0:
        errors.append(f"MAILAUTO['THROTTLE_DECREASE_COOLDOWN_SECONDS'] must be >= 0, not {cooldown!r}.")
    limits = o.get("PROVIDER_RATE_LIMITS")
    if not isinstance(limits, dict):
        errors.append(f"MAILAUTO['PROVIDER_RATE_LIMITS'] must be a JSON object, not {limits!r}.")
    else:
        for provider, rate in limits.items():
            if provider not in PROVIDERS:
                errors.append(
                    f"MAILAUTO['PROVIDER_RATE_LIMITS'] names an unknown provider {provider!r} "
                    f"(known: {', '.join(PROVIDERS)})."
                )
            elif not _positive(rate):
                errors.append(
                    f"MAILAUTO['PROVIDER_RATE_LIMITS'][{provider!r}] must be positive, not {rate!r}."
                )
    return errors


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value: object) -> bool:
    return _number(value) and value > 0  # type: ignore[operator]


def _in_transaction() -> bool:
    """True inside a transaction the caller opened. Django TestCase's own wrapping
    atomics do not count (the same exemption Django makes for durable=True)."""
    for conn in connections.all(initialized_only=True):
        if conn.in_atomic_block:
            if any(not getattr(block, "_from_testcase", False) for block in conn.atomic_blocks):
                return True
        elif conn.connection is not None and not conn.autocommit:
            return True
    return False


def _release_idle_db_connections() -> None:
    for conn in connections.all(initialized_only=True):
        if not conn.in_atomic_block and conn.connection is not None and conn.autocommit:
            conn.close()


def _epoch(value: str) -> datetime | None:
    return datetime.fromtimestamp(float(value) / 1_000_000, tz=UTC) if value else None


class Throttle:
    """The rate limits of one ESP account. Module-level functions use the default one
    (default_throttle()); tests and benchmarks build their own.

    `options` defaults to settings.MAILAUTO, read at each call (override_settings
    works); `namespace` to "<ESP_NAME>:<esp_account()>". `clock` replaces the store's
    clock (tests only), `sleep`/`monotonic` the local ones; `on_decision` sees every
    answer of the store (tests and benchmarks count calls and grants with it).
    """

    def __init__(
        self,
        *,
        backend: Backend,
        options: Mapping[str, Any] | None = None,
        namespace: str | None = None,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        on_decision: Callable[[Decision, Mapping[str, int]], None] | None = None,
    ) -> None:
        self.backend = backend
        self._fixed_options = options
        self._fixed_namespace = namespace
        self._clock = clock
        self._sleep = sleep
        self._monotonic = monotonic
        self._on_decision = on_decision

    # -- configuration

    @property
    def options(self) -> Mapping[str, Any]:
        return settings.MAILAUTO if self._fixed_options is None else self._fixed_options

    @property
    def namespace(self) -> str:
        if self._fixed_namespace is not None:
            return self._fixed_namespace
        return f"{settings.ESP_NAME}:{esp_account()}"

    def _key(self, bucket: str) -> str:
        # The {…} hash tag keeps every bucket of one account in one Redis Cluster slot,
        # so that one script may touch several of them.
        return f"mailauto:throttle:{{{self.namespace}}}:{bucket}"

    def provider_limits(self) -> dict[str, float]:
        limits = self.options.get("PROVIDER_RATE_LIMITS") or {}
        unknown = sorted(set(limits) - set(PROVIDERS))
        if unknown:
            raise ImproperlyConfigured(
                f"MAILAUTO['PROVIDER_RATE_LIMITS'] names unknown providers {unknown}; known: {PROVIDERS}"
            )
        return {provider: float(rate) for provider, rate in limits.items()}

    def _bucket(self, name: str, tokens: int) -> _Bucket:
        o = self.options
        if name == ESP_BUCKET:
            ceiling = float(o["RATE_LIMIT_PER_SECOND"])
            burst = float(o.get("RATE_LIMIT_BURST") or ceiling)
            return _Bucket(name, ceiling, max(1.0, burst), tokens, adaptive=True)
        provider = name.removeprefix("provider:")
        limits = self.provider_limits()
        if name.startswith("provider:") and provider in limits:
            rate = limits[provider]
            # One second's worth of burst; a bigger batch waits for a full bucket and
            # then leaves it in debt (see the script).
            return _Bucket(name, rate, max(1.0, rate), tokens, adaptive=False)
        raise ValueError(
            f"unknown rate-limit bucket {name!r}: 'esp' or 'provider:<name>' with a limit "
            "in MAILAUTO['PROVIDER_RATE_LIMITS']"
        )

    def _argv(
        self,
        op: str,
        buckets: Sequence[_Bucket],
        *,
        arg: str = "",
        reason: str = "",
        max_wait: float = 0.0,
        returning: bool = False,
    ) -> list[str]:
        o = self.options
        ceiling = float(o["RATE_LIMIT_PER_SECOND"])
        argv = [
            op,
            str(round(self._clock() * 1_000_000)) if self._clock is not None else "",
            repr(float(o.get("THROTTLE_DECREASE_FACTOR", 0.5))),
            repr(float(o.get("THROTTLE_MIN_RATE", 1.0))),
            repr(float(o.get("THROTTLE_INCREASE_FRACTION", 0.02)) * ceiling),
            str(round(float(o.get("THROTTLE_DECREASE_COOLDOWN_SECONDS", 2.0)) * 1_000_000)),
            arg,
            reason,
            str(STATE_TTL_SECONDS),
            str(max(0, int(max_wait * 1_000_000))),
            "1" if returning else "0",
        ]
        for b in buckets:
            argv += [repr(b.ceiling), repr(b.burst), str(b.tokens), "1" if b.adaptive else "0"]
        return argv

    def _run(self, op: str, buckets: Sequence[_Bucket], **kw: Any) -> list[Any]:
        return self.backend.run([self._key(b.name) for b in buckets], self._argv(op, buckets, **kw))

    # -- taking tokens

    def try_acquire(self, *, tokens: int = 1, bucket: str = ESP_BUCKET) -> Decision:
        """One non-blocking attempt: take the tokens, or say how long to wait."""
        return self._try([self._bucket(bucket, tokens)], max_wait=0.0, returning=False)

    def _try(self, buckets: Sequence[_Bucket], *, max_wait: float, returning: bool) -> Decision:
        granted, wait, now = self._run("acquire", buckets, max_wait=max_wait, returning=returning)
        decision = Decision(granted=int(granted) == 1, wait=float(wait), now=float(now) / 1_000_000)
        if self._on_decision is not None:
            self._on_decision(decision, {b.name: b.tokens for b in buckets})
        return decision

    def acquire(self, *, tokens: int = 1, bucket: str = ESP_BUCKET, timeout: float) -> float:
        """Block until `tokens` are taken from `bucket`; return the seconds waited.

        Call it once per ESP request, outside any DB transaction (ThrottleInTransaction
        otherwise). It sleeps as long as the store says (waiters are lined up 1/rate
        apart, see the script), plus a little jitter, then tries again; it raises ThrottleTimeout
        as soon as the wait it is told exceeds what is left of `timeout` (timeout=0:
        one try).
        """
        if tokens < 1:
            return 0.0
        return self._acquire([self._bucket(bucket, tokens)], timeout)

    def acquire_for_batch(self, *, recipients: Sequence[str], timeout: float) -> float:
        """Take what one ESP request carrying these recipients costs: one "esp" token,
        plus one token per recipient from each provider bucket that has a limit, all at
        once or not at all. Returns the seconds waited (ThrottleTimeout otherwise)."""
        buckets = [self._bucket(ESP_BUCKET, 1)]
        limits = self.provider_limits()
        if limits:
            counts: dict[str, int] = {}
            for email in recipients:
                provider = provider_for(email)
                if provider in limits:
                    counts[provider] = counts.get(provider, 0) + 1
            buckets += [self._bucket(f"provider:{p}", n) for p, n in sorted(counts.items())]
        return self._acquire(buckets, timeout)

    def _acquire(self, buckets: Sequence[_Bucket], timeout: float) -> float:
        if _in_transaction():
            raise ThrottleInTransaction(
                "acquire() inside a database transaction: commit the claim first, then take a token"
            )
        started = self._monotonic()
        deadline = started + max(0.0, timeout)
        released = False
        returning = False
        while True:
            decision = self._try(buckets, max_wait=deadline - self._monotonic(), returning=returning)
            if decision.granted:
                return self._monotonic() - started
            left = deadline - self._monotonic()
            if decision.wait > left:
                raise ThrottleTimeout(
                    bucket="+".join(b.name for b in buckets),
                    wait=decision.wait,
                    waited=self._monotonic() - started,
                )
            if not released and decision.wait >= RELEASE_DB_CONNECTIONS_AFTER_SECONDS:
                _release_idle_db_connections()
                released = True
            jitter = random.uniform(0.0, min(0.005, 0.1 * decision.wait))
            self._sleep(min(left, max(0.0005, decision.wait + jitter)))
            returning = True

    # -- adaptive throttling

    def report_success(self, *, n: int = 1) -> None:
        """n ESP requests went through cleanly: after about a second's worth of them the
        shared rate creeps back toward the ceiling (no-op when already there)."""
        if n > 0:
            self._run("success", [self._bucket(ESP_BUCKET, 0)], arg=str(int(n)))

    def report_rate_limited(self, *, retry_after: float | None, reason: str = "") -> RateState:
        """The ESP answered 429 (or asked us to slow down): halve the shared rate at once
        (not again within the cooldown), empty the bucket, and with a Retry-After pause
        every worker until then. Returns the new state."""
        if not reason:
            reason = "rate limited by the ESP (429)"
            if retry_after is not None:
                reason += f", Retry-After {retry_after:g}s"
        arg = "" if retry_after is None else str(round(max(0.0, float(retry_after)) * 1_000_000))
        self._run("limited", [self._bucket(ESP_BUCKET, 0)], arg=arg, reason=reason[:200])
        return self.effective_rate()

    def effective_rate(self, bucket: str = ESP_BUCKET) -> RateState:
        """The bucket's effective rate now, and when and why it last changed."""
        rate, ceiling, reason, changed_at, paused, level, _now = self._run("state", [self._bucket(bucket, 0)])
        return RateState(
            bucket=bucket,
            rate=float(rate),
            ceiling=float(ceiling),
            reason=reason or "at the configured rate",
            changed_at=_epoch(changed_at),
            paused_until=_epoch(paused),
            available=float(level),
        )

    def rate_states(self) -> list[RateState]:
        """The "esp" bucket and every configured provider bucket (for the admin)."""
        return [self.effective_rate(ESP_BUCKET)] + [
            self.effective_rate(f"provider:{p}") for p in sorted(self.provider_limits())
        ]


# --- the default throttle, chosen from the settings -----------------------------------

_defaults: dict[tuple[str, str], Throttle] = {}
_defaults_lock = threading.Lock()


def default_throttle() -> Throttle:
    """Redis when REDIS_URL is set, else the state file under VAR_DIR."""
    key = (settings.REDIS_URL, str(settings.VAR_DIR))
    throttle = _defaults.get(key)
    if throttle is None:
        with _defaults_lock:
            throttle = _defaults.get(key)
            if throttle is None:
                backend: Backend
                if settings.REDIS_URL:
                    backend = RedisBackend(url=settings.REDIS_URL)
                else:
                    backend = FileBackend(path=Path(settings.VAR_DIR) / "throttle" / "buckets.json")
                throttle = _defaults[key] = Throttle(backend=backend)
    return throttle


def acquire(*, tokens: int = 1, bucket: str = ESP_BUCKET, timeout: float) -> float:
    return default_throttle().acquire(tokens=tokens, bucket=bucket, timeout=timeout)


def acquire_for_batch(*, recipients: Sequence[str], timeout: float) -> float:
    return default_throttle().acquire_for_batch(recipients=recipients, timeout=timeout)


def report_success(*, n: int = 1) -> None:
    default_throttle().report_success(n=n)


def report_rate_limited(*, retry_after: float | None, reason: str = "") -> RateState:
    return default_throttle().report_rate_limited(retry_after=retry_after, reason=reason)


def effective_rate(bucket: str = ESP_BUCKET) -> RateState:
    return default_throttle().effective_rate(bucket)


def rate_states() -> list[RateState]:
    return default_throttle().rate_states()
