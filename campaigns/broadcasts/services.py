"""The state changes a marketer makes to a broadcast: create, schedule, send now, pause,
resume, cancel. Each is one transaction; nudges to the workers go out after commit."""

from __future__ import annotations

import logging
from datetime import datetime

from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Max, Q
from django.utils import timezone

from campaigns.broadcasts.selectors import template_event_fields
from campaigns.models import Broadcast, Contact, EmailTemplate, Message
from campaigns.rendering import TemplateRejected
from campaigns.rules import AudienceError, audience_validate
from mailauto.lib.nudge import nudge

logger = logging.getLogger(__name__)

CANCELLABLE = (
    Broadcast.Status.DRAFT,
    Broadcast.Status.SCHEDULED,
    Broadcast.Status.SENDING,
    Broadcast.Status.PAUSED,
)


def _refuse(broadcast: Broadcast, action: str, allowed: tuple[str, ...]) -> ValidationError:
    states = " or ".join(allowed)
    return ValidationError(
        f"{broadcast.name!r} is {broadcast.status}: only a {states} broadcast can be {action}."
    )


def start_errors(broadcast: Broadcast) -> list[str]:
    """Why the broadcast cannot start now (empty: it can): a bad audience, no published
    version, or a version that uses event data, which a broadcast does not have (those
    fields would render empty in every recipient's email)."""
    errors = []
    try:
        audience_validate(broadcast.audience)
    except AudienceError as err:
        errors.append(f"Invalid audience: {err}")
    template = broadcast.template
    version = template.latest_published()
    if version is None:
        errors.append(f"Template {template.name!r} has no published version; publish one before sending.")
        return errors
    try:
        event_fields = template_event_fields(version)
    except TemplateRejected as err:
        errors.append(f"Template {template.name!r} version {version.number} cannot be rendered: {err}")
        return errors
    if event_fields:
        errors.append(
            f"Template {template.name!r} version {version.number} uses {', '.join(event_fields)}: a "
            "broadcast is not sent because of an event, so these would be empty in every email. Use "
            "contact fields (contact.<attribute>) instead."
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


@transaction.atomic
def broadcast_schedule(*, broadcast: Broadcast, at: datetime, actor: str) -> Broadcast:
    """Schedule (or reschedule) a draft to start at `at`. Refused without a published
    version or with an invalid audience, so a schedule cannot fail later for those."""
    if timezone.is_naive(at):
        raise ValidationError("The scheduled time has no time zone; give it with one (e.g. in UTC).")
    current = _locked(broadcast)
    if current.status not in Broadcast.EDITABLE:
        raise _refuse(current, "scheduled", Broadcast.EDITABLE)
    now = timezone.now()
    if at <= now:
        raise ValidationError("The scheduled time is in the past; pick a later time or use Send now.")
    errors = start_errors(current)
    if errors:
        raise ValidationError(errors)
    current.status = Broadcast.Status.SCHEDULED
    current.scheduled_at = at
    current.start_error = ""
    current.updated_at = now
    current.save(update_fields=["status", "scheduled_at", "start_error", "updated_at"])
    logger.info("broadcast scheduled", extra={"broadcast_id": current.pk, "actor": actor})
    broadcast.refresh_from_db()
    return broadcast


@transaction.atomic
def broadcast_send_now(*, broadcast: Broadcast, actor: str) -> Broadcast:
    """Start sending a draft or scheduled broadcast now."""
    current = _locked(broadcast)
    if current.status not in Broadcast.EDITABLE:
        raise _refuse(current, "sent", Broadcast.EDITABLE)
    broadcast_start(broadcast=current, now=timezone.now())
    logger.info("broadcast started", extra={"broadcast_id": current.pk, "actor": actor})
    broadcast.refresh_from_db()
    return broadcast


def broadcast_start(*, broadcast: Broadcast, now: datetime) -> None:
    """Pin the latest published version and the audience's id range; SENDING. The
    caller holds the row lock (send now, or the sweeper for a due schedule)."""
    errors = start_errors(broadcast)
    if errors:
        raise ValidationError(errors)
    broadcast.template_version = broadcast.template.latest_published()
    broadcast.status = Broadcast.Status.SENDING
    broadcast.started_at = now
    broadcast.scheduled_at = broadcast.scheduled_at or now
    broadcast.contact_id_limit = Contact.objects.aggregate(highest=Max("id"))["highest"] or 0
    broadcast.cursor = 0
    # Nothing said before the start applies any more: a scheduler's refusal (or a
    # pause left on a draft by older code) would show as the reason of a broadcast
    # that is sending fine.
    broadcast.start_error = ""
    broadcast.paused_at = None
    broadcast.paused_by = ""
    broadcast.paused_reason = ""
    broadcast.updated_at = now
    broadcast.save(
        update_fields=[
            "template_version",
            "status",
            "started_at",
            "scheduled_at",
            "contact_id_limit",
            "cursor",
            "start_error",
            "paused_at",
            "paused_by",
            "paused_reason",
            "updated_at",
        ]
    )
    nudge_broadcast_workers()


@transaction.atomic
def broadcast_pause(*, broadcast: Broadcast, actor: str, reason: str) -> Broadcast:
    """Stop a sending broadcast's mail: its queued messages wait until it is resumed,
    and a batch a worker claimed before the pause goes back to the queue at its hand-off
    (a request already on its way to the ESP still completes)."""
    if not reason.strip():
        raise ValidationError("A pause needs a reason.")
    if not broadcast_pause_if_sending(broadcast_id=broadcast.pk, reason=reason, by=actor):
        current = Broadcast.objects.get(pk=broadcast.pk)
        raise _refuse(current, "paused", (Broadcast.Status.SENDING,))
    broadcast.refresh_from_db()
    return broadcast


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
    materialisation continues where it stopped. From now on the reputation guard judges
    it on the mail it sends after this moment (resumed_at), not on what paused it."""
    now = timezone.now()
    resumed = Broadcast.objects.filter(pk=broadcast.pk, status=Broadcast.Status.PAUSED).update(
        status=Broadcast.Status.SENDING,
        paused_at=None,
        paused_by="",
        paused_reason="",
        resumed_at=now,
        updated_at=now,
    )
    if not resumed:
        raise _refuse(Broadcast.objects.get(pk=broadcast.pk), "resumed", (Broadcast.Status.PAUSED,))
    logger.info("broadcast resumed", extra={"broadcast_id": broadcast.pk, "actor": actor})
    nudge_broadcast_workers()
    from campaigns.delivery import nudge_send_workers

    nudge_send_workers()
    broadcast.refresh_from_db()
    return broadcast


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
    count = cancel_messages(Q(broadcast_id=broadcast.pk), now=now)
    logger.info(
        "broadcast cancelled", extra={"broadcast_id": broadcast.pk, "actor": actor, "messages": count}
    )
    broadcast.refresh_from_db()
    return count


def cancel_messages(which: Q, *, now: datetime) -> int:
    """Make `which` messages of cancelled broadcasts CANCELLED: QUEUED ones, and
    CLAIMED ones whose worker died before the hand-off (nothing reclaims those now).

    A message claimed by a live worker is left to it: its hand-off refuses a cancelled
    broadcast's message and puts it back in the queue, where the sweeper cancels it."""
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
