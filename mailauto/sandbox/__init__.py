"""The local ESP sandbox: a Postmark- and Resend-compatible HTTP server on loopback for
the demo, tests and benchmarks, and a client for its control API.

    from mailauto.sandbox import SandboxServer, SandboxClient
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mailauto.sandbox.faults import Faults
from mailauto.sandbox.server import DEFAULT_SERVER_TOKEN, SandboxError, SandboxServer

if TYPE_CHECKING:
    from mailauto.sandbox.client import SandboxClient

__all__ = ["DEFAULT_SERVER_TOKEN", "Faults", "SandboxClient", "SandboxError", "SandboxServer"]


def __getattr__(name: str) -> Any:
    # The client needs `requests`; the server is standard library only and should not
    # pay for importing it.
    if name == "SandboxClient":
        from mailauto.sandbox.client import SandboxClient

        return SandboxClient
    raise AttributeError(name)
