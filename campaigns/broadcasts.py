"""Broadcasts: the audience rule, the state changes a marketer makes (schedule, send now,
pause, resume, cancel), and materialisation, which turns a sending broadcast's audience
into Message rows that the delivery engine sends like any other.

Materialisation walks the contacts in id order, BATCH_SIZE per transaction, with the
cursor (the last contact id considered) committed in the same transaction as the batch's
messages. A worker killed mid-batch rolls back both, so the next sweep redoes exactly
that batch; the idempotency key f"broadcast:{id}:{contact_id}" (INSERT … ON CONFLICT DO
NOTHING) makes even a redone batch harmless. One worker materialises a broadcast at a
time: it holds the broadcast's row lock for the batch and others skip it (SKIP LOCKED).

The audience is the contacts that existed when sending started (ids up to
contact_id_limit), matched by the rule as they are when their batch is materialised.
Erased contacts and contacts without an address are never in it; a contact whose region
may not be processed (ALLOWED_REGIONS), or whose address already has this broadcast
(two contacts, one mailbox), gets no message. Suppression is recorded at once for
addresses already suppressed, and decided again at send time by the delivery engine,
with consent, as for every message.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Count, Exists, F, Max, OuterRef, Q, QuerySet
from django.utils import timezone

from campaigns.models import Broadcast, Contact, EmailTemplate, Message
from campaigns.rules import ROOT_LOCATION, RuleError, evaluate, validate_rule
from mailauto.lib.nudge import nudge
from suppression.residency import residency_decision
from suppression.selectors import DecisionRequest, send_decisions
from suppression.services import normalize_email

logger = logging.getLogger(__name__)

BATCH_SIZE = 1000  # contacts per materialisation transaction
# Broadcast mail goes after automations' (100) and transactional mail (10) when the
# send queue is long or a warm-up cap bites: a welcome email must not wait behind a
# million-recipient newsletter.
BROADCAST_PRIORITY = 200
# The sweeper keeps the admin's message counts of a broadcast fresh while it sends and
# for a week after (opens, clicks, bounces and complaints keep arriving), at most once a
# minute each and for a bounded number of broadcasts per sweep.
STATS_REFRESH_SECONDS = 60
STATS_TRAILING_DAYS = 7
STATS_PER_SWEEP = 20
AUDIENCE_LOCATION = "audience"


# --- the audience rule ---------------------------------------------------------------------


class AudienceError(ValueError):
    """The audience rule is not valid; `location` says where ("audience.and[1]")."""

    def __init__(self, location: str, problem: str) -> None:
        super().__init__(f"{location}: {problem}")
        self.location = location
        self.problem = problem


def audience_validate(audience: object) -> None:
    """Raise AudienceError naming the first defect: the rule language's own checks, and
    fields outside `contact.` (a broadcast has no event, so payload./event. fields would
    silently never match)."""
    try:
        validate_rule(audience)
    except RuleError as err:
        raise AudienceError(_audience_location(err.location), err.problem) from err
    for location, path in _fields_with_locations(audience, AUDIENCE_LOCATION):
        if not path.startswith("contact."):
            root = path.partition(".")[0]
            raise AudienceError(
                f"{location}.field",
                f"{path!r}: an audience can only use contact fields (contact.<attribute>, "
                f"contact.email, contact.user_id); a broadcast has no {root}",
            )


def _audience_location(location: str) -> str:
    return AUDIENCE_LOCATION + location.removeprefix(ROOT_LOCATION)


def _fields_with_locations(node: object, location: str) -> list[tuple[str, str]]:
    # Only called on a validated rule.
    if not isinstance(node, dict) or not node:
        return []
    for kind in ("and", "or"):
        if kind in node:
            return [
                found
                for index, child in enumerate(node[kind])
                for found in _fields_with_locations(child, f"{location}.{kind}[{index}]")
            ]
    if "not" in node:
        return _fields_with_locations(node["not"], f"{location}.not")
    return [(location, node["field"])]


def audience_matches(audience: object, contact: Contact) -> bool:
    """Whether a contact is in the audience. Rules see {"contact": {...}} only: the
    contact's attributes with email and user_id (Contact.as_context)."""
    return evaluate(audience, {"contact": contact.as_context()})


# --- selectors ---------------------------------------------------------------------------------


def audience_candidates() -> QuerySet[Contact]:
    """Contacts a broadcast may consider at all: not erased, with an address."""
    return Contact.objects.filter(erased_at__isnull=True).exclude(email="")


@dataclass(frozen=True)
class AudiencePreview:
    matched: int
    scanned: int
    complete: bool  # False: only the first `scanned` contacts were checked


def audience_preview(*, audience: object, scan_limit: int = 100_000) -> AudiencePreview:
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


# --- state changes -------------------------------------------------------------------------------


def _refuse(broadcast: Broadcast, action: str, allowed: tuple[str, ...]) -> ValidationError:
    states = " or ".join(allowed)
    return ValidationError(
        f"{broadcast.name!r} is {broadcast.status}: only a {states} broadcast can be {action}."
    )


def _start_errors(broadcast: Broadcast) -> list[str]:
    errors = []
    try:
        audience_validate(broadcast.audience)
    except AudienceError as err:
        errors.append(f"Invalid audience: {err}")
    if broadcast.template.latest_published() is None:
        errors.append(
            f"Template {broadcast.template.name!r} has no published version; publish one before sending."
        )
    return errors


@transaction.atomic
def broadcast_create(
    *,
    name: str,
    template: EmailTemplate,
    audience: object = None,
    purpose: str = "marketing",
    created_by: str = "",
) -> Broadcast:
    """A draft broadcast. Raises ValidationError (nothing written) for a bad audience."""
    broadcast = Broadcast(
        name=name,
        template=template,
        audience=audience if audience is not None else {},
        purpose=purpose,
        created_by=created_by[:150],
    )
    broadcast.full_clean()
    broadcast.save()
    return broadcast


def _locked(broadcast: Broadcast) -> Broadcast:
    return Broadcast.objects.select_for_update(of=("self",)).select_related("template").get(pk=broadcast.pk)


def _refresh(target: Broadcast, source: Broadcast) -> Broadcast:
    for f in source._meta.concrete_fields:
        setattr(target, f.attname, getattr(source, f.attname))
    return target


@transaction.atomic
def broadcast_schedule(*, broadcast: Broadcast, at: datetime, actor: str) -> Broadcast:
    """Schedule (or reschedule) a draft to start at `at`. Refused without a published
    version or with an invalid audience, so a schedule cannot fail later for those."""
    current = _locked(broadcast)
    if current.status not in Broadcast.EDITABLE:
        raise _refuse(current, "scheduled", Broadcast.EDITABLE)
    now = timezone.now()
    if at <= now:
        raise ValidationError("The scheduled time is in the past; pick a later time or use Send now.")
    errors = _start_errors(current)
    if errors:
        raise ValidationError(errors)
    current.status = Broadcast.Status.SCHEDULED
    current.scheduled_at = at
    current.updated_at = now
    current.save(update_fields=["status", "scheduled_at", "updated_at"])
    logger.info("broadcast scheduled", extra={"broadcast_id": current.pk, "actor": actor})
    return _refresh(broadcast, current)


@transaction.atomic
def broadcast_send_now(*, broadcast: Broadcast, actor: str) -> Broadcast:
    """Start sending a draft or scheduled broadcast now."""
    current = _locked(broadcast)
    if current.status not in Broadcast.EDITABLE:
        raise _refuse(current, "sent", Broadcast.EDITABLE)
    _start(current, now=timezone.now())
    logger.info("broadcast started", extra={"broadcast_id": current.pk, "actor": actor})
    return _refresh(broadcast, current)


def _start(broadcast: Broadcast, *, now: datetime) -> None:
    """Pin the latest published version and the audience's id range; SENDING. The
    caller holds the row lock."""
    errors = _start_errors(broadcast)
    if errors:
        raise ValidationError(errors)
    broadcast.template_version = broadcast.template.latest_published()
    broadcast.status = Broadcast.Status.SENDING
    broadcast.started_at = now
    broadcast.scheduled_at = broadcast.scheduled_at or now
    broadcast.contact_id_limit = Contact.objects.aggregate(highest=Max("id"))["highest"] or 0
    broadcast.cursor = 0
    broadcast.updated_at = now
    broadcast.save(
        update_fields=[
            "template_version",
            "status",
            "started_at",
            "scheduled_at",
            "contact_id_limit",
            "cursor",
            "updated_at",
        ]
    )
    nudge_broadcast_workers()


@transaction.atomic
def broadcast_pause(*, broadcast: Broadcast, actor: str, reason: str) -> Broadcast:
    """Stop a sending broadcast's mail: its queued messages wait until it is resumed
    (a batch a worker already claimed may still go out)."""
    if not reason.strip():
        raise ValidationError("A pause needs a reason.")
    if not broadcast_pause_if_sending(broadcast_id=broadcast.pk, reason=reason, by=actor):
        current = Broadcast.objects.get(pk=broadcast.pk)
        raise _refuse(current, "paused", (Broadcast.Status.SENDING,))
    return _refresh(broadcast, Broadcast.objects.get(pk=broadcast.pk))


def broadcast_pause_if_sending(
    *, broadcast_id: int, reason: str, by: str, now: datetime | None = None
) -> bool:
    """Conditional UPDATE sending → paused. A broadcast already paused (by a person or
    by a check running at the same moment) keeps its first reason. True if paused now."""
    now = now or timezone.now()
    return bool(
        Broadcast.objects.filter(pk=broadcast_id, status=Broadcast.Status.SENDING).update(
            status=Broadcast.Status.PAUSED,
            paused_at=now,
            paused_by=by[:150],
            paused_reason=reason.strip()[:255],
            updated_at=now,
        )
    )


@transaction.atomic
def broadcast_resume(*, broadcast: Broadcast, actor: str) -> Broadcast:
    """Resume a paused broadcast: its queued messages become claimable again and
    materialisation continues where it stopped."""
    now = timezone.now()
    resumed = Broadcast.objects.filter(pk=broadcast.pk, status=Broadcast.Status.PAUSED).update(
        status=Broadcast.Status.SENDING, paused_at=None, paused_by="", paused_reason="", updated_at=now
    )
    if not resumed:
        raise _refuse(Broadcast.objects.get(pk=broadcast.pk), "resumed", (Broadcast.Status.PAUSED,))
    logger.info("broadcast resumed", extra={"broadcast_id": broadcast.pk, "actor": actor})
    nudge_broadcast_workers()
    from campaigns.delivery import nudge_send_workers

    nudge_send_workers()
    return _refresh(broadcast, Broadcast.objects.get(pk=broadcast.pk))


CANCELLABLE = (
    Broadcast.Status.DRAFT,
    Broadcast.Status.SCHEDULED,
    Broadcast.Status.SENDING,
    Broadcast.Status.PAUSED,
)


@transaction.atomic
def broadcast_cancel(*, broadcast: Broadcast, actor: str, reason: str) -> int:
    """Cancel a broadcast for good; its messages not yet claimed become CANCELLED.
    Returns how many messages were cancelled."""
    if not reason.strip():
        raise ValidationError("A cancellation needs a reason.")
    now = timezone.now()
    cancelled = Broadcast.objects.filter(pk=broadcast.pk, status__in=CANCELLABLE).update(
        status=Broadcast.Status.CANCELLED,
        finished_at=now,
        cancelled_reason=f"{reason.strip()} ({actor})"[:255],
        updated_at=now,
    )
    if not cancelled:
        raise _refuse(Broadcast.objects.get(pk=broadcast.pk), "cancelled", CANCELLABLE)
    count = _cancel_messages(Q(broadcast_id=broadcast.pk), now=now)
    logger.info(
        "broadcast cancelled", extra={"broadcast_id": broadcast.pk, "actor": actor, "messages": count}
    )
    _refresh(broadcast, Broadcast.objects.get(pk=broadcast.pk))
    return count


def _cancel_messages(which: Q, *, now: datetime) -> int:
    # QUEUED, and CLAIMED whose worker died before the hand-off (a reclaim would send
    # it). A message claimed by a live worker is in its batch and may still go out; if
    # the worker puts it back in the queue instead, the sweeper cancels it then.
    return (
        Message.objects.filter(which)
        .filter(Q(status=Message.Status.QUEUED) | Q(status=Message.Status.CLAIMED, locked_until__lt=now))
        .update(
            status=Message.Status.CANCELLED,
            status_reason="broadcast cancelled",
            locked_until=None,
            updated_at=now,
        )
    )


def nudge_broadcast_workers() -> None:
    """Ask the housekeeping workers to materialise now, once this transaction commits."""

    def send_nudge() -> None:
        from campaigns.tasks import sweep_broadcasts

        nudge(sweep_broadcasts, kind="broadcasts")

    transaction.on_commit(send_nudge)


# --- materialisation ---------------------------------------------------------------------------


@dataclass
class MaterialiseBatch:
    considered: int = 0  # contacts read (not erased, with an address)
    matched: int = 0  # of which in the audience
    created: int = 0  # messages created
    done: bool = False  # the audience is exhausted


def broadcast_materialise_batch(*, broadcast_id: int, size: int = BATCH_SIZE) -> MaterialiseBatch | None:
    """Turn the next `size` contacts of a sending broadcast into messages, in one
    transaction. None when the broadcast is not sending, already materialised, or being
    materialised by another worker right now."""
    now = timezone.now()
    with transaction.atomic():
        broadcast = (
            Broadcast.objects.select_for_update(skip_locked=True, of=("self",))
            .select_related("template_version")
            .filter(pk=broadcast_id, status=Broadcast.Status.SENDING, audience_done_at__isnull=True)
            .first()
        )
        if broadcast is None:
            return None
        contacts = list(
            audience_candidates()
            .filter(id__gt=broadcast.cursor, id__lte=broadcast.contact_id_limit or 0)
            .order_by("id")
            .only("id", "user_id", "email", "attributes", "region")[:size]
        )
        batch = MaterialiseBatch(considered=len(contacts), done=len(contacts) < size)
        try:
            matched = [c for c in contacts if audience_matches(broadcast.audience, c)]
        except RuleError as err:  # only if the stored rule was corrupted after the start
            broadcast_pause_if_sending(
                broadcast_id=broadcast.pk, reason=f"invalid audience rule: {err}", by="materialiser", now=now
            )
            return None
        batch.matched = len(matched)
        recipients = _new_recipients(broadcast, matched)
        if recipients:
            decisions = send_decisions(
                [DecisionRequest(email=c.email, purpose=broadcast.purpose) for c in recipients]
            )
            messages = []
            for contact in recipients:
                decision = decisions[DecisionRequest(email=contact.email, purpose=broadcast.purpose)]
                messages.append(
                    Message(
                        idempotency_key=f"broadcast:{broadcast.pk}:{contact.pk}",
                        broadcast=broadcast,
                        contact=contact,
                        to_email=contact.email,
                        template_version=broadcast.template_version,
                        purpose=broadcast.purpose,
                        transactional=False,
                        priority=BROADCAST_PRIORITY,
                        status=Message.Status.QUEUED if decision.allowed else Message.Status.SUPPRESSED,
                        status_reason=decision.reason,
                        send_after=now,
                    )
                )
            # ON CONFLICT DO NOTHING: the unique idempotency key keeps one message per
            # (broadcast, contact) even if this range is ever materialised again.
            Message.objects.bulk_create(messages, ignore_conflicts=True, batch_size=BATCH_SIZE)
            batch.created = len(messages)
            if any(m.status == Message.Status.QUEUED for m in messages):
                from campaigns.delivery import nudge_send_workers

                nudge_send_workers()
        fields: dict[str, Any] = {
            "cursor": contacts[-1].pk if contacts else broadcast.contact_id_limit or 0,
            "audience_size": broadcast.audience_size + batch.matched,
            "recipients": broadcast.recipients + batch.created,
            "updated_at": now,
        }
        if batch.done:
            fields["audience_done_at"] = now
        Broadcast.objects.filter(pk=broadcast.pk).update(**fields)
    return batch


def _new_recipients(broadcast: Broadcast, matched: list[Contact]) -> list[Contact]:
    """The matched contacts that get a message: region allowed, and one per address
    (earlier batches included; exact or lower-case spelling)."""
    allowed = [c for c in matched if residency_decision(contact=c)[0]]
    if not allowed:
        return []
    spellings = {c.email for c in allowed} | {normalize_email(c.email) for c in allowed}
    seen = {
        normalize_email(email)
        for email in Message.objects.filter(broadcast=broadcast, to_email__in=spellings).values_list(
            "to_email", flat=True
        )
    }
    recipients = []
    for contact in allowed:
        address = normalize_email(contact.email)
        if address not in seen:
            seen.add(address)
            recipients.append(contact)
    return recipients


# --- the sweeper -------------------------------------------------------------------------------


@dataclass
class BroadcastSweep:
    started: list[int] = field(default_factory=list)
    contacts: int = 0
    messages: int = 0
    cancelled_messages: int = 0
    finished: int = 0
    more: bool = False  # the time budget ran out with audiences left to materialise


def broadcasts_sweep(*, budget_seconds: float = 20.0, batch_size: int = BATCH_SIZE) -> BroadcastSweep:
    """One pass of the broadcast housekeeping: start due scheduled broadcasts,
    materialise audiences (within the time budget), cancel messages of cancelled
    broadcasts that came back to the queue, mark finished broadcasts sent, refresh the
    admin's counts."""
    deadline = time.monotonic() + budget_seconds
    result = BroadcastSweep(started=broadcasts_start_due())
    pending = list(
        Broadcast.objects.filter(status=Broadcast.Status.SENDING, audience_done_at__isnull=True)
        .order_by("started_at", "id")
        .values_list("id", flat=True)
    )
    for broadcast_id in pending:
        while True:
            if time.monotonic() >= deadline:
                result.more = True
                break
            batch = broadcast_materialise_batch(broadcast_id=broadcast_id, size=batch_size)
            if batch is None:
                break
            result.contacts += batch.considered
            result.messages += batch.created
            if batch.done:
                break
        if result.more:
            break
    now = timezone.now()
    result.cancelled_messages = _cancel_messages(Q(broadcast__status=Broadcast.Status.CANCELLED), now=now)
    result.finished = broadcasts_finish(now=now)
    broadcasts_stats_refresh(now=now)
    return result


def broadcasts_start_due(*, now: datetime | None = None) -> list[int]:
    """Start every scheduled broadcast whose time has come; return their ids."""
    now = now or timezone.now()
    started = []
    due = Broadcast.objects.filter(status=Broadcast.Status.SCHEDULED, scheduled_at__lte=now)
    for broadcast_id in due.order_by("scheduled_at", "id").values_list("id", flat=True):
        with transaction.atomic():
            broadcast = (
                Broadcast.objects.select_for_update(skip_locked=True, of=("self",))
                .select_related("template")
                .filter(pk=broadcast_id, status=Broadcast.Status.SCHEDULED, scheduled_at__lte=now)
                .first()
            )
            if broadcast is None:
                continue
            try:
                _start(broadcast, now=now)
            except ValidationError as err:
                # Checked when scheduled; only an edit since then gets here. Back to
                # draft, saying why, rather than failing again on every sweep.
                reason = f"not started at its scheduled time: {'; '.join(err.messages)}"
                Broadcast.objects.filter(pk=broadcast.pk).update(
                    status=Broadcast.Status.DRAFT,
                    paused_by="scheduler",
                    paused_reason=reason[:255],
                    updated_at=now,
                )
                logger.warning("scheduled broadcast not started", extra={"broadcast_id": broadcast.pk})
                continue
            started.append(broadcast.pk)
    return started


def broadcasts_finish(*, now: datetime | None = None) -> int:
    """Sending broadcasts whose audience is materialised and whose messages are all
    final (none queued, claimed, being handed over or of unknown outcome) are sent."""
    now = now or timezone.now()
    in_progress = Message.objects.filter(broadcast=OuterRef("pk"), status__in=Message.IN_PROGRESS)
    done = Broadcast.objects.filter(status=Broadcast.Status.SENDING, audience_done_at__isnull=False).exclude(
        Exists(in_progress)
    )
    ids = list(done.values_list("id", flat=True))
    if not ids:
        return 0
    # The same conditions again: a broadcast paused or cancelled in between stays so.
    finished = done.filter(id__in=ids).update(status=Broadcast.Status.SENT, finished_at=now, updated_at=now)
    # Their counts as they end, whatever the refresh interval.
    for broadcast_id, counts in broadcast_message_counts(broadcast_ids=ids).items():
        Broadcast.objects.filter(pk=broadcast_id).update(stats=counts, stats_updated_at=now)
    return finished


def broadcasts_stats_refresh(*, now: datetime | None = None) -> int:
    """Refresh the stored message counts of active and recently finished broadcasts."""
    now = now or timezone.now()
    stale = Q(stats_updated_at__isnull=True) | Q(
        stats_updated_at__lt=now - timedelta(seconds=STATS_REFRESH_SECONDS)
    )
    recent = Q(status__in=[Broadcast.Status.SENDING, Broadcast.Status.PAUSED]) | Q(
        finished_at__gte=now - timedelta(days=STATS_TRAILING_DAYS), started_at__isnull=False
    )
    ids = list(
        Broadcast.objects.filter(stale, recent)
        .order_by(F("stats_updated_at").asc(nulls_first=True), "id")
        .values_list("id", flat=True)[:STATS_PER_SWEEP]
    )
    for broadcast_id, counts in broadcast_message_counts(broadcast_ids=ids).items():
        Broadcast.objects.filter(pk=broadcast_id).update(stats=counts, stats_updated_at=now)
    return len(ids)
