"""Shared fixtures: the local ESP sandbox, running for real on a loopback port."""

from __future__ import annotations

import unittest
from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings
from django.test import override_settings

from mailauto.sandbox import SandboxServer


@pytest.fixture(scope="session", autouse=True)
def _fresh_shared_cache(django_db_blocker: object) -> None:
    """The shared cache lives in Redis and outlives a test run; ids restart with a new
    test database, so entries from an earlier run must not be read."""
    from django.core.cache import cache

    cache.clear()


@pytest.fixture(autouse=True)
def _no_cached_event_types() -> None:
    """emit() caches event types per process; ids of a rolled-back test must not leak."""
    from campaigns.events import forget_event_type

    forget_event_type()


@pytest.fixture(autouse=True)
def _no_pending_nudges() -> None:
    """Nudges are debounced by a shared marker (mailauto/lib/nudge.py); a marker left by
    one test must not swallow the nudge another test expects."""
    from django.core.cache import cache

    from mailauto.lib import nudge

    nudge.flush_pending()  # a previous test's deferred nudge must not land mid-test
    kinds = ["events", "sends", "broadcasts"]
    cache.delete_many([f"mailauto:nudge:{kind}{slot}" for kind in kinds for slot in ("", ":1", ":2", ":3")])


@pytest.fixture(autouse=True)
def _fresh_rate_limits() -> None:
    """The shared token buckets (and their adaptive state) live in Redis; a 429 in one
    test must not slow down the next."""
    import redis

    client = redis.Redis.from_url(settings.REDIS_URL)
    keys = list(client.scan_iter("mailauto:throttle:*"))
    if keys:
        client.delete(*keys)


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    server = SandboxServer(port=0).start()
    try:
        yield server
    finally:
        server.stop()


def use_sandbox(test: unittest.TestCase, **options: Any) -> SandboxServer:
    """Start a sandbox for one test (`options` as SandboxServer takes them, e.g. where
    to post webhooks) and point Anymail's Postmark backend at it, both undone when the
    test ends."""
    server = SandboxServer(port=0, **options).start()
    test.addCleanup(server.stop)
    override = override_settings(
        EMAIL_BACKEND="anymail.backends.postmark.EmailBackend",
        ANYMAIL=sandbox_anymail_settings(server),
    )
    override.enable()
    test.addCleanup(override.disable)
    return server


def sandbox_anymail_settings(server: SandboxServer) -> dict:
    """ANYMAIL settings that point Anymail's real Postmark backend at `server`."""
    return {
        **settings.ANYMAIL,
        "POSTMARK_SERVER_TOKEN": "sandbox-server-token",
        "POSTMARK_API_URL": server.url,
    }
