"""Campaigns: contacts, events, automations, templates, messages and the delivery engine.

The public API for application code is re-exported here::

    import campaigns
    campaigns.identify("u-42", email="ada@example.com", attributes={"first_name": "Ada"})
    campaigns.emit("user.signed_up", "u-42", {"plan": "pro"})

The functions are imported lazily so that `import campaigns` works before Django's app
registry is ready (settings modules, Celery config).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from campaigns.exceptions import InvalidContact, InvalidEvent, InvalidInput

if TYPE_CHECKING:
    from campaigns.events import emit, emit_many, identify

__all__ = ["InvalidContact", "InvalidEvent", "InvalidInput", "emit", "emit_many", "identify"]


def __getattr__(name: str) -> Any:
    if name in ("emit", "emit_many", "identify"):
        from campaigns import events

        return getattr(events, name)
    raise AttributeError(f"module 'campaigns' has no attribute {name!r}")
