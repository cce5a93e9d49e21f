"""Shared fixtures: the local ESP sandbox, running for real on a loopback port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.conf import settings

from mailauto.sandbox import SandboxServer


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    server = SandboxServer(port=0).start()
    try:
        yield server
    finally:
        server.stop()


def sandbox_anymail_settings(server: SandboxServer) -> dict:
    """ANYMAIL settings that point Anymail's real Postmark backend at `server`."""
    return {
        **settings.ANYMAIL,
        "POSTMARK_SERVER_TOKEN": "sandbox-server-token",
        "POSTMARK_API_URL": server.url,
    }
