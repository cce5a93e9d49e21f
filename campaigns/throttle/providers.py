"""Mailbox providers: which one an address belongs to, and grouping by it, so that
each provider can have its own messages/s limit (MAILAUTO["PROVIDER_RATE_LIMITS"])."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

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
