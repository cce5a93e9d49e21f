"""Fault injection for the ESP sandbox's send endpoints: latency, counted and random
429/500/503 answers, and dropped responses, changeable while the server runs."""

from __future__ import annotations

import random
import threading
from dataclasses import asdict, dataclass, fields
from typing import Any

# Counted faults are taken in this order: one request consumes one unit of the first
# counter that is not zero, so {"fail_429": 1, "fail_500": 1} answers 429 then 500.
COUNTED_FAULTS = (("fail_429", "429"), ("fail_503", "503"), ("fail_500", "500"), ("drop", "drop"))
RANDOM_FAULTS = (("rate_429", "429"), ("rate_503", "503"), ("rate_500", "500"), ("rate_drop", "drop"))


@dataclass
class Faults:
    """What the next requests to /email and /email/batch suffer.

    latency_ms   delay before every answer (dropped or not)
    fail_429     the next N requests answer 429 (not recorded)
    fail_500     the next N requests answer 500 (not recorded)
    fail_503     the next N requests answer 503 (not recorded)
    drop         the next N requests are processed normally (accepted messages are
                 recorded and their webhooks sent) but the connection is closed with
                 no response: the ambiguous outcome
    retry_after  seconds for a Retry-After header on 429 and 503 (none if unset,
                 which is what Postmark does)
    rate_*       probability (0..1) that a request suffers that fault, checked when no
                 counted fault applies; `seed` makes the draw repeatable
    """

    latency_ms: float = 0
    fail_429: int = 0
    fail_500: int = 0
    fail_503: int = 0
    drop: int = 0
    retry_after: int | None = None
    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_503: float = 0.0
    rate_drop: float = 0.0
    seed: int | None = None


@dataclass(frozen=True)
class FaultDecision:
    action: str | None  # None, "429", "500", "503" or "drop"
    latency_s: float
    retry_after: int | None


class FaultPlan:
    """The current Faults, consumed atomically by concurrent request threads."""

    def __init__(self, **initial: Any) -> None:
        self._lock = threading.Lock()
        self._faults = Faults()
        self._random = random.Random()
        self.update(**initial)

    def update(self, **changes: Any) -> dict[str, Any]:
        """Change only the given fields; raise ValueError on an unknown or bad value."""
        known = {f.name for f in fields(Faults)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown fault(s) {sorted(unknown)}; known: {sorted(known)}")
        cleaned = {name: _clean(name, value) for name, value in changes.items()}
        with self._lock:
            for name, value in cleaned.items():
                setattr(self._faults, name, value)
            if "seed" in cleaned:
                self._random.seed(cleaned["seed"])
            return asdict(self._faults)

    def clear(self) -> dict[str, Any]:
        with self._lock:
            self._faults = Faults()
            return asdict(self._faults)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return asdict(self._faults)

    def take(self) -> FaultDecision:
        with self._lock:
            f = self._faults
            action = None
            for name, kind in COUNTED_FAULTS:
                if getattr(f, name) > 0:
                    setattr(f, name, getattr(f, name) - 1)
                    action = kind
                    break
            else:
                if f.rate_429 or f.rate_500 or f.rate_503 or f.rate_drop:
                    draw = self._random.random()
                    for name, kind in RANDOM_FAULTS:
                        draw -= getattr(f, name)
                        if draw < 0:
                            action = kind
                            break
            return FaultDecision(action=action, latency_s=f.latency_ms / 1000, retry_after=f.retry_after)


def _clean(name: str, value: Any) -> Any:
    if name in ("retry_after", "seed"):
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer or null")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number")
    if name.startswith("rate_"):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be between 0 and 1")
        return float(value)
    if value < 0:
        raise ValueError(f"{name} must not be negative")
    return value if name == "latency_ms" else int(value)
