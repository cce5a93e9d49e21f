"""The Throttle: takes tokens for an ESP request (waiting as long as the store says,
never inside a DB transaction) and feeds the ESP's answers back into the adaptive rate
(AIMD: halve on a 429, creep back up after clean sends)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import connections

from campaigns.throttle.backends import Backend
from campaigns.throttle.config import esp_account
from campaigns.throttle.errors import ThrottleInTransaction, ThrottleTimeout
from campaigns.throttle.providers import PROVIDERS, provider_for

ESP_BUCKET = "esp"
# Buckets idle this long are forgotten (a new provider list, a rotated API key).
STATE_TTL_SECONDS = 7 * 24 * 3600
# A worker about to sleep longer than this first closes its idle DB connections, so that
# a fleet of throttled workers does not pin Postgres connections while it waits.
RELEASE_DB_CONNECTIONS_AFTER_SECONDS = 1.0


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
