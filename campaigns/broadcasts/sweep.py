"""The broadcast housekeeping pass (task sweep_broadcasts): start due scheduled
broadcasts, materialise audiences within a time budget, cancel messages of cancelled
broadcasts that came back to the queue, mark finished broadcasts sent, refresh the
admin's counts.

Each broadcast, and each step, fails alone: an error is logged and the sweep goes on,
so one broken broadcast cannot stop every other broadcast's mail. No step waits for a
broadcast row another worker holds (SKIP LOCKED, or conditions a locked row fails)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Exists, F, OuterRef, Q
from django.utils import timezone

from campaigns.broadcasts.materialise import BATCH_SIZE, broadcast_materialise_batch
from campaigns.broadcasts.selectors import broadcast_message_counts
from campaigns.broadcasts.services import broadcast_start, cancel_messages
from campaigns.models import Broadcast, Message

logger = logging.getLogger(__name__)

# The sweeper keeps the admin's message counts of a broadcast fresh while it sends and
# for a week after (opens, clicks, bounces and complaints keep arriving), at most once a
# minute each and for a bounded number of broadcasts per sweep.
STATS_REFRESH_SECONDS = 60
STATS_TRAILING_DAYS = 7
STATS_PER_SWEEP = 20


@dataclass
class BroadcastSweep:
    started: list[int] = field(default_factory=list)
    contacts: int = 0
    messages: int = 0
    cancelled_messages: int = 0
    finished: int = 0
    failed: list[int] = field(default_factory=list)  # broadcasts whose step raised
    more: bool = False  # the time budget ran out with audiences left to materialise


def broadcasts_sweep(*, budget_seconds: float = 20.0, batch_size: int = BATCH_SIZE) -> BroadcastSweep:
    """One pass of the broadcast housekeeping (see the module docstring)."""
    deadline = time.monotonic() + budget_seconds
    result = BroadcastSweep()
    result.started = broadcasts_start_due(failed=result.failed)
    pending = list(
        Broadcast.objects.filter(status=Broadcast.Status.SENDING, audience_done_at__isnull=True)
        .order_by("started_at", "id")
        .values_list("id", flat=True)
    )
    for broadcast_id in pending:
        if time.monotonic() >= deadline:
            result.more = True
            break
        try:
            _materialise(broadcast_id, batch_size=batch_size, deadline=deadline, result=result)
        except Exception:
            # Its batch rolled back, cursor included: the next sweep tries it again.
            logger.exception("broadcast materialisation failed", extra={"broadcast_id": broadcast_id})
            result.failed.append(broadcast_id)
        if result.more:
            break
    now = timezone.now()
    result.cancelled_messages = _step(
        "cancel", lambda: cancel_messages(Q(broadcast__status=Broadcast.Status.CANCELLED), now=now)
    )
    result.finished = _step("finish", lambda: broadcasts_finish(now=now))
    _step("stats", lambda: broadcasts_stats_refresh(now=now))
    return result


def _materialise(broadcast_id: int, *, batch_size: int, deadline: float, result: BroadcastSweep) -> None:
    while True:
        if time.monotonic() >= deadline:
            result.more = True
            return
        batch = broadcast_materialise_batch(broadcast_id=broadcast_id, size=batch_size)
        if batch is None:
            return
        result.contacts += batch.considered
        result.messages += batch.created
        if batch.done:
            return


def _step(name: str, run: Callable[[], int]) -> int:
    try:
        with transaction.atomic():  # a failed statement must not poison the next step
            return run()
    except Exception:
        logger.exception("broadcast sweep step failed", extra={"step": name})
        return 0


def broadcasts_start_due(*, now: datetime | None = None, failed: list[int] | None = None) -> list[int]:
    """Start every scheduled broadcast whose time has come; return their ids. A
    broadcast that cannot start goes back to draft with its start_error; one whose start
    raised anything else is logged (and added to `failed`) and tried on the next sweep."""
    now = now or timezone.now()
    started = []
    due = Broadcast.objects.filter(status=Broadcast.Status.SCHEDULED, scheduled_at__lte=now)
    for broadcast_id in due.order_by("scheduled_at", "id").values_list("id", flat=True):
        try:
            if _start_due(broadcast_id, now=now):
                started.append(broadcast_id)
        except Exception:
            logger.exception("scheduled broadcast start failed", extra={"broadcast_id": broadcast_id})
            if failed is not None:
                failed.append(broadcast_id)
    return started


@transaction.atomic
def _start_due(broadcast_id: int, *, now: datetime) -> bool:
    broadcast = (
        Broadcast.objects.select_for_update(skip_locked=True, of=("self",))
        .select_related("template")
        .filter(pk=broadcast_id, status=Broadcast.Status.SCHEDULED, scheduled_at__lte=now)
        .first()
    )
    if broadcast is None:
        return False
    try:
        broadcast_start(broadcast=broadcast, now=now)
    except ValidationError as err:
        # Checked when scheduled; only an edit since then gets here. Back to draft,
        # saying why, rather than failing again on every sweep.
        reason = f"not started at its scheduled time: {'; '.join(err.messages)}"
        Broadcast.objects.filter(pk=broadcast.pk).update(
            status=Broadcast.Status.DRAFT, start_error=reason[:255], updated_at=now
        )
        logger.warning("scheduled broadcast not started", extra={"broadcast_id": broadcast.pk})
        return False
    return True


def broadcasts_finish(*, now: datetime | None = None) -> int:
    """Sending broadcasts whose audience is materialised and whose messages are all
    final (none queued, claimed, being handed over or of unknown outcome) are sent.

    Sent is for good: a message replayed later (messages_replay) is sent under the
    finished broadcast (claimable_messages_q accepts Broadcast.MAY_SEND) without
    reopening it, and counts in its stats while they are refreshed."""
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


@transaction.atomic
def broadcasts_stats_refresh(*, now: datetime | None = None) -> int:
    """Refresh the stored message counts of active and recently finished broadcasts.
    A broadcast a worker is materialising (row locked) is skipped, not waited for."""
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
        .select_for_update(skip_locked=True, of=("self",))
        .values_list("id", flat=True)[:STATS_PER_SWEEP]
    )
    for broadcast_id, counts in broadcast_message_counts(broadcast_ids=ids).items():
        Broadcast.objects.filter(pk=broadcast_id).update(stats=counts, stats_updated_at=now)
    return len(ids)
