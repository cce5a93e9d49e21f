"""The one mutation path for suppression state: suppression_add / suppression_remove."""

from __future__ import annotations

from django.db import transaction

from suppression.models import Suppression, SuppressionLogEntry


def normalize_email(email: str) -> str:
    return email.strip().lower()


@transaction.atomic
def suppression_add(
    *, email: str, reason: str, source: str, topic: str = "", detail: str = ""
) -> Suppression:
    """Suppress an address (idempotent: an existing entry keeps its first reason)."""
    email = normalize_email(email)
    suppression, created = Suppression.objects.get_or_create(
        email=email, topic=topic, defaults={"reason": reason, "source": source, "detail": detail}
    )
    if created:
        SuppressionLogEntry.objects.create(
            email=email, topic=topic, action=SuppressionLogEntry.Action.ADDED, reason=reason, source=source
        )
    return suppression


@transaction.atomic
def suppression_remove(*, email: str, reason: str, source: str, topic: str = "") -> bool:
    """Lift a suppression. A reason is required; the caller checks the permission."""
    if not reason.strip():
        raise ValueError("Removing a suppression needs a reason.")
    email = normalize_email(email)
    deleted, _ = Suppression.objects.filter(email=email, topic=topic).delete()
    if deleted:
        SuppressionLogEntry.objects.create(
            email=email, topic=topic, action=SuppressionLogEntry.Action.REMOVED, reason=reason, source=source
        )
    return bool(deleted)
