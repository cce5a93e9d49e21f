"""Event processing: claim outbox events, match automations, create Message rows.

Claims use SELECT … FOR UPDATE SKIP LOCKED (Postgres) so parallel workers take disjoint
batches; SQLite ignores FOR UPDATE but runs IMMEDIATE transactions, which serialise
claims on the database write lock instead. Either way a claim is a lease: a worker that
dies leaves its events to be reclaimed when `locked_until` passes, and the unique
Message.idempotency_key makes processing an event twice harmless.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from campaigns.models import Automation, Contact, Message, OutboxEvent, TemplateVersion
from campaigns.rules import RuleError, evaluate
from campaigns.selectors import template_version_for
from mailauto.lib.backoff import retry_delay
from suppression.selectors import send_decision

logger = logging.getLogger(__name__)

MAX_ERROR_HISTORY = 20


@dataclass
class BatchResult:
    claimed: int = 0
    processed: int = 0
    failed: int = 0
    messages: int = 0
    message_ids: list[int] = field(default_factory=list)


def _options() -> dict:
    return settings.MAILAUTO


def claimable_events_q(now) -> Q:  # type: ignore[no-untyped-def]
    """Events a worker may take now: due and unclaimed, or claimed by a worker whose
    lease ran out (it died or hung; its work is redone idempotently)."""
    return Q(status__in=[OutboxEvent.Status.PENDING, OutboxEvent.Status.RETRYING], available_at__lte=now) | Q(
        status=OutboxEvent.Status.PROCESSING, locked_until__lt=now
    )


def events_claim(*, limit: int) -> list[OutboxEvent]:
    """Lease up to `limit` due events to this worker and return them."""
    now = timezone.now()
    lease = now + timedelta(seconds=_options()["EVENT_LEASE_SECONDS"])
    with transaction.atomic():
        ids = list(
            OutboxEvent.objects.filter(claimable_events_q(now))
            .order_by("available_at", "id")
            .select_for_update(skip_locked=True)
            .values_list("id", flat=True)[:limit]
        )
        if not ids:
            return []
        # Conditional UPDATE: re-checks the claim condition, so on a database without
        # row locks a row claimed by someone else in between is not taken twice.
        OutboxEvent.objects.filter(claimable_events_q(now), id__in=ids).update(
            status=OutboxEvent.Status.PROCESSING, locked_until=lease, attempts=F("attempts") + 1
        )
        return list(
            OutboxEvent.objects.filter(id__in=ids, status=OutboxEvent.Status.PROCESSING, locked_until=lease)
            .select_related("event_type")
            .order_by("id")
        )


def events_process_batch(*, limit: int | None = None) -> BatchResult:
    """Claim one batch and process each event in its own transaction."""
    events = events_claim(limit=limit or _options()["EVENT_BATCH_SIZE"])
    result = BatchResult(claimed=len(events))
    automations = _automations_by_trigger({event.event_type_id for event in events})
    for event in events:
        try:
            with transaction.atomic():
                created = event_process(event=event, automations=automations.get(event.event_type_id, []))
        except Exception as err:  # one bad event must not stop the batch
            logger.exception("event processing failed", extra={"event_id": event.event_id})
            event_fail(event=event, error=f"{type(err).__name__}: {err}")
            result.failed += 1
        else:
            result.processed += 1
            result.messages += len(created)
            result.message_ids.extend(created)
    if result.messages:
        from campaigns.delivery import nudge_send_workers

        nudge_send_workers()
    return result


def _automations_by_trigger(event_type_ids: set[int]) -> dict[int, list[Automation]]:
    by_trigger: dict[int, list[Automation]] = {}
    if not event_type_ids:
        return by_trigger
    for automation in (
        Automation.objects.filter(trigger_id__in=event_type_ids, active=True)
        .select_related("template", "pinned_version")
        .order_by("id")
    ):
        by_trigger.setdefault(automation.trigger_id, []).append(automation)
    return by_trigger


def event_process(*, event: OutboxEvent, automations: list[Automation]) -> list[int]:
    """Decide what one event causes; create its Messages; mark it processed.

    Runs inside the caller's transaction. Returns the ids of the Messages created.
    """
    now = timezone.now()
    outcome: list[str] = []
    messages: list[Message] = []
    contact = Contact.objects.filter(user_id=event.user_id).first() if automations else None

    if not automations:
        outcome.append("no active automation for this event type")
    elif contact is None:
        outcome.append(f"no contact with user_id {event.user_id!r} (identify() it first)")
    else:
        data = {
            "payload": event.payload,
            "contact": contact.as_context(),
            "event": {
                "type": event.event_type.name,
                "source": event.source,
                "occurred_at": event.occurred_at.isoformat(),
                "event_id": event.event_id,
            },
        }
        versions: dict[int, TemplateVersion | None] = {}
        for automation in automations:
            try:
                matched = evaluate(automation.conditions, data)
            except RuleError as err:
                outcome.append(f"{automation.name}: invalid rule ({err})")
                continue
            if not matched:
                outcome.append(f"{automation.name}: conditions not met")
                continue
            if automation.pk not in versions:
                versions[automation.pk] = template_version_for(automation)
            version = versions[automation.pk]
            if version is None:
                outcome.append(
                    f"{automation.name}: template {automation.template.name!r} has no published version"
                )
                continue
            decision = send_decision(
                email=contact.email, purpose=automation.purpose, transactional=automation.is_transactional
            )
            messages.append(
                Message(
                    idempotency_key=f"{event.event_id}:{automation.pk}",
                    event=event,
                    automation=automation,
                    contact=contact,
                    to_email=contact.email,
                    template_version=version,
                    purpose=automation.purpose,
                    transactional=automation.is_transactional,
                    status=Message.Status.QUEUED if decision.allowed else Message.Status.SUPPRESSED,
                    status_reason=decision.reason,
                    send_after=max(now, event.occurred_at + automation.delay),
                )
            )
            outcome.append(f"{automation.name}: {'queued' if decision.allowed else decision.reason}")

    created_ids: list[int] = []
    if messages:
        # ignore_conflicts: if this event was processed before (a worker died after
        # commit but before… nothing else; or a lease expired), the unique idempotency
        # key keeps it at one Message per (event, automation).
        Message.objects.bulk_create(messages, ignore_conflicts=True)
        created_ids = list(
            Message.objects.filter(
                idempotency_key__in=[m.idempotency_key for m in messages], status=Message.Status.QUEUED
            ).values_list("id", flat=True)
        )

    event.status = OutboxEvent.Status.PROCESSED
    event.processed_at = now
    event.locked_until = None
    event.result = "; ".join(outcome)[:255]
    event.save(update_fields=["status", "processed_at", "locked_until", "result"])
    return created_ids


def event_fail(*, event: OutboxEvent, error: str) -> None:
    """Record a processing failure: retry later with backoff, or dead after N attempts."""
    now = timezone.now()
    options = _options()
    # attempts counts claims (incremented when the event was claimed), so an event
    # whose worker keeps dying also reaches the limit instead of looping forever.
    attempts = event.attempts
    history = [*event.error_history, {"at": now.isoformat(), "attempt": attempts, "error": error[:2000]}]
    dead = attempts >= options["EVENT_MAX_ATTEMPTS"]
    OutboxEvent.objects.filter(pk=event.pk).update(
        status=OutboxEvent.Status.DEAD if dead else OutboxEvent.Status.RETRYING,
        attempts=attempts,
        available_at=now
        + timedelta(
            seconds=retry_delay(
                attempt=attempts,
                base=options["RETRY_BACKOFF_BASE_SECONDS"],
                cap=options["RETRY_BACKOFF_MAX_SECONDS"],
            )
        ),
        locked_until=None,
        last_error=error[:2000],
        error_history=history[-MAX_ERROR_HISTORY:],
        result="dead: retries exhausted" if dead else f"failed (attempt {attempts}), will retry",
    )


@transaction.atomic
def events_replay(*, event_ids: list[int]) -> int:
    """Put dead or failed events back in the queue. Safe: messages are idempotent."""
    return OutboxEvent.objects.filter(
        id__in=event_ids, status__in=[OutboxEvent.Status.DEAD, OutboxEvent.Status.RETRYING]
    ).update(status=OutboxEvent.Status.PENDING, attempts=0, available_at=timezone.now(), locked_until=None)
