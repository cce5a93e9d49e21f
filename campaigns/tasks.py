"""Celery tasks: thin adapters that claim work through the services.

A task message carries no data, only "look now": the rows say what to do. Losing a task
message therefore delays work until the beat sweeper runs; it never loses it.
"""

from __future__ import annotations

import time

from celery import shared_task
from django.utils import timezone

from campaigns import delivery, processing
from campaigns.models import Message, OutboxEvent

# How long one task keeps claiming batches before handing over to a fresh task, so that
# one long backlog does not pin a worker process forever (and a deploy can drain it).
TASK_TIME_BUDGET_SECONDS = 20.0


@shared_task(ignore_result=True)
def events_process() -> int:
    started = time.monotonic()
    processed = 0
    while time.monotonic() - started < TASK_TIME_BUDGET_SECONDS:
        result = processing.events_process_batch()
        processed += result.claimed
        if result.claimed == 0:
            return processed
    events_process.apply_async()  # more work left: continue in a fresh task
    return processed


@shared_task(ignore_result=True)
def messages_send() -> int:
    started = time.monotonic()
    handled = 0
    while time.monotonic() - started < TASK_TIME_BUDGET_SECONDS:
        result = delivery.messages_send_batch()
        handled += result.claimed
        if result.claimed == 0:
            return handled
    messages_send.apply_async()
    return handled


@shared_task(ignore_result=True)
def sweep_outbox() -> None:
    """Beat, every few seconds: find what lost nudges, dead workers or delays left behind."""
    now = timezone.now()
    delivery.messages_expire_leases()
    delivery.messages_resend_unknown()
    due_events = OutboxEvent.objects.filter(processing.claimable_events_q(now))
    due_messages = Message.objects.filter(delivery.claimable_messages_q(now))
    if due_events.exists():
        events_process.apply_async()
    if due_messages.exists():
        messages_send.apply_async()
