"""The default throttle, chosen from the settings, and the module-level functions the
delivery loop calls (campaigns.throttle.acquire_for_batch, report_success, ...)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

from django.conf import settings

from campaigns.throttle.backends import Backend, FileBackend, RedisBackend
from campaigns.throttle.limiter import ESP_BUCKET, RateState, Throttle

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
