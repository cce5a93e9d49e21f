"""IP/domain warm-up: how many messages the current WarmupSchedule lets through today,
reserved atomically across workers, and the daily review that climbs the curve or holds
it when recipients bounce or complain.

Which schedule applies: the active WarmupSchedule named MAILAUTO["WARMUP_STREAM"], or,
when that is empty, the one named after the domain of DEFAULT_FROM_EMAIL (every message
goes out from that address). No matching active schedule: no warm-up limit at all.

Days are UTC dates. Messages over today's cap wait for tomorrow (warmup_defer_until),
highest priority first: Message.priority, lower is sooner.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from email.utils import parseaddr
from typing import Any, Generic, TypeVar

from django.conf import settings
from django.db import transaction
from django.db.models import Count, F, Q
from django.db.models.functions import Greatest
from django.utils import timezone

from campaigns.models import Message, WarmupDay, WarmupSchedule

__all__ = [
    "HANDED_TO_ESP",
    "DayStats",
    "WarmupAdmission",
    "utc_today",
    "warmup_admit",
    "warmup_advance",
    "warmup_advance_all",
    "warmup_allowance",
    "warmup_day_stats",
    "warmup_defer_until",
    "warmup_release",
    "warmup_schedule_current",
    "warmup_take",
]

# Statuses of a message the ESP took; bounced and complained are counted as such.
HANDED_TO_ESP = (
    Message.Status.SENT,
    Message.Status.DELIVERED,
    Message.Status.OPENED,
    Message.Status.CLICKED,
    Message.Status.BOUNCED,
    Message.Status.COMPLAINED,
    Message.Status.UNSUBSCRIBED,
)

T = TypeVar("T")


def utc_today(now: datetime | None = None) -> date:
    return (now or timezone.now()).astimezone(UTC).date()


def warmup_defer_until(*, now: datetime) -> datetime:
    """When a message over today's cap may try again: the start of the next UTC day."""
    if timezone.is_naive(now):
        raise ValueError("warmup_defer_until() needs an aware datetime")
    return datetime.combine(utc_today(now) + timedelta(days=1), time.min, tzinfo=UTC)


def warmup_schedule_current() -> WarmupSchedule | None:
    """The active schedule that applies to what we send now (see the module docstring)."""
    stream = str(settings.MAILAUTO.get("WARMUP_STREAM") or "").strip()
    name = stream or parseaddr(settings.DEFAULT_FROM_EMAIL)[1].rpartition("@")[2]
    if not name:
        return None
    return WarmupSchedule.objects.filter(name__iexact=name, active=True).first()


# --- today's allowance ----------------------------------------------------------------


def warmup_allowance(*, schedule: WarmupSchedule, today: date) -> int | None:
    """How many more messages may go today; None is unlimited."""
    if not schedule.active:
        return None
    if today < schedule.start_date:
        return 0
    row = WarmupDay.objects.filter(schedule=schedule, day=today).values_list("sent", "cap").first()
    sent, cap = row if row is not None else (0, schedule.current_cap)
    return None if cap is None else max(0, cap - sent)


def _day(schedule: WarmupSchedule, today: date) -> WarmupDay:
    """Today's counter, created on first use with the schedule's current step as stored
    (the caller's instance may predate this morning's warmup_advance())."""
    row = WarmupDay.objects.filter(schedule=schedule, day=today).first()
    if row is not None:
        return row
    fresh = WarmupSchedule.objects.get(pk=schedule.pk)
    row, _ = WarmupDay.objects.get_or_create(
        schedule=fresh,
        day=today,
        defaults={
            "step": fresh.step,
            "cap": fresh.current_cap,
            "held": fresh.held,
            "reason": fresh.reason,
        },
    )
    return row


def warmup_take(*, schedule: WarmupSchedule, count: int, today: date | None = None) -> int:
    """Reserve up to `count` of today's sends; returns how many were granted (0..count).

    Concurrent workers never pass the cap: each grant is a conditional UPDATE
    (sent = sent + g WHERE sent <= cap - g), which Postgres re-checks against the row as
    committed by whoever updated it first, and SQLite serialises. A grant that loses
    the race re-reads and asks for what is left. Call it outside long transactions: the
    row stays locked until the caller commits.
    """
    if count <= 0:
        return 0
    if not schedule.active:
        return count
    today = today or utc_today()
    if today < schedule.start_date:
        return 0
    row = _day(schedule, today)
    days = WarmupDay.objects.filter(pk=row.pk)
    sent, cap = row.sent, row.cap
    while True:
        if cap is None:
            days.update(sent=F("sent") + count)
            return count
        grant = min(count, cap - sent)
        if grant <= 0:
            return 0
        if days.filter(sent__lte=F("cap") - grant).update(sent=F("sent") + grant):
            return grant
        sent, cap = days.values_list("sent", "cap").get()


def warmup_release(*, schedule: WarmupSchedule, count: int, day: date) -> None:
    """Give back reserved sends that never reached the ESP (a retryable error, a
    throttle timeout), so that they do not use up the day's cap."""
    if count > 0 and schedule.active:
        WarmupDay.objects.filter(schedule=schedule, day=day).update(sent=Greatest(F("sent") - count, 0))


@dataclass
class WarmupAdmission(Generic[T]):
    """A batch split by today's warm-up allowance."""

    admitted: list[T]
    deferred: list[T] = field(default_factory=list)
    day: date | None = None
    defer_until: datetime | None = None  # for the deferred ones
    reason: str = ""  # the status reason for the deferred ones


def _send_order(message: Any) -> tuple[Any, ...]:
    return (message.priority, message.send_after, message.pk)


def warmup_admit(
    *,
    schedule: WarmupSchedule | None,
    messages: Sequence[T],
    now: datetime | None = None,
    order: Callable[[T], Any] = _send_order,
) -> WarmupAdmission[T]:
    """Take today's allowance for a batch: the highest-priority messages (lowest
    Message.priority, then oldest send_after) are admitted; the rest are deferred to the
    next UTC day with a reason to record on them. No schedule: everything is admitted.

    Transactional mail (a receipt, a password reset) is never held back: it is admitted
    and takes its share of the day's allowance first, as far as the cap goes, so
    marketing gets what is left. A warm-up protects the domain's reputation from a jump
    in bulk volume; a password reset that waits until tomorrow is a broken product.
    (Past the cap it is not counted: WarmupDay.sent never exceeds the cap.)"""
    if schedule is None or not messages:
        return WarmupAdmission(admitted=list(messages))
    now = now or timezone.now()
    today = utc_today(now)
    ordered = sorted(messages, key=order)
    urgent = [m for m in ordered if getattr(m, "transactional", False) is True]
    bulk = [m for m in ordered if getattr(m, "transactional", False) is not True]
    warmup_take(schedule=schedule, count=len(urgent), today=today)
    granted = warmup_take(schedule=schedule, count=len(bulk), today=today)
    admission = WarmupAdmission(admitted=urgent + bulk[:granted], deferred=bulk[granted:], day=today)
    if admission.deferred:
        admission.defer_until = warmup_defer_until(now=now)
        if today < schedule.start_date:
            admission.reason = f"warm-up of {schedule.name} starts on {schedule.start_date}; waiting"
        else:
            cap = WarmupDay.objects.filter(schedule=schedule, day=today).values_list("cap", flat=True).first()
            admission.reason = (
                f"warm-up cap of {schedule.name} for {today} reached ({cap}/day); waiting for tomorrow"
            )
    return admission


# --- the daily review -------------------------------------------------------------------


@dataclass(frozen=True)
class DayStats:
    handed: int  # messages the ESP took that day
    bounced: int
    complained: int

    @property
    def bounce_rate(self) -> float:
        return self.bounced / self.handed if self.handed else 0.0

    @property
    def complaint_rate(self) -> float:
        return self.complained / self.handed if self.handed else 0.0


def warmup_day_stats(*, day: date) -> DayStats:
    """Messages handed to the ESP on a UTC day (by sent_at), and how many of them have
    bounced or drawn a complaint so far. Message has no From or stream column: all of
    them count, since they all go out from DEFAULT_FROM_EMAIL."""
    start = datetime.combine(day, time.min, tzinfo=UTC)
    row = Message.objects.filter(
        sent_at__gte=start, sent_at__lt=start + timedelta(days=1), status__in=HANDED_TO_ESP
    ).aggregate(
        handed=Count("id"),
        bounced=Count("id", filter=Q(status=Message.Status.BOUNCED)),
        complained=Count("id", filter=Q(status=Message.Status.COMPLAINED)),
    )
    return DayStats(handed=row["handed"], bounced=row["bounced"], complained=row["complained"])


def _cap_text(cap: int | None) -> str:
    return "unlimited" if cap is None else f"{cap}/day"


@transaction.atomic
def warmup_advance(*, schedule: WarmupSchedule, today: date) -> WarmupDay | None:
    """The daily review (beat, shortly after 00:00 UTC): climb one step if yesterday's
    bounce and complaint rates stayed within the thresholds, otherwise hold and say why.
    Runs once per schedule and day (a second run the same day changes nothing).
    Returns today's counter, or None when the schedule is inactive or not started."""
    schedule = WarmupSchedule.objects.select_for_update().get(pk=schedule.pk)
    if not schedule.active or today < schedule.start_date:
        return None
    if schedule.evaluated_on is not None and schedule.evaluated_on >= today:
        return WarmupDay.objects.filter(schedule=schedule, day=today).first()

    steps = len(schedule.daily_caps)
    step = min(schedule.step, steps - 1)
    held = False
    if today == schedule.start_date:
        reason = f"warm-up started at step {step + 1} of {steps} ({_cap_text(schedule.cap_for_step(step))})"
    else:
        yesterday = today - timedelta(days=1)
        stats = warmup_day_stats(day=yesterday)
        rates = f"bounces {stats.bounce_rate:.2%}, complaints {stats.complaint_rate:.2%} of {stats.handed} on {yesterday}"
        if stats.handed == 0:
            held, reason = True, f"held at step {step + 1}: nothing was sent on {yesterday}"
        elif stats.bounce_rate > schedule.max_bounce_rate:
            held = True
            reason = (
                f"held at step {step + 1}: bounce rate {stats.bounce_rate:.2%} on {yesterday} "
                f"is over {schedule.max_bounce_rate:.2%}"
            )
        elif stats.complaint_rate > schedule.max_complaint_rate:
            held = True
            reason = (
                f"held at step {step + 1}: complaint rate {stats.complaint_rate:.2%} on {yesterday} "
                f"is over {schedule.max_complaint_rate:.2%}"
            )
        elif step >= steps - 1:
            reason = f"at the last step ({_cap_text(schedule.cap_for_step(step))}); {rates}"
        else:
            step += 1
            reason = (
                f"advanced to step {step + 1} of {steps} ({_cap_text(schedule.cap_for_step(step))}): {rates}"
            )

    reason = reason[:255]
    schedule.step, schedule.held, schedule.reason = step, held, reason
    schedule.evaluated_on, schedule.updated_at = today, timezone.now()
    schedule.save(update_fields=["step", "held", "reason", "evaluated_on", "updated_at"])

    cap = schedule.cap_for_step(step)
    row, created = WarmupDay.objects.select_for_update().get_or_create(
        schedule=schedule, day=today, defaults={"step": step, "cap": cap, "held": held, "reason": reason}
    )
    if not created:
        # Workers may have started today's counter before this review ran; never set a
        # cap below what they already sent (the table's check constraint forbids it).
        row.step, row.held, row.reason = step, held, reason
        row.cap = None if cap is None else max(cap, row.sent)
        row.save(update_fields=["step", "cap", "held", "reason"])
    return row


def warmup_advance_all(*, today: date | None = None) -> list[WarmupDay]:
    """Review every active schedule (the beat task calls this once a day)."""
    today = today or utc_today()
    rows = []
    for schedule in WarmupSchedule.objects.filter(active=True).order_by("pk"):
        row = warmup_advance(schedule=schedule, today=today)
        if row is not None:
            rows.append(row)
    return rows
