"""Retry delays: exponential backoff with jitter, honouring a server's Retry-After."""

from __future__ import annotations

import random


def retry_delay(*, attempt: int, base: float, cap: float, retry_after: float | None = None) -> float:
    """Seconds to wait before attempt number `attempt + 1`.

    Exponential (base · 2^(attempt-1)) capped at `cap`, with "equal jitter": half the
    delay is fixed, half random, so retries of a burst spread out instead of arriving
    together, while no retry comes sooner than half the nominal delay. A Retry-After
    from the server is a floor: we never come back earlier than it asked.
    """
    nominal = min(cap, base * (2 ** max(0, attempt - 1)))
    delay = nominal / 2 + random.uniform(0, nominal / 2)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay
