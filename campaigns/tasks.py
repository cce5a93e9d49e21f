"""Celery tasks: thin adapters that claim work through the services.

A task message carries no data, only "look now": the rows say what to do. Losing a task
message therefore delays work until the beat sweeper runs; it never loses it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from celery import shared_task
from django.conf import settings
from django.utils import timezone

from campaigns import broadcasts, delivery, processing, warmup
from campaigns.models import Message, OutboxEvent
from mailauto.lib import nudge

logger = logging.getLogger(__name__)

# How long one task keeps claiming batches before handing over to a fresh task, so that
# one long backlog does not pin a worker process forever (and a deploy can drain it).
TASK_TIME_BUDGET_SECONDS = 20.0


def _drain(
    kind: str, run_batch: Callable[[], tuple[int, bool]], again: Any, *, slot: int, drains: int
) -> int:
    """Run batches until there is no work or the time budget is spent.

    The task takes its slot's nudge marker (its own token) and holds it while batches
    find work, so emitters add no duplicate task behind it; should a duplicate start
    anyway (the marker expired), the newer task takes the slot and the older one stops at
    its next batch, publishing no continuation. A full batch recruits another task, up to
    `drains` of this kind. When a batch finds nothing, clear the marker and look once
    more (see mailauto/lib/nudge.py for why that closes the race with concurrent
    emitters).
    """
    started = time.monotonic()
    handled = 0
    settled = False
    token = nudge.take(kind, slot)
    while time.monotonic() - started < TASK_TIME_BUDGET_SECONDS:
        try:
            claimed, full = run_batch()
        except Exception:
            # Let go of the marker this task holds, so the next nudge or sweep is not
            # swallowed for HOLD_TTL_SECONDS; the batch's rows are leased, not lost.
            nudge.settle(kind, slot, token)
            raise
        handled += claimed
        if claimed:
            settled = False
            if not nudge.hold(kind, slot, token):
                return handled  # a newer task took this slot: it carries on, not us
            if full and drains > 1:
                nudge.nudge(again, kind=kind, slots=drains)
            continue
        if settled:
            return handled
        nudge.settle(kind, slot, token)
        settled = True
    if settled or nudge.hold(kind, slot, token):
        try:
            again.apply_async(kwargs={"slot": slot}, retry=False)  # more work left: a fresh task
        except Exception:
            logger.warning("could not hand the %s drain over; the sweeper will", kind, exc_info=True)
            nudge.settle(kind, slot, token)
    return handled


def _events_batch() -> tuple[int, bool]:
    claimed = processing.events_process_batch().claimed
    return claimed, claimed >= settings.MAILAUTO["EVENT_BATCH_SIZE"]


def _sends_batch() -> tuple[int, bool]:
    claimed = delivery.messages_send_batch().claimed
    return claimed, claimed >= settings.MAILAUTO["SEND_BATCH_SIZE"]


@shared_task(ignore_result=True)
def events_process(slot: int = 0) -> int:
    return _drain(
        "events", _events_batch, events_process, slot=slot, drains=settings.MAILAUTO["EVENT_DRAINS"]
    )


@shared_task(ignore_result=True)
def messages_send(slot: int = 0) -> int:
    return _drain("sends", _sends_batch, messages_send, slot=slot, drains=settings.MAILAUTO["SEND_DRAINS"])


@shared_task(ignore_result=True)
def sweep_outbox() -> None:
    """Beat, every few seconds: find what lost nudges, dead workers or delays left behind."""
    now = timezone.now()
    delivery.messages_expire_leases()
    delivery.messages_resend_unknown()
    processing.events_bury_poison()
    delivery.messages_bury_poison()
    due_events = OutboxEvent.objects.filter(processing.claimable_events_q(now))
    due_messages = Message.objects.filter(delivery.claimable_messages_q(now))
    # Straight past the markers: the sweeper is the way back after a crash, and a worker
    # killed mid-drain leaves its marker held for HOLD_TTL_SECONDS. If a drain is alive
    # after all, the fresh task takes its slot and the older one stops after its batch
    # (slot tokens, mailauto/lib/nudge.py): never more than one task per slot for long.
    if due_events.exists():
        _publish(events_process, "events")
    if due_messages.exists():
        _publish(messages_send, "sends")


def _publish(task: Any, kind: str) -> None:
    try:
        task.apply_async(retry=False)
    except Exception:
        logger.warning("could not nudge the %s workers; the next sweep will", kind, exc_info=True)


@shared_task(ignore_result=True)
def sweep_warmup() -> int:
    """Beat, daily: move each warm-up schedule one step on, or hold it (campaigns/warmup.py)."""
    return len(warmup.warmup_advance_all())


@shared_task(ignore_result=True)
def sweep_broadcasts() -> int:
    """Beat, every few seconds, and nudged when a broadcast starts or resumes: start due
    broadcasts, turn audiences into messages, mark finished ones sent
    (campaigns/broadcasts/)."""
    result = broadcasts.broadcasts_sweep(budget_seconds=TASK_TIME_BUDGET_SECONDS)
    nudge.settle("broadcasts")
    if result.more:
        sweep_broadcasts.apply_async()  # more audience left: continue in a fresh task
    elif broadcasts.broadcasts_waiting(now=timezone.now()):
        # Started or resumed while this sweep ran: its nudge found the marker set and
        # published nothing. Looking after settle() closes that gap (mailauto/lib/nudge.py).
        nudge.nudge(sweep_broadcasts, kind="broadcasts")
    return result.messages
