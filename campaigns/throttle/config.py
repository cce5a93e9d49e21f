"""The rate limit's settings: which ESP account a limit belongs to, and what is wrong
with the MAILAUTO options (for the system check)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

from django.conf import settings

from campaigns.throttle.providers import PROVIDERS


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
