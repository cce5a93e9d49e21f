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

The package, by concept: errors.py (what it raises), providers.py (mailbox providers),
script.py (the bucket algorithm, in Lua for Redis and in Python for the file), backends.py
(Redis and the flock'd state file), limiter.py (Throttle: waiting, AIMD feedback, rate
state), config.py (account naming, option checks), default.py (the default throttle and
the module-level functions above).
"""

from campaigns.throttle.backends import FileBackend, RedisBackend
from campaigns.throttle.config import configuration_errors, esp_account
from campaigns.throttle.default import (
    acquire,
    acquire_for_batch,
    default_throttle,
    effective_rate,
    rate_states,
    report_rate_limited,
    report_success,
)
from campaigns.throttle.errors import (
    ThrottleError,
    ThrottleInTransaction,
    ThrottleTimeout,
    ThrottleUnavailable,
)

# ESP_BUCKET and STATE_TTL_SECONDS are read as module attributes (tests use the TTL);
# they were never in __all__.
from campaigns.throttle.limiter import ESP_BUCKET as ESP_BUCKET
from campaigns.throttle.limiter import STATE_TTL_SECONDS as STATE_TTL_SECONDS
from campaigns.throttle.limiter import Decision, RateState, Throttle
from campaigns.throttle.providers import PROVIDERS, group_by_provider, provider_for

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
