"""Counters and histograms shared by every process, exported in Prometheus text format.

Counts live in the shared cache (Redis in production: INCR is atomic across workers and
machines), never in one process's memory. Gauges (queue depths, dead letters) are read
from the database when scraped, since the rows are the truth.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from django.core.cache import cache

logger = logging.getLogger(__name__)

PREFIX = "mailauto:metrics:"

# Event-to-ESP latency buckets, in seconds (Prometheus histogram "le" bounds).
LATENCY_BUCKETS: tuple[float, ...] = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


def _key(name: str, labels: dict[str, str] | None = None) -> str:
    if not labels:
        return PREFIX + name
    return PREFIX + name + "|" + ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def incr(name: str, amount: int = 1, **labels: str) -> None:
    """Add to a counter. Never raises: metrics must not break sending."""
    if amount <= 0:
        return
    key = _key(name, labels)
    try:
        try:
            cache.incr(key, amount)
        except ValueError:  # the key does not exist yet
            if not cache.add(key, amount, timeout=None):
                cache.incr(key, amount)
    except Exception:
        logger.debug("metrics: could not increment %s", key, exc_info=True)


def observe_latencies(name: str, seconds: Iterable[float]) -> None:
    """Record observations into a cumulative histogram (Prometheus semantics)."""
    values = list(seconds)
    if not values:
        return
    for bound in LATENCY_BUCKETS:
        incr(f"{name}_bucket", sum(1 for v in values if v <= bound), le=_fmt(bound))
    incr(f"{name}_bucket", len(values), le="+Inf")
    incr(f"{name}_count", len(values))
    # The sum is kept in milliseconds so that it stays an integer counter.
    incr(f"{name}_sum_ms", int(sum(values) * 1000))


def read(name: str, **labels: str) -> int:
    try:
        return int(cache.get(_key(name, labels)) or 0)
    except Exception:
        return 0


def _fmt(value: float) -> str:
    return f"{value:g}"
