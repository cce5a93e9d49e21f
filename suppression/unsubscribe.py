"""Unsubscribe links and RFC 8058 headers for each marketing message.

(The signed-token links, the one-click endpoint and the preference centre land with the
feedback-loop work; until then no links and no headers are produced.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from campaigns.models import Message


def message_links(*, message: Message) -> dict[str, str]:
    """The links a template and the layout may show: unsubscribe_url, preferences_url."""
    return {}


def message_headers(*, message: Message, links: dict[str, str]) -> dict[str, str]:
    """Extra headers for the email (List-Unsubscribe, List-Unsubscribe-Post)."""
    return {}
