"""Data residency: may we process (and email) a contact from this region at all?

MAILAUTO["ALLOWED_REGIONS"] (env MAILAUTO_ALLOWED_REGIONS, comma-separated) lists the
Contact.region values we may process. The rule:

- an empty list allows every region, an unknown one included (residency is off);
- otherwise it is strict: a contact is allowed only if its region, lower-cased and
  stripped, is listed exactly. No aliases: "eu" does not cover "de"; use one vocabulary
  in identify() and in the setting.
- a contact with no region is allowed only if "unknown" (or an empty entry) is listed:
  when a residency rule is configured, not knowing where data lives is not compliance.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import TYPE_CHECKING

from django.conf import settings

if TYPE_CHECKING:
    from campaigns.models import Contact

UNKNOWN_REGION = "unknown"


def normalize_region(region: str | None) -> str:
    """A Contact.region as the rules compare it; an empty region is "unknown"."""
    return (region or "").strip().lower() or UNKNOWN_REGION


def normalized_regions(configured: Iterable[str]) -> frozenset[str]:
    """A configured list of regions (ALLOWED_REGIONS, GDPR_REGIONS), normalised.

    Asked for several times per message; remembered by the list's *value*, so a
    settings override (or a list changed in place) is seen on the next call.
    """
    return _normalized_regions(tuple(configured)) if configured else frozenset()


@functools.lru_cache(maxsize=16)
def _normalized_regions(configured: tuple[str, ...]) -> frozenset[str]:
    return frozenset(normalize_region(region) for region in configured)


def allowed_regions() -> frozenset[str]:
    return normalized_regions(settings.MAILAUTO["ALLOWED_REGIONS"])


def region_allowed(region: str) -> bool:
    allowed = allowed_regions()
    return not allowed or normalize_region(region) in allowed


def residency_decision(*, contact: Contact) -> tuple[bool, str]:
    """(allowed, reason). The reason is empty when allowed, and says why when not."""
    allowed = allowed_regions()
    region = normalize_region(contact.region)
    if not allowed or region in allowed:
        return True, ""
    listed = ", ".join(sorted(allowed))
    if region == UNKNOWN_REGION:
        return False, f"contact region unknown; ALLOWED_REGIONS ({listed}) does not list 'unknown'"
    return False, f"contact region {region!r} is not in ALLOWED_REGIONS ({listed})"
