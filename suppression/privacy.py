"""GDPR export (Art. 15 access, Art. 20 portability) and erasure (Art. 17), the keyed
email hash that lets an erased address stay suppressed, and the privacy audit log.

Erasure anonymises in place rather than deleting rows: message and event rows keep
their statuses, times and counts (delivery statistics, the reputation guard) but lose
everything that identifies the person. What is kept is the minimum needed to honour the
erasure itself and to prove past consent (Art. 7(1), Art. 17(3)(b)/(e)): consent rows
without IP, user agent or evidence, and a keyed HMAC of the address so that it is never
emailed again.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.apps import apps
from django.conf import settings
from django.db import models, transaction
from django.db.models import Q, TextField
from django.db.models.functions import Cast, Lower
from django.utils import timezone
from django.utils.crypto import salted_hmac

from campaigns.models import Contact, Message, OutboxEvent
from suppression.cache import mirror_record_added
from suppression.models import Suppression, SuppressionLogEntry
from suppression.models.consent import AuditLogEntry, ConsentRecord, HashedSuppression
from suppression.services import normalize_email

if TYPE_CHECKING:
    from collections.abc import Iterable

logger = logging.getLogger(__name__)

EXPORT_FORMAT = "mailauto.contact-export/1"
EMAIL_HASH_SALT = "mailauto.suppression.email-hash"
USER_ID_HASH_SALT = "mailauto.suppression.user-id-hash"
ERASED_TEXT = "[erased]"
# The status reason of a message stopped because its address was erased (the same words
# as suppression.selectors.send_decision's answer for an erased address).
ERASED_ADDRESS_REASON = "suppressed: erased (GDPR Art. 17)"


# --- keyed hashes ----------------------------------------------------------------------


def _keys() -> list[str]:
    # SECRET_KEY first, then SECRET_KEY_FALLBACKS: a rotated key must not make erased
    # addresses emailable again. New hashes always use the current key.
    return [settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", [])]


def email_hash(email: str, *, secret: str | None = None) -> str:
    """HMAC-SHA256 of the normalised address, keyed from SECRET_KEY: without the key a
    hash cannot be reversed by hashing a list of known addresses."""
    return salted_hmac(
        EMAIL_HASH_SALT, normalize_email(email), secret=secret or settings.SECRET_KEY, algorithm="sha256"
    ).hexdigest()


def email_hashes(email: str) -> list[str]:
    """The address's hash under the current key and under every fallback key: what a
    HashedSuppression row may hold for it (the send path's hand-off matches on these)."""
    return [email_hash(email, secret=key) for key in _keys()]


def pseudonymous_user_id(user_id: str) -> str:
    """What an erased contact's user_id becomes (and its events' user_id)."""
    digest = salted_hmac(USER_ID_HASH_SALT, user_id, algorithm="sha256").hexdigest()
    return f"erased:{digest}"


ERASED_DOMAIN = "erased.invalid"


def erased_email(contact: Contact) -> str:
    # RFC 2606 reserves .invalid: nothing is ever delivered there, and the address
    # still passes Django's EmailValidator, so the admin can show and save the contact.
    return f"erased+{contact.pk}@{ERASED_DOMAIN}"


def is_hashed_suppressed(email: str) -> bool:
    """Is this address one that was erased and must never be emailed again? (The
    placeholder addresses erasure leaves behind count too: a replayed message to one
    could only bounce.)"""
    if not email:
        return False
    if normalize_email(email).endswith("@" + ERASED_DOMAIN):
        return True
    return HashedSuppression.objects.filter(email_hash__in=email_hashes(email)).exists()


def hashed_suppressed_among(emails: set[str]) -> set[str]:
    """The addresses of `emails` that are erased (one query for the whole set)."""
    normalized = {normalize_email(e) for e in emails if e}
    erased = {e for e in normalized if e.endswith("@" + ERASED_DOMAIN)}
    by_hash = {h: e for e in normalized - erased for h in email_hashes(e)}
    if by_hash:
        hits = HashedSuppression.objects.filter(email_hash__in=list(by_hash)).values_list(
            "email_hash", flat=True
        )
        erased |= {by_hash[h] for h in hits}
    return erased


@transaction.atomic
def hashed_suppression_lift(*, email: str, actor: str, reason: str) -> bool:
    """Make an erased address emailable again, e.g. when the person signs up anew and
    consents. Needs a reason; audited."""
    if not reason.strip() or not actor.strip():
        raise ValueError("Lifting a hashed suppression needs an actor and a reason.")
    hashes = email_hashes(email)
    deleted, _ = HashedSuppression.objects.filter(email_hash__in=hashes).delete()
    if deleted:
        AuditLogEntry.objects.create(
            action=AuditLogEntry.Action.SUPPRESSION_LIFTED,
            email_hash=hashes[0],
            actor=actor[:150],
            reason=_scrub(reason, [normalize_email(email)]),
        )
    return bool(deleted)


# --- selectors -------------------------------------------------------------------------


def contact_for_user_id(user_id: str) -> Contact | None:
    """The contact for an application user id, including one already erased (whose
    user_id was replaced by its pseudonym)."""
    return Contact.objects.filter(user_id__in=[user_id, pseudonymous_user_id(user_id)]).first()


def _messages_of(contact: Contact, email: str) -> models.QuerySet[Message]:
    # The contact's messages, plus messages to its address whose contact row is gone.
    # Messages to the same address through *another* contact belong to that contact.
    return Message.objects.filter(Q(contact=contact) | Q(contact__isnull=True, to_email__iexact=email))


def _tracking_event_model() -> type[models.Model] | None:
    # webhooks.TrackingEvent lands with the feedback-loop work; until then there is
    # nothing to export or erase there.
    try:
        return apps.get_model("webhooks", "TrackingEvent")
    except LookupError:
        return None


def _field_names(model: type[models.Model]) -> set[str]:
    return {f.name for f in model._meta.concrete_fields}


def _tracking_event_fields(model: type[models.Model]) -> tuple[list[str], list[str]]:
    """(JSON fields, text fields) of the tracking event model, excluding its keys."""
    keys = {"esp", "esp_event_id", "esp_message_id", "event_type", "bounce_kind", "reject_reason"}
    json_fields, text_fields = [], []
    for f in model._meta.concrete_fields:
        if f.name in keys or f.primary_key:
            continue
        if isinstance(f, models.JSONField):
            json_fields.append(f.name)
        elif isinstance(f, models.CharField | models.TextField):
            text_fields.append(f.name)
    return json_fields, text_fields


def _tracking_events_of(message_ids: list[int], email: str) -> models.QuerySet[Any] | None:
    model = _tracking_event_model()
    if model is None:
        return None
    names = _field_names(model)
    condition = Q(message_id__in=message_ids) if "message" in names else Q(pk__in=[])
    if "recipient" in names:
        condition |= Q(recipient__iexact=email)
    return model._default_manager.filter(condition)  # type: ignore[attr-defined]


# --- export ----------------------------------------------------------------------------


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _row(obj: models.Model, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """A model row as plain JSON values (datetimes as ISO 8601, FKs as ids)."""
    data: dict[str, Any] = {}
    for f in obj._meta.concrete_fields:
        if f.name in exclude:
            continue
        value = getattr(obj, f.attname)
        if isinstance(value, datetime):
            value = value.isoformat()
        elif value is not None and not isinstance(value, str | int | float | bool | dict | list):
            value = str(value)
        data[f.attname if f.is_relation else f.name] = value
    return data


@transaction.atomic
def contact_export(*, contact: Contact, actor: str = "system", reason: str = "") -> dict[str, Any]:
    """Everything we hold about one contact, as JSON-serialisable data (GDPR Art. 15, and
    Art. 20's "structured, commonly used and machine-readable format"). Audited."""
    email = normalize_email(contact.email)
    messages = list(_messages_of(contact, email).select_related("automation").order_by("id"))
    message_ids = [m.pk for m in messages]
    tracking = _tracking_events_of(message_ids, email)
    data: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "exported_at": timezone.now().isoformat(),
        "contact": {
            "id": contact.pk,
            "user_id": contact.user_id,
            "email": contact.email,
            "attributes": contact.attributes,
            "region": contact.region,
            "do_not_sell": contact.do_not_sell,
            "erased_at": _iso(contact.erased_at),
            "created_at": _iso(contact.created_at),
            "updated_at": _iso(contact.updated_at),
        },
        "consents": [
            {
                "purpose": r.purpose,
                "action": r.action,
                "occurred_at": _iso(r.occurred_at),
                "source": r.source,
                "ip_address": r.ip_address,
                "user_agent": r.user_agent,
                "notice": None
                if r.notice is None
                else {"name": r.notice.name, "version": r.notice.version, "text": r.notice.text},
                "evidence": r.evidence,
            }
            for r in ConsentRecord.objects.filter(contact=contact).select_related("notice").order_by("id")
        ],
        "events": [
            {
                "event_id": e.event_id,
                "event_type": e.event_type.name,
                "payload": e.payload,
                "source": e.source,
                "occurred_at": _iso(e.occurred_at),
                "status": e.status,
                "result": e.result,
            }
            for e in OutboxEvent.objects.filter(user_id=contact.user_id)
            .select_related("event_type")
            .order_by("id")
        ],
        "messages": [
            {
                "id": m.pk,
                "automation": m.automation.name if m.automation else None,
                "to_email": m.to_email,
                "subject": m.subject,
                "purpose": m.purpose,
                "transactional": m.transactional,
                "status": m.status,
                "status_reason": m.status_reason,
                "esp_message_id": m.esp_message_id,
                "created_at": _iso(m.created_at),
                "sent_at": _iso(m.sent_at),
            }
            for m in messages
        ],
        "tracking_events": [] if tracking is None else [_row(t) for t in tracking.order_by("pk")],
        "suppressions": [
            {"topic": s.topic, "reason": s.reason, "source": s.source, "created_at": _iso(s.created_at)}
            for s in Suppression.objects.filter(email=email).order_by("id")
        ],
        "erased_address_suppressed": is_hashed_suppressed(email),
    }
    AuditLogEntry.objects.create(
        action=AuditLogEntry.Action.EXPORT,
        contact_pk=contact.pk,
        email_hash=email_hash(email),
        actor=actor[:150],
        reason=reason,
        detail={
            "consents": len(data["consents"]),
            "events": len(data["events"]),
            "messages": len(data["messages"]),
            "tracking_events": len(data["tracking_events"]),
            "tracking_events_available": tracking is not None,
        },
    )
    return data


# --- erasure ---------------------------------------------------------------------------


@dataclass
class ErasureResult:
    contact_id: int
    email_hash: str
    messages: int = 0
    messages_stopped: int = 0
    # Not yet handed off, to the same address through another contact: stopped too (the
    # address is suppressed for good, whoever it was queued for).
    messages_stopped_other_contacts: int = 0
    messages_in_flight: int = 0
    events: int = 0
    events_mentioning: int = 0
    consent_records: int = 0
    suppressions: int = 0
    suppression_log_entries: int = 0
    tracking_events: int | None = None
    admin_log_entries: int = 0
    other_contacts_with_address: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _scrub(value: Any, needles: list[str], replacement: str = ERASED_TEXT) -> Any:
    """`value` with every occurrence of each needle (case-insensitive) replaced, through
    nested dicts and lists."""
    needles = [n for n in needles if n]
    if not needles:
        return value
    if isinstance(value, str):
        pattern = re.compile("|".join(re.escape(n) for n in needles), re.IGNORECASE)
        return pattern.sub(replacement, value)
    if isinstance(value, dict):
        return {_scrub(k, needles, replacement): _scrub(v, needles, replacement) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, needles, replacement) for v in value]
    return value


def _text_contains(field_name: str, needle: str) -> Q:
    """A filter for rows whose field, as text (JSON included), contains `needle`."""
    return Q(**{f"_as_text_{field_name}__icontains": needle})


def _mentioning(queryset: models.QuerySet[Any], fields: list[str], needle: str) -> models.QuerySet[Any]:
    annotated = queryset.annotate(**{f"_as_text_{name}": Cast(name, TextField()) for name in fields})
    condition = Q()
    for name in fields:
        condition |= _text_contains(name, needle)
    return annotated.filter(condition)


@transaction.atomic
def contact_erase(*, contact: Contact, actor: str, reason: str) -> ErasureResult:
    """Erase a contact's personal data everywhere we hold it (GDPR Art. 17). Atomic.

    - the contact: email → erased+<id>@erased.invalid, attributes emptied, user_id →
      its keyed pseudonym, erased_at set;
    - its outbox events: payload {}, user_id → the pseudonym, the address and user id
      scrubbed from results and errors; other events that mention the address have it
      scrubbed from their payload;
    - its messages: to_email replaced, subject blanked, the address scrubbed from
      reasons and errors; those not yet handed to the ESP are stopped (suppressed), and
      so are other contacts' messages to the same address not yet handed off;
    - its consent records: IP, user agent and evidence dropped (action, time, source,
      notice and email hash stay: proof of past consent);
    - suppressions of the address: replaced by one HashedSuppression; the suppression
      log keeps its rows with the address replaced;
    - tracking events (when installed): recipient replaced, raw ESP payload and metadata
      dropped, the address scrubbed from the texts (MTA responses quote it);
    - the admin's own history (django_admin_log): the address scrubbed, and the user id
      too in entries about this contact.

    A message a worker is handing to the ESP at this very moment may still go out and
    record its subject afterwards (`messages_in_flight` counts them); run the erasure
    again once it settles.
    """
    if not actor.strip() or not reason.strip():
        raise ValueError("An erasure needs an actor and a reason.")
    now = timezone.now()
    contact = Contact.objects.select_for_update().get(pk=contact.pk)
    email = normalize_email(contact.email)
    user_id = contact.user_id
    already_erased = contact.erased_at is not None
    pseudonym = user_id if already_erased else pseudonymous_user_id(user_id)
    placeholder = erased_email(contact)
    hashed = email_hash(email)
    needles = [email] if already_erased else [email, user_id]
    result = ErasureResult(contact_id=contact.pk, email_hash=hashed)

    # Messages: stop what has not left yet, then strip what identifies the person.
    messages = _messages_of(contact, email)
    message_ids = list(messages.values_list("id", flat=True))
    result.messages_stopped = Message.objects.filter(
        id__in=message_ids, status__in=[Message.Status.QUEUED, Message.Status.CLAIMED]
    ).update(status=Message.Status.SUPPRESSED, status_reason="contact erased (GDPR Art. 17)", updated_at=now)
    # The address is suppressed for good (HashedSuppression, below), so mail queued to it
    # for another contact sharing it stops too. A worker holding one CLAIMED loses its
    # hand-off (that UPDATE expects CLAIMED); one SENDING already left. They keep their
    # address: it is still the other contact's.
    result.messages_stopped_other_contacts = (
        Message.objects.alias(address=Lower("to_email"))
        .filter(address=email, status__in=[Message.Status.QUEUED, Message.Status.CLAIMED])
        .exclude(id__in=message_ids)
        .update(
            status=Message.Status.SUPPRESSED,
            status_reason=ERASED_ADDRESS_REASON,
            locked_until=None,
            updated_at=now,
        )
    )
    # An UNKNOWN message may have reached the ESP; it keeps that status, but is marked as
    # already resent so the grace-period resend never mails the placeholder address.
    result.messages_in_flight = Message.objects.filter(
        id__in=message_ids, status__in=[Message.Status.SENDING, Message.Status.UNKNOWN]
    ).update(resent_after_unknown=True)
    changed = []
    for message in Message.objects.filter(id__in=message_ids).only(
        "id", "idempotency_key", "to_email", "subject", "status_reason", "last_error", "error_history"
    ):
        message.to_email = placeholder
        message.subject = ""
        message.idempotency_key = _scrub(message.idempotency_key, [email])
        message.status_reason = _scrub(message.status_reason, needles)
        message.last_error = _scrub(message.last_error, needles)
        message.error_history = _scrub(message.error_history, needles)
        changed.append(message)
    Message.objects.bulk_update(
        changed,
        ["to_email", "subject", "idempotency_key", "status_reason", "last_error", "error_history"],
        batch_size=500,
    )
    result.messages = len(changed)

    # The contact's own events: payload gone, user id pseudonymised.
    events = []
    for event in OutboxEvent.objects.filter(user_id__in={user_id, pseudonym}).only(
        "id", "event_id", "source", "result", "last_error", "error_history"
    ):
        event.user_id = pseudonym
        event.payload = {}
        event.event_id = _scrub(event.event_id, needles)
        event.source = _scrub(event.source, needles)
        event.result = _scrub(event.result, needles)
        event.last_error = _scrub(event.last_error, needles)
        event.error_history = _scrub(event.error_history, needles)
        events.append(event)
    OutboxEvent.objects.bulk_update(
        events,
        ["user_id", "payload", "event_id", "source", "result", "last_error", "error_history"],
        batch_size=500,
    )
    result.events = len(events)
    # Other people's events that mention the address (an invitation, a referral): the
    # address goes, the event stays. This scans the outbox as text; erasure is rare.
    mentioning = []
    text_fields = ["payload", "event_id", "result", "last_error", "error_history"]
    for event in _mentioning(OutboxEvent.objects.all(), text_fields, email):
        for name in text_fields:
            setattr(event, name, _scrub(getattr(event, name), [email]))
        mentioning.append(event)
    OutboxEvent.objects.bulk_update(mentioning, text_fields, batch_size=500)
    result.events_mentioning = len(mentioning)

    # Consent: keep the proof, drop the device data.
    result.consent_records = ConsentRecord.objects.filter(contact=contact).scrub_personal_data()

    # Suppression: the plain address goes; a keyed hash keeps it suppressed for good.
    # (Not through suppression_remove: that would log the plain address again.)
    reasons = sorted(
        f"{Suppression.Reason(r).label}" + (f" ({t})" if t else "")
        for t, r in Suppression.objects.filter(email=email).values_list("topic", "reason")
    )
    result.suppressions, _ = Suppression.objects.filter(email=email).delete()
    result.suppression_log_entries = SuppressionLogEntry.objects.filter(email=email).update(email=placeholder)
    if not already_erased:  # a second run would only hash the placeholder
        erasure_reason = "erased (GDPR Art. 17)" + (f"; was: {', '.join(reasons)}" if reasons else "")
        HashedSuppression.objects.get_or_create(email_hash=hashed, defaults={"reason": erasure_reason[:255]})
        # The Redis mirror (if used) must not answer "not suppressed" for this address.
        transaction.on_commit(lambda: mirror_record_added(email=email, topic=""))

    # Tracking events (webhooks.TrackingEvent): the recipient is replaced, the ESP's raw
    # payloads and our metadata dropped, and the address scrubbed from the texts (an
    # MTA response often quotes it: "550 5.1.1 <ada@example.com>: user unknown").
    tracking = _tracking_events_of(message_ids, email)
    if tracking is not None:
        json_fields, text_fields = _tracking_event_fields(tracking.model)
        rows = []
        for row in tracking:
            for name in json_fields:
                setattr(row, name, {})
            for name in text_fields:
                setattr(row, name, _scrub(getattr(row, name), [email]))
            if "recipient" in text_fields:
                row.recipient = placeholder
            rows.append(row)
        if json_fields or text_fields:
            tracking.model._default_manager.bulk_update(rows, [*json_fields, *text_fields], batch_size=500)
        result.tracking_events = len(rows)

    # The admin's history: str(contact) is "<user_id> <<email>>", and suppression rows
    # show their address. Entries about this contact lose both; others the address.
    if apps.is_installed("django.contrib.admin"):
        from django.contrib.admin.models import LogEntry
        from django.contrib.contenttypes.models import ContentType

        contact_type = ContentType.objects.get_for_model(Contact)
        entries = []
        for entry in LogEntry.objects.filter(
            Q(content_type=contact_type, object_id=str(contact.pk))
            | Q(object_repr__icontains=email)
            | Q(change_message__icontains=email)
        ):
            own = entry.content_type_id == contact_type.pk and entry.object_id == str(contact.pk)
            entry.object_repr = _scrub(entry.object_repr, needles if own else [email])
            entry.change_message = _scrub(entry.change_message, needles if own else [email])
            entries.append(entry)
        LogEntry.objects.bulk_update(entries, ["object_repr", "change_message"])
        result.admin_log_entries = len(entries)

    result.other_contacts_with_address = list(
        Contact.objects.filter(email__iexact=email).exclude(pk=contact.pk).values_list("id", flat=True)
    )

    contact.email = placeholder
    contact.attributes = {}
    contact.user_id = pseudonym
    contact.erased_at = contact.erased_at or now
    contact.updated_at = now
    contact.save(update_fields=["email", "attributes", "user_id", "erased_at", "updated_at"])

    # Earlier audit entries whose free-text reason named the address.
    for audit in AuditLogEntry.objects.filter(reason__icontains=email):
        audit.reason = _scrub(audit.reason, [email])
        audit.save(update_fields=["reason"])
    AuditLogEntry.objects.create(
        action=AuditLogEntry.Action.ERASE,
        contact_pk=contact.pk,
        email_hash=hashed,
        actor=actor[:150],
        reason=_scrub(reason, needles),
        detail=result.as_dict(),
    )
    logger.info("contact erased", extra={"contact_id": contact.pk, "actor": actor})
    return result
