"""Recording ESP tracking events: each is stored once, moves its Message along the status
timeline (never backwards), and suppresses the address when it says we must stop mailing
it. The `tracking` signal receiver (webhooks/receivers.py) is the one caller."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from anymail.signals import AnymailTrackingEvent, RejectReason
from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import connections, router, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Field
from django.http import QueryDict
from django.utils import timezone

from campaigns.models import Message
from mailauto.lib.prepared import prepared_cursor
from suppression.models import HashedSuppression, Suppression
from suppression.privacy import ERASED_DOMAIN, email_hashes, hashed_suppressed_among
from suppression.services import normalize_email, recipient_consent_withdraw, suppression_add
from webhooks.models import TrackingEvent
from webhooks.selectors import (
    MessageLink,
    message_for_tracking_event,
    message_pk_from_metadata,
    soft_bounce_count,
)

logger = logging.getLogger(__name__)

EventType = TrackingEvent.EventType
EVENT_TYPES = frozenset(EventType.values)
Status = Message.Status
Reason = Suppression.Reason

# --- the message status timeline -------------------------------------------------------

# Statuses a message has before the ESP is known to have it. Any webhook about a message
# proves the ESP took it, so each of these may move forward. UNKNOWN and SENDING are the
# ambiguous hand-offs a webhook exists to reconcile. The others can only be named by a
# webhook if an earlier attempt reached the ESP (our metadata id travels with sends
# only): QUEUED/CLAIMED after an unknown outcome was requeued for its one resend, DEAD
# after that resend, FAILED/SUPPRESSED if the resend was refused. There the webhook is
# the truth, and moving the message on stops a resend or a replay of mail the recipient
# already has (the claim and the hand-off UPDATEs in campaigns/delivery.py both filter
# on the status they expect, so they lose to this one).
BEFORE_SENT: tuple[str, ...] = (
    Status.QUEUED,
    Status.CLAIMED,
    Status.SENDING,
    Status.UNKNOWN,
    Status.DEAD,
    Status.FAILED,
    Status.SUPPRESSED,
    Status.CANCELLED,  # a cancelled resend-after-unknown whose first attempt did arrive
)
# Then the timeline, in order: a webhook moves a message to a later status, never to an
# earlier one. The refusals outrank every engagement state (a complaint after an open is
# a complaint); among them a complaint outranks a bounce, which outranks an unsubscribe.
# A total order makes the outcome independent of the order webhooks arrive in.
TIMELINE: tuple[str, ...] = (
    Status.SENT,
    Status.DELIVERED,
    Status.OPENED,
    Status.CLICKED,
    Status.UNSUBSCRIBED,
    Status.BOUNCED,
    Status.COMPLAINED,
)

# Anymail's normalized event type -> the status it proves. Events that only prove the
# ESP has the message (queued, deferred, an auto-reply, ...) reconcile to SENT. "rejected"
# and "failed" (the ESP took the API call, then refused to send) did not reach the
# recipient either: BOUNCED, with the reason in status_reason.
STATUS_FOR_EVENT: dict[str, str] = {
    EventType.QUEUED: Status.SENT,
    EventType.SENT: Status.SENT,
    EventType.DEFERRED: Status.SENT,
    EventType.AUTORESPONDED: Status.SENT,
    EventType.SUBSCRIBED: Status.SENT,
    EventType.UNKNOWN: Status.SENT,
    EventType.DELIVERED: Status.DELIVERED,
    EventType.OPENED: Status.OPENED,
    EventType.CLICKED: Status.CLICKED,
    EventType.UNSUBSCRIBED: Status.UNSUBSCRIBED,
    EventType.BOUNCED: Status.BOUNCED,
    EventType.REJECTED: Status.BOUNCED,
    EventType.FAILED: Status.BOUNCED,
    EventType.COMPLAINED: Status.COMPLAINED,
}


def statuses_before(status: str) -> tuple[str, ...]:
    """The statuses a message may move to `status` from."""
    return BEFORE_SENT + TIMELINE[: TIMELINE.index(status)]


# --- ESP vocabulary that Anymail does not normalize ---------------------------------------


def _get(event: object, *path: str) -> object:
    for key in path:
        if not isinstance(event, Mapping):
            return None
        event = event.get(key)
    return event


# Bounces the ESP calls soft or transient (the mailbox may work again) although Anymail
# normalizes them to "bounced" like a hard bounce. Postmark's SoftBounce is the one that
# matters here: anymail/webhooks/postmark.py maps both "HardBounce" and "SoftBounce" to
# (EventType.BOUNCED, RejectReason.BOUNCED) ("might also receive HardBounce later"), so
# only the raw Type tells them apart. (Postmark's Transient and DnsError, and other
# ESPs' temporary failures, already arrive as "deferred": the ESP is still trying.)
SOFT_BOUNCE: dict[str, Callable[[object], bool]] = {
    "postmark": lambda e: _get(e, "Type") == "SoftBounce",
    "amazon_ses": lambda e: _get(e, "bounce", "bounceType") == "Transient",
    "brevo": lambda e: _get(e, "event") == "soft_bounce",
    "sendinblue": lambda e: _get(e, "event") == "soft_bounce",
    "mandrill": lambda e: _get(e, "event") == "soft_bounce",
    "mailersend": lambda e: _get(e, "data", "type") == "soft_bounced",
    "mailjet": lambda e: _get(e, "event") == "bounce" and _get(e, "hard_bounce") is False,
}

# ESPs whose one notification Anymail splits into an event per recipient, all with the
# notification's id (Amazon SES: event_id is the SNS MessageId, see
# anymail/webhooks/amazon_ses.py). Their dedup key needs the recipient too.
EVENT_ID_SHARED_BY_RECIPIENTS = frozenset({"amazon_ses"})

# Reject reasons that say the address itself must not be mailed (Anymail's RejectReason).
# "blocked" and "other" are the ESP's or the receiving ISP's policy (an ISP block, a DMARC
# failure, a virus): suppressing the recipient for those would punish the wrong party.
REJECTION_SUPPRESSION: dict[str | None, str] = {
    RejectReason.INVALID: Reason.INVALID,
    RejectReason.BOUNCED: Reason.INVALID,
    RejectReason.TIMED_OUT: Reason.INVALID,
    RejectReason.SPAM: Reason.COMPLAINT,
    RejectReason.UNSUBSCRIBED: Reason.UNSUBSCRIBE,
}
HARD_BOUNCE_REJECT_REASONS = (None, RejectReason.BOUNCED, RejectReason.INVALID, RejectReason.TIMED_OUT)

# Soft bounces for one address are counted under a transaction-scoped advisory lock so
# that two concurrent bounces cannot both count before either commits (and both stay
# under the limit). First key: this lock's namespace; second: hashtext(address).
SOFT_BOUNCE_LOCK_NAMESPACE = 0x5B0C


def esp_slug(esp_name: str) -> str:
    """Anymail's display name ("Amazon SES") as our URL and source name ("amazon_ses")."""
    return esp_name.strip().lower().replace(" ", "_")


def esp_event_as_json(esp_event: object) -> object:
    """The raw event as JSON data: parsed JSON as it is, form posts (a QueryDict) as lists."""
    if esp_event is None:
        return {}
    if isinstance(esp_event, QueryDict):
        return dict(esp_event.lists())
    return esp_event


def canonical_json(data: object) -> str:
    """Strict JSON (no NaN), keys sorted: what is stored, and what a content hash hashes."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), cls=DjangoJSONEncoder, allow_nan=False)


def bounce_kind(*, esp: str, event: AnymailTrackingEvent) -> str:
    if event.event_type != EventType.BOUNCED:
        return ""
    is_soft = SOFT_BOUNCE.get(esp)
    if is_soft is not None and is_soft(event.esp_event):
        return TrackingEvent.BounceKind.SOFT
    if event.reject_reason in HARD_BOUNCE_REJECT_REASONS:
        return TrackingEvent.BounceKind.HARD
    return ""


def suppression_reason(*, event_type: str, reject_reason: str | None, kind: str) -> str | None:
    """What an event suppresses at once (soft bounces only add up: see _soft_bounce_check)."""
    if event_type == EventType.COMPLAINED:
        return Reason.COMPLAINT
    if event_type == EventType.UNSUBSCRIBED:
        return Reason.UNSUBSCRIBE
    if event_type == EventType.BOUNCED and kind == TrackingEvent.BounceKind.HARD:
        return Reason.INVALID if reject_reason == RejectReason.INVALID else Reason.HARD_BOUNCE
    if event_type == EventType.REJECTED:
        return REJECTION_SUPPRESSION.get(reject_reason)
    return None


def _esp_event_id(*, esp: str, event: AnymailTrackingEvent, recipient: str, raw_json: str) -> str:
    if event.event_id is None or event.event_id == "":
        # No id from the ESP (Postmark gives one for bounces only): the content is the
        # identity. A redelivered webhook is byte-for-byte the same event.
        digest = hashlib.sha256(f"{event.event_type}\n{recipient}\n{raw_json}".encode()).hexdigest()
        return f"sha256:{digest}"
    event_id = str(event.event_id)
    if esp in EVENT_ID_SHARED_BY_RECIPIENTS:
        # A hash, not the address: ids are kept when a contact is erased (GDPR).
        event_id = f"{event_id}/{hashlib.sha256(recipient.encode()).hexdigest()[:16]}"
    if len(event_id) > 255:
        event_id = "sha256:" + hashlib.sha256(event_id.encode()).hexdigest()
    return event_id


def _aware(value: datetime | None, default: datetime) -> datetime:
    if value is None:
        return default
    return value if timezone.is_aware(value) else value.replace(tzinfo=UTC)


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


# --- the service -----------------------------------------------------------------------


def tracking_event_record(*, esp: str, event: AnymailTrackingEvent) -> TrackingEvent | None:
    """Store one ESP tracking event and apply it, atomically.

    Returns the new TrackingEvent, or None when this event was recorded before: an ESP
    retrying a webhook, or a replay, changes nothing the second time.

    Most events (deliveries, opens, clicks) only move a message along its timeline:
    on Postgres those take one statement (_record_in_one_statement). Events that may
    suppress an address, and events that name no recipient, take the general path
    (_record_with_effects), one transaction of several statements.
    """
    now = timezone.now()
    event_type = event.event_type if event.event_type in EVENT_TYPES else EventType.UNKNOWN
    recipient = normalize_email(_text(event.recipient))
    kind = bounce_kind(esp=esp, event=event)
    may_suppress = (
        suppression_reason(event_type=event_type, reject_reason=event.reject_reason, kind=kind) is not None
        or kind == TrackingEvent.BounceKind.SOFT
    )
    connection = connections[router.db_for_write(TrackingEvent)]
    if recipient and not may_suppress and connection.vendor == "postgresql":
        return _record_in_one_statement(
            esp=esp, event=event, event_type=event_type, recipient=recipient, now=now
        )
    return _record_with_effects(esp=esp, event=event, event_type=event_type, kind=kind, now=now)


def _record_in_one_statement(
    *, esp: str, event: AnymailTrackingEvent, event_type: str, recipient: str, now: datetime
) -> TrackingEvent | None:
    """An event that suppresses nothing, in one statement (so in autocommit, its own
    transaction, with no BEGIN/COMMIT round trips): find the message, INSERT the event
    ON CONFLICT DO NOTHING, and advance the message only if the INSERT took.

    The same guarantees as the general path, for the same reasons: the unique index
    decides which of two racing deliveries of one event inserts (the loser's INSERT
    waits for the winner's commit, then inserts nothing, so its UPDATE has no message
    to touch), and the UPDATE's WHERE clause, re-checked by Postgres against a row that
    a concurrent transaction just committed, never moves a message backwards.
    """
    esp_event = esp_event_as_json(event.esp_event)
    raw_json = canonical_json(esp_event)
    metadata = event.metadata if isinstance(event.metadata, dict) else {}
    esp_message_id = _text(event.message_id)
    tracking_event = TrackingEvent(
        esp=esp,
        esp_event_id=_esp_event_id(esp=esp, event=event, recipient=recipient, raw_json=raw_json),
        event_type=event_type,
        bounce_kind="",
        esp_message_id=esp_message_id,
        recipient=recipient,
        occurred_at=_aware(event.timestamp, now),
        received_at=now,
        description=_text(event.description),
        mta_response=_text(event.mta_response),
        reject_reason=_text(event.reject_reason),
        click_url=_text(event.click_url),
        metadata=metadata,
        esp_event=esp_event,
    )
    connection = connections[router.db_for_write(TrackingEvent)]
    values = {f.attname: getattr(tracking_event, f.attname) for f in _insert_fields() if f.name != "message"}
    # jsonb from the text we already have (cast in the SQL), rather than encoding again.
    values["metadata"] = canonical_json(metadata)
    values["esp_event"] = raw_json
    target = STATUS_FOR_EVENT[event_type]
    params = [
        message_pk_from_metadata(metadata),
        esp_message_id,
        esp_message_id,
        email_hashes(recipient),
        *(values[f.attname] for f in _insert_fields() if f.name != "message"),
        *_advance_params(tracking_event=tracking_event, target=target, now=now, connection=connection),
    ]
    with prepared_cursor(connection) as cursor:
        cursor.execute(_record_sql(connection.vendor, target), params)
        row = cursor.fetchone()
    if row is None:
        logger.debug(
            "tracking event already recorded",
            extra={"esp": esp, "esp_event_id": tracking_event.esp_event_id},
        )
        return None
    tracking_event.pk, tracking_event.message_id = row
    tracking_event._state.adding = False
    tracking_event._state.db = connection.alias
    return tracking_event


@transaction.atomic
def _record_with_effects(
    *, esp: str, event: AnymailTrackingEvent, event_type: str, kind: str, now: datetime
) -> TrackingEvent | None:
    """The general path: every event may come here (and every event does on SQLite)."""
    esp_event = esp_event_as_json(event.esp_event)
    metadata = event.metadata if isinstance(event.metadata, dict) else {}
    esp_message_id = _text(event.message_id)
    link = message_for_tracking_event(metadata=metadata, esp_message_id=esp_message_id)
    recipient = normalize_email(_text(event.recipient) or (link.to_email if link else ""))
    # One query for both: the message's address (a placeholder once erased) and the
    # event's (erased: its keyed hash is in HashedSuppression).
    erased = bool(hashed_suppressed_among({recipient, link.to_email if link else ""} - {""}))

    tracking_event = TrackingEvent(
        esp=esp,
        esp_event_id=_esp_event_id(
            esp=esp, event=event, recipient=recipient, raw_json=canonical_json(esp_event)
        ),
        event_type=event_type,
        bounce_kind=kind,
        message_id=link.pk if link else None,
        esp_message_id=esp_message_id,
        recipient=recipient,
        occurred_at=_aware(event.timestamp, now),
        received_at=now,
        description=_text(event.description),
        mta_response=_text(event.mta_response),
        reject_reason=_text(event.reject_reason),
        click_url=_text(event.click_url),
        metadata=metadata,
        esp_event=esp_event,
    )
    if erased:
        _erased_scrub(tracking_event)
    if not _insert_once(tracking_event):
        logger.debug(
            "tracking event already recorded",
            extra={"esp": esp, "esp_event_id": tracking_event.esp_event_id},
        )
        return None

    if link is not None:
        _message_advance(link=link, tracking_event=tracking_event, now=now)
    reason = suppression_reason(event_type=event_type, reject_reason=event.reject_reason, kind=kind)
    if erased:
        # Suppressed for good already, as a hash; a plain row would store the address.
        reason = None
    elif reason is None and kind == TrackingEvent.BounceKind.SOFT:
        reason = _soft_bounce_check(recipient=recipient, now=now)
    if reason is not None and recipient:
        suppression_add(
            email=recipient,
            reason=reason,
            source=f"webhook:{esp}",
            detail=_suppression_detail(tracking_event),
        )
        if reason == Reason.UNSUBSCRIBE:
            # An unsubscribe through the ESP (Postmark's SubscriptionChange, a list
            # unsubscribe the ESP handled) withdraws consent like one through our pages.
            recipient_consent_withdraw(
                email=recipient,
                topic="",
                source=f"webhook:{esp}",
                message_id=tracking_event.message_id,
            )
        logger.info(
            "address suppressed by a tracking webhook",
            extra={
                "esp": esp,
                "reason": reason,
                "tracking_event_id": tracking_event.pk,
                "message_id": tracking_event.message_id,
            },
        )
    return tracking_event


# An event about an erased address (GDPR Art. 17: suppression.privacy.contact_erase) is
# stored, so the message's timeline and the reputation counts stay right, but without
# what would bring the address back: the recipient becomes a placeholder, the ESP's
# payload and our metadata are dropped, and the free texts (an MTA response quotes the
# address) are blanked. Its id was derived before, from the event as it came, so a
# redelivery is still recognised.
ERASED_RECIPIENT = f"erased@{ERASED_DOMAIN}"
ERASED_SCRUBBED = ("recipient", "description", "mta_response", "click_url", "metadata", "esp_event")


def _erased_scrub(tracking_event: TrackingEvent) -> None:
    tracking_event.recipient = ERASED_RECIPIENT
    tracking_event.description = tracking_event.mta_response = tracking_event.click_url = ""
    tracking_event.metadata = {}
    tracking_event.esp_event = {}


def _insert_once(tracking_event: TrackingEvent) -> bool:
    """INSERT … ON CONFLICT (esp, esp_event_id) DO NOTHING RETURNING id: True, with the pk
    set, when this call created the row.

    One statement, so two deliveries of the same event racing each other cannot both
    insert, and neither fails: the loser waits for the winner's commit on the unique
    index, then inserts nothing. (bulk_create(ignore_conflicts=True) would say nothing
    about which of the two won: Django does not return rows from it.)
    """
    model = TrackingEvent
    connection = connections[router.db_for_write(model)]
    fields = _insert_fields()
    values = [f.get_db_prep_save(f.pre_save(tracking_event, add=True), connection) for f in fields]
    sql = _insert_sql(connection.vendor)
    with connection.cursor() as cursor:
        cursor.execute(sql, values)
        row = cursor.fetchone()
    if row is None:
        return False
    tracking_event.pk = row[0]
    tracking_event._state.adding = False
    tracking_event._state.db = connection.alias
    return True


def _insert_fields() -> list[Field[Any, Any]]:
    return [f for f in TrackingEvent._meta.concrete_fields if not f.primary_key]


@functools.cache
def _insert_sql(vendor: str) -> str:
    """(The SQL helpers here are cached per database vendor, whose quoting they use.)"""
    connection = connections[router.db_for_write(TrackingEvent)]
    quote = connection.ops.quote_name
    meta = TrackingEvent._meta
    table, pk = quote(meta.db_table), quote(str(meta.pk.column))
    columns = ", ".join(quote(str(f.column)) for f in _insert_fields())
    placeholders = ", ".join(["%s"] * len(_insert_fields()))
    conflict = f"{quote('esp')}, {quote('esp_event_id')}"
    # Identifiers come from the model's own metadata; every value is a parameter.
    return f"INSERT INTO {table} ({columns}) VALUES ({placeholders}) ON CONFLICT ({conflict}) DO NOTHING RETURNING {pk}"  # noqa: S608


def _message_advance(*, link: MessageLink, tracking_event: TrackingEvent, now: datetime) -> bool:
    """Move the message forward to the status the event proves, in one conditional UPDATE.

    The WHERE clause names the statuses it may come from, so a concurrent webhook that
    already moved it further, or the sender's own "sent" UPDATE (which only touches
    SENDING/UNKNOWN rows), can never move it backwards: under READ COMMITTED, Postgres
    re-checks the WHERE clause against the row another transaction just committed.
    """
    target = STATUS_FOR_EVENT[tracking_event.event_type]
    connection = connections[router.db_for_write(Message)]
    params = _advance_params(tracking_event=tracking_event, target=target, now=now, connection=connection)
    params.append(link.pk)
    with connection.cursor() as cursor:
        cursor.execute(_advance_sql(connection.vendor, target), params)
        return cursor.rowcount > 0


def _advance_params(
    *, tracking_event: TrackingEvent, target: str, now: datetime, connection: BaseDatabaseWrapper
) -> list[Any]:
    """The parameters of _advance_clauses' SET and WHERE clauses, in that order."""
    label = f"{tracking_event.event_type} (webhook:{tracking_event.esp})"
    detail = tracking_event.description or tracking_event.mta_response
    if target in (Status.BOUNCED, Status.COMPLAINED, Status.UNSUBSCRIBED) and detail:
        label = f"{label}: {detail}"
    at = connection.ops.adapt_datetimefield_value(now)
    return [
        target,
        *BEFORE_SENT,
        f"reconciled: {label}"[:255],
        label[:255],
        # An ambiguous send never learned the ESP's id; record it now. An id we already
        # have stays (a resend's id is the one the ESP answered us with).
        tracking_event.esp_message_id,
        at,
        at,
        *statuses_before(target),
    ]


@functools.cache
def _advance_clauses(vendor: str, target: str) -> tuple[str, str]:
    """The SET and WHERE clauses (less the message's id) of the UPDATE that advances a
    message to `target`, built once per target status.

    Identifiers come from the model's metadata, values are parameters. Written as SQL
    because it runs for every webhook: the same UPDATE through the ORM
    (Case/When/Coalesce expressions resolved and compiled per call) cost more CPU than
    all of the rest of the receiver together (bench/webhooks.py, py-spy).
    """
    status, esp_id, sent_at = _message_col("status"), _message_col("esp_message_id"), _message_col("sent_at")
    assignments = (
        f"{status} = %s, "
        f"{_message_col('status_reason')} = CASE WHEN {status} IN ({_marks(BEFORE_SENT)}) THEN %s ELSE %s END, "
        f"{esp_id} = CASE WHEN {esp_id} = '' THEN %s ELSE {esp_id} END, "
        f"{sent_at} = COALESCE({sent_at}, %s), {_message_col('locked_until')} = NULL, "
        f"{_message_col('updated_at')} = %s"
    )
    return assignments, f"{status} IN ({_marks(statuses_before(target))})"


@functools.cache
def _advance_sql(vendor: str, target: str) -> str:
    """The UPDATE behind _message_advance."""
    assignments, condition = _advance_clauses(vendor, target)
    return f"UPDATE {_message_table()} SET {assignments} WHERE {condition} AND {_message_col('id')} = %s"  # noqa: S608


@functools.cache
def _record_sql(vendor: str, target: str) -> str:
    """The one statement behind _record_in_one_statement, for events proving `target`.

    Parameters: the message id from our metadata (or NULL), the ESP's message id twice,
    the recipient's keyed hashes (suppression.privacy.email_hashes), the TrackingEvent
    columns but `message` in model order, then _advance_params.
    Returns one row (the event's id, its message's id) when the event was inserted,
    none when it was there already.

    The message lookup is the one message_for_tracking_event makes: by our id first,
    else the newest message with the ESP's id. (COALESCE evaluates the second
    subquery only when the first finds nothing.) All three parts see one snapshot;
    the UPDATE joins on what the INSERT returned, so it runs only for a new event.
    """
    connection = connections[router.db_for_write(TrackingEvent)]
    quote = connection.ops.quote_name
    message_id, esp_id = _message_col("id"), _message_col("esp_message_id")
    fields = _insert_fields()

    def value(f: Field[Any, Any]) -> str:
        if f.name == "message":
            return "(SELECT id FROM target)"
        param = "%s::jsonb" if f.get_internal_type() == "JSONField" else "%s"
        if f.name in ERASED_SCRUBBED:
            # An erased recipient's personal data never comes back (see _erased_scrub).
            blank = "'{}'::jsonb" if f.get_internal_type() == "JSONField" else "''"
            if f.name == "recipient":
                blank = f"'{ERASED_RECIPIENT}'"
            # Literals from this module's constants only; the values stay parameters.
            return f"CASE WHEN (SELECT yes FROM erased) THEN {blank} ELSE {param} END"  # noqa: S608
        return param

    values = ", ".join(value(f) for f in fields)
    to_email = _message_col("to_email")
    hashed = connection.ops.quote_name(HashedSuppression._meta.db_table)
    columns = ", ".join(quote(str(f.column)) for f in fields)
    pk = quote(str(TrackingEvent._meta.pk.column))
    event_message = quote(str(TrackingEvent._meta.get_field("message").column))
    assignments, condition = _advance_clauses(vendor, target)
    conflict = f"{quote('esp')}, {quote('esp_event_id')}"
    # Identifiers come from the models' own metadata; every value is a parameter.
    return (
        "WITH target AS (SELECT COALESCE("  # noqa: S608
        f"(SELECT {message_id} FROM {_message_table()} WHERE {message_id} = %s), "
        f"(SELECT {message_id} FROM {_message_table()} WHERE {esp_id} = %s AND %s <> '' "
        f"ORDER BY {message_id} DESC LIMIT 1)) AS id), "
        f"erased AS (SELECT (EXISTS (SELECT 1 FROM {_message_table()} WHERE {message_id} = "
        f"(SELECT id FROM target) AND {to_email} LIKE '%%@{ERASED_DOMAIN}') "
        f"OR EXISTS (SELECT 1 FROM {hashed} WHERE email_hash = ANY(%s))) AS yes), "
        f"inserted AS (INSERT INTO {quote(TrackingEvent._meta.db_table)} ({columns}) VALUES ({values}) "
        f"ON CONFLICT ({conflict}) DO NOTHING RETURNING {pk} AS id, {event_message} AS message_id), "
        f"advanced AS (UPDATE {_message_table()} SET {assignments} "
        f"WHERE {condition} AND {message_id} = (SELECT message_id FROM inserted) RETURNING 1) "
        "SELECT id, message_id FROM inserted"
    )


def _message_table() -> str:
    connection = connections[router.db_for_write(Message)]
    return connection.ops.quote_name(Message._meta.db_table)


def _message_col(name: str) -> str:
    connection = connections[router.db_for_write(Message)]
    field = Message._meta.get_field(name)
    assert isinstance(field, Field)
    return connection.ops.quote_name(str(field.column))


def _marks(values: tuple[str, ...]) -> str:
    return ", ".join(["%s"] * len(values))


def _soft_bounce_check(*, recipient: str, now: datetime) -> str | None:
    """SOFT_BOUNCES once the address has soft-bounced SOFT_BOUNCE_LIMIT times within the
    last SOFT_BOUNCE_WINDOW_DAYS (counted from the stored events, this one included)."""
    if not recipient:
        return None
    options = settings.MAILAUTO
    connection = connections[router.db_for_write(TrackingEvent)]
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", [SOFT_BOUNCE_LOCK_NAMESPACE, recipient]
            )
    # (SQLite, for `make run`, serialises writers on its database lock instead.)
    since = now - timedelta(days=options["SOFT_BOUNCE_WINDOW_DAYS"])
    if soft_bounce_count(email=recipient, since=since) >= options["SOFT_BOUNCE_LIMIT"]:
        return Reason.SOFT_BOUNCES
    return None


def _suppression_detail(tracking_event: TrackingEvent) -> str:
    detail = f"{tracking_event.event_type} event {tracking_event.esp_event_id}"
    if tracking_event.bounce_kind:
        detail = f"{tracking_event.bounce_kind} {detail}"
    if tracking_event.description:
        detail = f"{detail}: {tracking_event.description}"
    return detail[:1000]
