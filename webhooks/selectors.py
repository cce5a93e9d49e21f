"""Reads for the tracking-event services: which message an event is about, and how often
an address has soft-bounced lately."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime

from django.db import connections, router
from django.db.models import Field

from campaigns.models import Message
from webhooks.models import TrackingEvent

# Message primary keys are bigints; anything longer is not one of ours.
_MAX_PK_DIGITS = 18


@dataclass(frozen=True)
class MessageLink:
    pk: int
    to_email: str


def message_pk_from_metadata(metadata: object) -> int | None:
    """The `mailauto_message_id` that campaigns.delivery attaches to every send, if the
    event carries it back (as a string: ESP metadata values are strings)."""
    if not isinstance(metadata, dict):
        return None
    value = metadata.get("mailauto_message_id")
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None
    text = str(value).strip()
    # ASCII digits only: str.isdigit() is also true for "²" (which int() refuses) and
    # for Arabic-Indic or full-width digits (which int() reads as numbers: someone
    # else's message).
    if not (text.isascii() and text.isdigit()) or len(text) > _MAX_PK_DIGITS or int(text) == 0:
        return None
    return int(text)


def message_for_tracking_event(*, metadata: object, esp_message_id: str) -> MessageLink | None:
    """The Message an ESP event is about: by our own id in the metadata first (it survives
    an ambiguous send that never learned the ESP's id), else by the ESP's message id."""
    pk = message_pk_from_metadata(metadata)
    connection = connections[router.db_for_read(Message)]
    by_pk, by_esp_id = _lookup_sql(connection.vendor)
    row = None
    with connection.cursor() as cursor:
        if pk is not None:
            cursor.execute(by_pk, [pk])
            row = cursor.fetchone()
        if row is None and esp_message_id:
            cursor.execute(by_esp_id, [esp_message_id])
            row = cursor.fetchone()
    return MessageLink(pk=row[0], to_email=row[1]) if row is not None else None


@functools.cache
def _lookup_sql(vendor: str) -> tuple[str, str]:
    """SELECT id, to_email by id, and by ESP message id (newest first).

    SQL rather than the ORM because every webhook runs one: building and compiling the
    queryset cost several times the query itself (bench/webhooks.py).
    """
    connection = connections[router.db_for_read(Message)]
    meta = Message._meta
    quote = connection.ops.quote_name

    def col(name: str) -> str:
        field = meta.get_field(name)
        assert isinstance(field, Field)
        return quote(str(field.column))

    select = f"SELECT {col('id')}, {col('to_email')} FROM {quote(meta.db_table)}"  # noqa: S608
    return (
        f"{select} WHERE {col('id')} = %s",
        f"{select} WHERE {col('esp_message_id')} = %s ORDER BY {col('id')} DESC LIMIT 1",
    )


def soft_bounce_count(*, email: str, since: datetime) -> int:
    """Soft bounces recorded for an address (lower case) that happened after `since`."""
    return TrackingEvent.objects.filter(
        recipient=email, bounce_kind=TrackingEvent.BounceKind.SOFT, occurred_at__gt=since
    ).count()
