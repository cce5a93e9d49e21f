"""Reads that decide who may get mail. Every send path asks `send_decision` and nothing else."""

from __future__ import annotations

from dataclasses import dataclass

from suppression.models import Suppression
from suppression.services import normalize_email


@dataclass(frozen=True)
class SendDecision:
    allowed: bool
    reason: str = ""


ALLOWED = SendDecision(allowed=True)


def send_decision(*, email: str, purpose: str, transactional: bool = False) -> SendDecision:
    """May we email this address, for this purpose, now?

    A global suppression (bounce, complaint, invalid, manual) stops everything. A topic
    suppression (an unsubscribe from one purpose) stops that purpose; an unsubscribe
    from all marketing (topic "") does not stop transactional mail.
    """
    rows = Suppression.objects.filter(email=normalize_email(email), topic__in=["", purpose]).values_list(
        "topic", "reason"
    )
    for topic, reason in rows:
        if transactional and reason == Suppression.Reason.UNSUBSCRIBE:
            continue
        label = Suppression.Reason(reason).label
        return SendDecision(allowed=False, reason=f"suppressed: {label}" + (f" ({topic})" if topic else ""))
    return ALLOWED
