"""The Redis mirror of the suppression list (MAILAUTO["SUPPRESSION_STORAGE"] = "redis").

Postgres is the truth. The mirror only lets `send_decision` skip the Postgres query for
the common case, an address with no suppression; any hit, and any doubt, goes to
Postgres. It is built so that every way it can be wrong is a *false positive* (harmless:
the hit is confirmed in Postgres), except two that no cache can close: a Redis failover
or restore that loses acknowledged writes, and a writer that cannot reach Redis while
readers can. Both heal at the next rebuild, and neither can send mail, because
campaigns/delivery.py hands every message to the ESP with an UPDATE that re-checks the
suppression table in the same statement.

Layout: one Redis hash, MIRROR_KEY, field "<keyed hash of the email>:<topic>" for each
suppression, plus COMPLETE_FIELD, written only by a full rebuild. One key, so that an
eviction, a FLUSHDB or a fresh Redis removes the data and the marker together; the key
expires unless the beat task rebuilds it, so a mirror nobody maintains stops being
trusted. Addresses are stored as an HMAC keyed from SECRET_KEY, never in plain text (a
plain SHA-256 of an address is reversed by hashing a list of known addresses); the
marker names the key, so after a SECRET_KEY rotation the old mirror is not trusted.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Iterable
from typing import Any, cast

import redis
from django.conf import settings
from django.utils.crypto import salted_hmac
from redis.backoff import NoBackoff
from redis.retry import Retry

from suppression.models import HashedSuppression, Suppression

logger = logging.getLogger(__name__)

MIRROR_KEY = "mailauto:suppression:mirror:v1"
# Fields written by suppression_add since a moment (sorted by write time): a rebuild
# carries these over, so an add that commits while it reads Postgres is not lost.
RECENT_KEY = f"{MIRROR_KEY}:recent"
BUILD_KEY_PREFIX = f"{MIRROR_KEY}:build:"
COMPLETE_FIELD = "!complete"  # "!" never starts a hex digest, so no email field collides
HASH_SALT = "mailauto.suppression.mirror"
# Writers and the rebuild stamp times with their own clocks; entries written up to this
# long before a rebuild began are carried over too, to absorb clock skew between hosts.
SKEW_MARGIN_SECONDS = 60
BUILD_BATCH = 5000
# Short timeouts and no retries: the mirror is an optimisation, Postgres the fallback.
SOCKET_TIMEOUT_SECONDS = 0.5
# After a Redis error, skip the mirror for this long in this process (a local circuit
# breaker, not shared state: it only spares each send a connect timeout).
BREAKER_SECONDS = 5.0

_broken_until = 0.0

# Atomically: carry over the entries added since the rebuild's snapshot began (a removal
# takes its entry out of RECENT_KEY in the same MULTI as the HDEL), swap the new hash in,
# mark it complete and set its lifetime. KEYS: build, live, recent. ARGV: since, marker
# field, marker value, lifetime in seconds.
_SWAP_SCRIPT = """
local recent = redis.call('ZRANGEBYSCORE', KEYS[3], ARGV[1], '+inf')
for _, field in ipairs(recent) do
  redis.call('HSET', KEYS[1], field, '1')
end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('UNLINK', KEYS[2])  -- frees the old hash in the background, not inside RENAME
redis.call('RENAME', KEYS[1], KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[1])
redis.call('EXPIRE', KEYS[3], ARGV[4])
return #recent
"""


class MirrorUnavailable(Exception):
    """Redis could not be reached (or the mirror is switched off)."""


# --- configuration ------------------------------------------------------------------


def mirror_enabled() -> bool:
    """Is the Redis mirror in use? "redis" storage without REDIS_URL (the embedded
    mode) falls back to the database, with a warning once per process."""
    if settings.MAILAUTO["SUPPRESSION_STORAGE"] != "redis":
        return False
    if not settings.REDIS_URL:
        _warn_no_redis()
        return False
    if getattr(settings, "SECRET_KEY_FALLBACKS", None):
        # Erased addresses hashed under an old key cannot be mirrored under the new
        # one; until the fallbacks are retired, only Postgres can vouch for them.
        _warn_fallbacks()
        return False
    return True


@functools.cache
def _warn_fallbacks() -> None:
    logger.warning("SECRET_KEY_FALLBACKS is set: the suppression mirror is not used until it is empty")


@functools.cache
def _warn_no_redis() -> None:
    logger.warning(
        "MAILAUTO['SUPPRESSION_STORAGE'] is 'redis' but REDIS_URL is not set: "
        "suppression checks use the database"
    )


@functools.lru_cache(maxsize=4)
def _client_for(url: str) -> redis.Redis:
    # redis-py's pool notices a fork and reconnects, so one client per process is safe.
    return redis.Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT_SECONDS,
        socket_connect_timeout=SOCKET_TIMEOUT_SECONDS,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
    )


def _client() -> redis.Redis:
    if time.monotonic() < _broken_until:
        raise MirrorUnavailable("Redis failed recently; using the database")
    return _client_for(settings.REDIS_URL)


def _trip(err: Exception, doing: str) -> None:
    global _broken_until
    _broken_until = time.monotonic() + BREAKER_SECONDS
    logger.warning("suppression mirror: Redis error while %s (%s); using the database", doing, err)


def reset_breaker() -> None:
    """Forget a recent Redis failure (tests, and after an operator fixed Redis)."""
    global _broken_until
    _broken_until = 0.0


def email_digest(email: str) -> str:
    """Keyed hash of a normalised address: 128 bits are plenty, and a collision could
    only ever make the mirror report a suppression that Postgres then does not confirm.

    It is a prefix of the privacy module's keyed hash, so that erased addresses (kept
    only as that hash, in HashedSuppression) can be mirrored too: a mirror miss must
    also mean "not erased".
    """
    from suppression.privacy import email_hash

    return email_hash(email)[:32]


def _field(email: str, topic: str) -> str:
    # Normalised as suppression.services.normalize_email does (not imported: it imports us).
    return f"{email_digest(email.strip().lower())}:{topic}"


def _marker() -> str:
    """Names the key the fields were hashed with: a mirror hashed under another
    SECRET_KEY would miss every address, so it must not be trusted."""
    return "key:" + salted_hmac(HASH_SALT, "marker", algorithm="sha256").hexdigest()[:16]


def _lifetime() -> int:
    # Two missed rebuilds and the mirror is gone: a mirror nobody maintains (beat
    # stopped, storage switched to "database") must not be trusted for long.
    return 2 * int(settings.MAILAUTO["SUPPRESSION_SYNC_INTERVAL_SECONDS"]) + SKEW_MARGIN_SECONDS


# --- writes (after commit, from suppression_add / suppression_remove) ----------------


def mirror_record_added(*, email: str, topic: str) -> None:
    """Mirror one committed suppression. Best effort: a failure is logged, and the next
    rebuild (or Postgres, for a writer-side outage) covers it."""
    if not mirror_enabled():
        return
    field = _field(email, topic)
    try:
        # Not behind the circuit breaker: adds are rare, and each one that reaches
        # Redis closes a window in which other processes could miss it.
        pipe = _client_for(settings.REDIS_URL).pipeline(transaction=True)
        pipe.hset(MIRROR_KEY, field, "1")
        pipe.zadd(RECENT_KEY, {field: time.time()})
        pipe.execute()
    except redis.RedisError as err:
        _trip(err, "adding")


def mirror_record_removed(*, email: str, topic: str) -> None:
    """Forget one suppression that was lifted in Postgres. A failure leaves a false
    positive, which send_decision confirms in Postgres: harmless."""
    if not mirror_enabled():
        return
    field = _field(email, topic)
    try:
        pipe = _client_for(settings.REDIS_URL).pipeline(transaction=True)
        pipe.hdel(MIRROR_KEY, field)
        pipe.zrem(RECENT_KEY, field)
        pipe.execute()
    except redis.RedisError as err:
        _trip(err, "removing")
        return
    # After-commit callbacks of two transactions can run in either order: if the same
    # (email, topic) was suppressed again and committed after our removal, its HSET may
    # already have landed and our HDEL just erased it, a negative the mirror must never
    # give. Postgres, read after the HDEL, says whether to put it back.
    if Suppression.objects.filter(email=email, topic=topic).exists():
        mirror_record_added(email=email, topic=topic)


# --- reads ---------------------------------------------------------------------------


def mirror_lookup(*, email: str, topics: Iterable[str]) -> set[str]:
    """The topics among `topics` that the mirror holds for this (normalised) address.

    Raises MirrorUnavailable when the answer cannot be trusted: Redis unreachable, the
    mirror not (yet, or no longer) complete, or hashed under another key. Callers then
    ask Postgres. An empty set is the only answer that saves a query.
    """
    if not mirror_enabled():
        raise MirrorUnavailable("the mirror is not in use")
    wanted = list(dict.fromkeys(topics))
    try:
        values = cast(
            "list[str | None]",
            _client().hmget(MIRROR_KEY, [COMPLETE_FIELD, *(_field(email, t) for t in wanted)]),
        )
    except redis.RedisError as err:
        _trip(err, "reading")
        raise MirrorUnavailable(str(err)) from err
    marker, *present = values
    if marker != _marker():
        raise MirrorUnavailable("the mirror is not complete")
    return {topic for topic, value in zip(wanted, present, strict=True) if value is not None}


# --- rebuild (the beat task) -------------------------------------------------------------


def mirror_rebuild() -> int:
    """Rebuild the whole mirror from Postgres and swap it in atomically. Returns the
    number of suppressions mirrored. Raises redis.RedisError if Redis fails.

    An add that commits while this reads Postgres is missing from the snapshot, but its
    after-commit write lands in RECENT_KEY after `since`, and the swap script copies it
    over (if it was not removed meanwhile). A removal that commits meanwhile may survive
    as a false positive until the next rebuild: harmless.
    """
    client = _client_for(settings.REDIS_URL)
    since = time.time() - SKEW_MARGIN_SECONDS  # taken before the snapshot query starts
    build_key = f"{BUILD_KEY_PREFIX}{uuid.uuid4().hex}"
    lifetime = _lifetime()
    count = 0
    try:
        batch: dict[Any, Any] = {}  # (redis-py's mapping type is invariant in its keys)
        rows = Suppression.objects.values_list("email", "topic").order_by().iterator(chunk_size=BUILD_BATCH)
        for email, topic in rows:
            batch[_field(email, topic)] = "1"
            if len(batch) >= BUILD_BATCH:
                count += _write_batch(client, build_key, batch, lifetime)
                batch = {}
        count += _write_batch(client, build_key, batch, lifetime)
        # Erased addresses, as global entries (only hashes made with the current key
        # can match; mirror_enabled() refuses the mirror while SECRET_KEY_FALLBACKS
        # could hold others).
        erased = {
            f"{email_hash[:32]}:": "1"
            for email_hash in HashedSuppression.objects.values_list("email_hash", flat=True).iterator()
        }
        count += _write_batch(client, build_key, erased, lifetime)
        carried = client.register_script(_SWAP_SCRIPT)(
            keys=[build_key, MIRROR_KEY, RECENT_KEY], args=[since, COMPLETE_FIELD, _marker(), lifetime]
        )
    except BaseException:
        with contextlib.suppress(redis.RedisError):  # otherwise it expires on its own
            client.delete(build_key)
        raise
    reset_breaker()
    logger.info("suppression mirror rebuilt", extra={"suppressions": count, "carried_over": carried})
    return count


def _write_batch(client: redis.Redis, key: str, batch: dict[Any, Any], lifetime: int) -> int:
    # (With no suppressions at all, the swap script's marker creates the hash.)
    if batch:
        pipe = client.pipeline(transaction=False)
        pipe.hset(key, mapping=batch)
        pipe.expire(key, lifetime)
        pipe.execute()
    return len(batch)


def mirror_discard() -> None:
    """Delete the mirror (storage switched to "database"): a mirror that suppression_add
    no longer maintains must not be found complete if storage is switched back."""
    client = _client_for(settings.REDIS_URL)
    client.delete(MIRROR_KEY, RECENT_KEY)


def mirror_sync() -> int:
    """What the beat task does every SUPPRESSION_SYNC_INTERVAL_SECONDS."""
    if mirror_enabled():
        return mirror_rebuild()
    if settings.REDIS_URL:
        mirror_discard()
    return 0
