"""Event processing: claim outbox events, match automations, create Message rows.

Claims use SELECT … FOR UPDATE SKIP LOCKED (Postgres) so parallel workers take disjoint
batches; SQLite ignores FOR UPDATE but runs IMMEDIATE transactions, which serialise
claims on the database write lock instead. Either way a claim is a lease: a worker that
dies leaves its events to be reclaimed when `locked_until` passes, and the unique
Message.idempotency_key makes processing an event twice harmless.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection as db_connection
from django.db import models, transaction
from django.db.models import F, Q
from django.utils import timezone

from campaigns.models import Automation, Contact, Message, OutboxEvent, TemplateVersion
from campaigns.rules import RuleError, evaluate
from campaigns.selectors import template_version_for
from mailauto.lib.backoff import retry_delay
from suppression.consent import consent_decision
from suppression.residency import residency_decision
from suppression.selectors import DecisionRequest, SendDecision, send_decision, send_decisions

logger = logging.getLogger(__name__)

MAX_ERROR_HISTORY = 20


@dataclass
class BatchResult:
    claimed: int = 0
    processed: int = 0
    failed: int = 0
    messages: int = 0  # messages queued to send


def _options() -> dict:
    return settings.MAILAUTO


def claimable_events_q(now) -> Q:  # type: ignore[no-untyped-def]
    """Events a worker may take now: due and unclaimed, or claimed by a worker whose
    lease ran out (it died or hung; its work is redone idempotently) and that has not
    used up its attempts (see events_bury_poison)."""
    return Q(status__in=[OutboxEvent.Status.PENDING, OutboxEvent.Status.RETRYING], available_at__lte=now) | Q(
        status=OutboxEvent.Status.PROCESSING,
        locked_until__lt=now,
        attempts__lt=_options()["EVENT_MAX_ATTEMPTS"],
    )


def events_bury_poison() -> int:
    """Dead-letter events whose worker died holding them EVENT_MAX_ATTEMPTS times.

    An event that kills its worker (out of memory, a hard time limit) never reaches
    event_fail(); without this it would be reclaimed, and kill a worker, forever.
    """
    now = timezone.now()
    return OutboxEvent.objects.filter(
        status=OutboxEvent.Status.PROCESSING,
        locked_until__lt=now,
        attempts__gte=_options()["EVENT_MAX_ATTEMPTS"],
    ).update(
        status=OutboxEvent.Status.DEAD,
        locked_until=None,
        result="dead: its worker stopped while processing it, every attempt",
        last_error="worker lost (lease expired) on the last attempt",
    )


# Columns processing never reads (it writes them with UPDATEs): not loading them (the
# event type's schema is JSON decoded for every row that joins it) is about a third of a
# claim's CPU. Reading one later costs a query per event:
# test_a_batch_is_written_in_a_bounded_number_of_queries.
_NOT_READ_WHILE_PROCESSING = (
    *("available_at", "locked_until", "processed_at", "result", "last_error", "created_at"),
    *("event_type__schema", "event_type__description", "event_type__created_at"),
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
            .defer(*_NOT_READ_WHILE_PROCESSING)
            .order_by("id")
        )


def events_process_batch(*, limit: int | None = None) -> BatchResult:
    """Claim one batch and process it.

    Fast path: the whole batch is planned and written in one transaction (one INSERT of
    all its messages, one UPDATE of all its events). If anything in it fails, the batch
    is redone one event per transaction, so that one bad event fails alone.
    """
    events = events_claim(limit=limit or _options()["EVENT_BATCH_SIZE"])
    result = BatchResult(claimed=len(events))
    if not events:
        return result
    automations = _automations_by_trigger({event.event_type_id for event in events})
    contacts = {
        contact.user_id: contact
        for contact in Contact.objects.filter(user_id__in={event.user_id for event in events})
    }
    versions: dict[int, TemplateVersion | None] = {}
    # Every (address, purpose) this batch could send to, decided in two queries.
    decisions = send_decisions(
        [
            DecisionRequest(email=contact.email, purpose=a.purpose, transactional=a.is_transactional)
            for event in events
            if (contact := contacts.get(event.user_id)) is not None
            for a in automations.get(event.event_type_id, [])
        ]
    )
    try:
        with transaction.atomic():
            plans = [
                event_plan(
                    event=event,
                    automations=automations.get(event.event_type_id, []),
                    contact=contacts.get(event.user_id),
                    versions=versions,
                    decisions=decisions,
                )
                for event in events
            ]
            _write_plans(plans)
    except Exception:
        logger.warning("batch processing failed; processing its events one by one", exc_info=True)
        plans = []
        for event in events:
            try:
                with transaction.atomic():
                    plan = event_plan(
                        event=event,
                        automations=automations.get(event.event_type_id, []),
                        contact=contacts.get(event.user_id),
                        versions=versions,
                        decisions=decisions,
                    )
                    _write_plans([plan])
                plans.append(plan)
            except Exception as err:  # one bad event must not stop the batch
                # The outbox row id, not the caller's event_id (which an application may
                # build from personal data, e.g. "signup-<address>").
                logger.exception("event processing failed", extra={"outbox_event_id": event.pk})
                event_fail(event=event, error=f"{type(err).__name__}: {err}")
                result.failed += 1
    result.processed = len(plans)
    result.messages = sum(plan.queued for plan in plans)
    if result.messages:
        from campaigns.delivery import nudge_send_workers

        nudge_send_workers()
    return result


@dataclass
class EventPlan:
    """What one event causes: the messages to create and the words for its result."""

    event: OutboxEvent
    messages: list[Message]
    outcome: list[str]
    status: str = OutboxEvent.Status.PROCESSED

    @property
    def queued(self) -> int:
        return sum(1 for message in self.messages if message.status == Message.Status.QUEUED)


def _write_plans(plans: list[EventPlan]) -> None:
    now = timezone.now()
    messages = [message for plan in plans for message in plan.messages]
    if messages:
        _insert_messages(messages)
    # Events of a batch mostly end the same way ("Welcome: queued"): one UPDATE per
    # distinct outcome is far cheaper than bulk_update's CASE per row and field.
    by_outcome: dict[tuple[str, str], list[int]] = {}
    for plan in plans:
        plan.event.status = plan.status
        plan.event.processed_at = now
        plan.event.locked_until = None
        plan.event.result = "; ".join(plan.outcome)[:255]
        by_outcome.setdefault((plan.status, plan.event.result), []).append(plan.event.pk)
    for (status, result), ids in by_outcome.items():
        OutboxEvent.objects.filter(pk__in=ids).update(
            status=status, processed_at=now, locked_until=None, result=result
        )


def _insert_messages(messages: list[Message]) -> None:
    """INSERT a batch's messages, skipping those that exist already.

    Skipping (ON CONFLICT DO NOTHING, as bulk_create's ignore_conflicts): an event
    processed before (its lease expired while a slow worker still finished it) already
    has its messages; the unique idempotency key keeps it at one Message per (event,
    automation).

    On Postgres the rows go as one JSON document (INSERT … SELECT FROM
    json_populate_recordset): bulk_create binds ~25 parameters per row, and Django's
    SQL compiler and psycopg's quoting pay for each one, a third of processing an
    event. A batch holding a value that JSON would not carry unchanged (see
    _json_rows) is written with bulk_create, as it is on SQLite.
    """
    fields: list[Any] = [field for field in Message._meta.concrete_fields if not field.primary_key]
    for message in messages:
        message._prepare_related_fields_for_save(operation_name="bulk_create")  # type: ignore[attr-defined]
    rows = _json_rows(messages, fields) if db_connection.vendor == "postgresql" else None
    if rows is None:
        Message.objects.bulk_create(messages, ignore_conflicts=True, batch_size=1000)
        return
    quote = db_connection.ops.quote_name
    table = quote(str(Message._meta.db_table))
    columns = ", ".join(quote(field.column) for field in fields)
    # Only our own table and column names are interpolated.
    sql = (
        f"INSERT INTO {table} ({columns}) "  # noqa: S608
        f"SELECT {columns} FROM json_populate_recordset(NULL::{table}, %s) ON CONFLICT DO NOTHING"
    )
    with db_connection.cursor() as cursor:
        cursor.execute(sql, [json.dumps(rows)])
    for message in messages:  # as after bulk_create: saved, primary key unknown
        message._state.adding = False
        message._state.db = db_connection.alias


def _json_rows(messages: list[Message], fields: list[Any]) -> list[dict[str, Any]] | None:
    """Each message as {column: value}, the values bulk_create would write (each field's
    pre_save), or None when one of them is not a string, int, bool, None or aware
    datetime (ISO 8601 in the JSON) in a field of the matching type, or a list or dict
    in a JSON field: only those are known to reach Postgres unchanged this way."""
    kinds = [(field.column, _json_kind(field), field) for field in fields]
    if any(kind is None for _column, kind, _field in kinds):
        return None
    rows = []
    for message in messages:
        row: dict[str, Any] = {}
        for column, kind, field in kinds:
            value = field.pre_save(message, True)
            if kind == "json":
                if not isinstance(value, list | dict):
                    return None
            elif value is None:
                pass
            elif kind is datetime:
                if type(value) is not datetime or value.tzinfo is None:
                    return None
                value = value.isoformat()
            elif kind is str and isinstance(value, str):
                value = str.__str__(value)  # a TextChoices member: its characters, as psycopg writes them
            elif kind is int and isinstance(value, int) and not isinstance(value, bool):
                value = int(value)  # as IntegerField.get_prep_value
            elif type(value) is not kind:
                return None
            row[column] = value
        rows.append(row)
    return rows


def _json_kind(field: Any) -> Any:
    if isinstance(field, models.JSONField):
        return "json" if field.encoder is None else None
    if isinstance(field, models.ForeignKey):
        return _json_kind(field.target_field)
    if isinstance(field, models.CharField | models.TextField):
        return str
    if isinstance(field, models.BooleanField):
        return bool
    if isinstance(field, models.IntegerField):  # the auto fields too
        return int
    if isinstance(field, models.DateTimeField):
        return datetime
    return None


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


def event_plan(
    *,
    event: OutboxEvent,
    automations: list[Automation],
    contact: Contact | None,
    versions: dict[int, TemplateVersion | None],
    decisions: dict[DecisionRequest, SendDecision] | None = None,
) -> EventPlan:
    """Decide what one event causes. Reads only; the caller writes the plan.

    `versions` caches each automation's template version for the batch; `decisions`
    holds suppression decisions made for the whole batch (asked one by one if absent).
    """
    now = timezone.now()
    plan = EventPlan(event=event, messages=[], outcome=[])
    if contact is not None:
        allowed, reason = residency_decision(contact=contact)
        if not allowed:
            # Data residency: this deployment may not process this contact at all, so
            # the event is refused whether or not an automation would have used it.
            plan.status = OutboxEvent.Status.REFUSED
            plan.outcome.append(f"refused: {reason}")
            return plan
    if not automations:
        plan.outcome.append("no active automation for this event type")
        return plan
    if contact is None:
        plan.outcome.append(f"no contact with user_id {event.user_id!r} (identify() it first)")
        return plan
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
    for automation in automations:
        try:
            matched = evaluate(automation.conditions, data)
        except RuleError as err:
            plan.outcome.append(f"{automation.name}: invalid rule ({err})")
            continue
        if not matched:
            plan.outcome.append(f"{automation.name}: conditions not met")
            continue
        if automation.pk not in versions:
            versions[automation.pk] = template_version_for(automation)
        version = versions[automation.pk]
        if version is None:
            plan.outcome.append(
                f"{automation.name}: template {automation.template.name!r} has no published version"
            )
            continue
        request = DecisionRequest(
            email=contact.email, purpose=automation.purpose, transactional=automation.is_transactional
        )
        decision = (decisions or {}).get(request) or send_decision(
            email=request.email, purpose=request.purpose, transactional=request.transactional
        )
        if decision.allowed:
            decision = consent_decision(
                contact=contact, purpose=automation.purpose, transactional=automation.is_transactional
            )
        plan.messages.append(
            Message(
                idempotency_key=f"{event.event_id}:{automation.pk}",
                event=event,
                automation=automation,
                contact=contact,
                to_email=contact.email,
                template_version=version,
                purpose=automation.purpose,
                transactional=automation.is_transactional,
                # Receipts and password resets go before marketing under a warm-up cap.
                priority=10 if automation.is_transactional else 100,
                status=Message.Status.QUEUED if decision.allowed else Message.Status.SUPPRESSED,
                status_reason=decision.reason,
                send_after=max(now, event.occurred_at + automation.delay),
            )
        )
        plan.outcome.append(f"{automation.name}: {'queued' if decision.allowed else decision.reason}")
    return plan


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
