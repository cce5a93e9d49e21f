"""Reads about broadcasts: who is in an audience and who of them gets a message (the
reads that decide who gets mail), the admin's preview, message counts by status, and
what a template needs that a broadcast cannot give."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.db.models import Count, Q, QuerySet
from django.db.models.functions import Lower

from campaigns.models import Broadcast, Contact, Message, TemplateVersion
from campaigns.rendering import validate_template
from campaigns.rules import audience_validate, evaluate
from suppression.residency import residency_decision
from suppression.services import normalize_email

# The admin previews a draft's audience on its change page: past this many contacts
# the count is a lower bound, so that a page view never reads the whole contact table.
PREVIEW_SCAN_LIMIT = 10_000
# Template data a broadcast does not have: it is sent because of no event.
NO_EVENT_ROOTS = ("payload", "event")


def audience_candidates() -> QuerySet[Contact]:
    """Contacts a broadcast may consider at all: not erased, with an address."""
    return Contact.objects.filter(erased_at__isnull=True).exclude(email="")


def audience_matches(audience: object, contact: Contact) -> bool:
    """Whether a contact is in the audience. Rules see {"contact": {...}} only: the
    contact's attributes with email and user_id (Contact.as_context)."""
    return evaluate(audience, {"contact": contact.as_context()})


def broadcast_new_recipients(*, broadcast: Broadcast, matched: list[Contact]) -> list[Contact]:
    """The matched contacts that get a message: region allowed, and one per mailbox.

    Addresses are compared lower-cased, against this batch and every earlier batch of
    the broadcast; the unique index message_broadcast_address (the same lower-cased
    address and broadcast) is the database's guarantee behind this read."""
    allowed = [c for c in matched if residency_decision(contact=c)[0]]
    if not allowed:
        return []
    addresses = {normalize_email(c.email) for c in allowed}
    seen = set(
        Message.objects.filter(broadcast=broadcast)
        .annotate(address=Lower("to_email"))
        .filter(address__in=addresses)
        .values_list("address", flat=True)
    )
    recipients = []
    for contact in allowed:
        address = normalize_email(contact.email)
        if address not in seen:
            seen.add(address)
            recipients.append(contact)
    return recipients


@dataclass(frozen=True)
class AudiencePreview:
    matched: int
    scanned: int
    complete: bool  # False: only the first `scanned` contacts were checked


def audience_preview(*, audience: object, scan_limit: int = PREVIEW_SCAN_LIMIT) -> AudiencePreview:
    """How many contacts the audience rule selects now (before region and duplicate
    address checks). The rule is interpreted in Python, exactly as materialisation does;
    past `scan_limit` contacts the count is a lower bound."""
    audience_validate(audience)
    candidates = audience_candidates()
    if not audience:
        total = candidates.count()
        return AudiencePreview(matched=total, scanned=total, complete=True)
    matched = scanned = 0
    rows = candidates.order_by("id").only("id", "user_id", "email", "attributes")[: scan_limit + 1]
    for contact in rows.iterator(chunk_size=2000):
        if scanned == scan_limit:
            return AudiencePreview(matched=matched, scanned=scanned, complete=False)
        scanned += 1
        matched += audience_matches(audience, contact)
    return AudiencePreview(matched=matched, scanned=scanned, complete=True)


def broadcast_message_counts(*, broadcast_ids: list[int]) -> dict[int, dict[str, int]]:
    """Messages by status for each broadcast, in one GROUP BY."""
    counts: dict[int, dict[str, int]] = {pk: {} for pk in broadcast_ids}
    rows = (
        Message.objects.filter(broadcast_id__in=broadcast_ids)
        .order_by()
        .values_list("broadcast_id", "status")
        .annotate(n=Count("id"))
    )
    for broadcast_id, status, n in rows:
        counts[broadcast_id][status] = n
    return counts


def template_event_fields(version: TemplateVersion) -> list[str]:
    """The payload./event. data a version uses, sorted: it renders empty in a broadcast.
    Raises TemplateRejected for a version that no longer compiles."""
    paths = validate_template(subject=version.subject, html=version.html, text=version.text)
    return sorted(path for path in paths if path.partition(".")[0] in NO_EVENT_ROOTS)


def broadcasts_waiting(*, now: datetime) -> bool:
    """Whether the sweeper has work: a scheduled broadcast whose time has come, or a
    sending one whose audience is not yet all messages."""
    return Broadcast.objects.filter(
        Q(status=Broadcast.Status.SCHEDULED, scheduled_at__lte=now)
        | Q(status=Broadcast.Status.SENDING, audience_done_at__isnull=True)
    ).exists()
