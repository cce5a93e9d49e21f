"""The reputation guard: bounce and complaint rates per sending source (automations
and broadcasts), and the automatic pause of a source whose rates would hurt the
sender's reputation.

A rate is measured the way Gmail's Postmaster Tools measures a spam rate: complaints
reported in a period over the mail delivered in that period. Over the trailing window
(REPUTATION_WINDOW_HOURS), and per UTC day in the report:

- complaints: distinct messages of the source with a "complained" TrackingEvent whose
  occurred_at is in the window, however long ago the message itself was sent;
- bounces: likewise with a bounce event, i.e. every event type that makes a message
  "bounced" (webhooks.services.STATUS_FOR_EVENT: bounced, soft or hard, and the ESP's
  own rejected/failed);
- the denominator: messages of the source handed to the ESP in the window (by sent_at;
  statuses sent, delivered, opened, clicked, bounced, complained, unsubscribed). We
  cannot see inbox placement, and not every ESP reports deliveries, so mail handed over
  stands in for Gmail's "delivered to the inbox"; it includes mail that bounced.

Counting complaints by when the mail was sent would miss both ends: complaints on mail
sent before the window never count, and the newest mail has not drawn its complaints
yet, so a steady source would always look better than it is. Counting from the events
also sees a message that both bounced and drew a complaint as both (Message.status keeps
only the highest state). For a source sending at a steady rate, complaints today over
mail sent today is its true complaint rate.

Gmail's sender guidelines ask bulk senders to keep the spam rate reported in Postmaster
Tools below 0.10% and never to reach 0.30%; REPUTATION_COMPLAINT_RATE defaults to that
0.30% limit. A source is paused when a rate over the window reaches its limit and it
handed at least REPUTATION_MIN_VOLUME messages to the ESP in that window: below that
volume one complaint would swing the rate, and it would pause small automations at
random.

A source a person resumed is judged on the mail it handed over since the resume (both
the messages counted and the messages whose bounces and complaints count): the window
still holds the bounces or complaints that paused it, and mail sent before the pause
keeps drawing them for a day or two; counting them again would pause it again at once,
before the fix could show. Broadcasts and automations record resumed_at when a person
resumes or switches them on.

Each kind of source is one ReputationSource (its Message foreign key, its name field
and a conditional pause); broadcasts pause from sending to paused, with the reason. Its
figures take two queries whatever the number of sources: messages handed over, and
bounce and complaint events, each grouped by source (and day).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta

from django.conf import settings
from django.db.models import Count, F, Q
from django.db.models.functions import TruncDate
from django.utils import timezone

from campaigns.broadcasts import broadcast_pause_if_sending
from campaigns.models import Automation, Broadcast, Message
from webhooks.models import TrackingEvent
from webhooks.services import STATUS_FOR_EVENT

logger = logging.getLogger(__name__)

HANDED_TO_ESP = (
    Message.Status.SENT,
    Message.Status.DELIVERED,
    Message.Status.OPENED,
    Message.Status.CLICKED,
    Message.Status.BOUNCED,
    Message.Status.COMPLAINED,
    Message.Status.UNSUBSCRIBED,
)
# The events that count against a source: those that make a message "bounced" or
# "complained" on its status timeline. The partial index tracking_event_reputation
# (occurred_at, on these event types only) must cover them, or every check reads the
# whole event table.
BOUNCE_EVENTS = tuple(t for t, status in STATUS_FOR_EVENT.items() if status == Message.Status.BOUNCED)
COMPLAINT_EVENTS = tuple(t for t, status in STATUS_FOR_EVENT.items() if status == Message.Status.COMPLAINED)
GMAIL_COMPLAINT_LIMIT = 0.003


@dataclass(frozen=True)
class ReputationFigures:
    kind: str  # "automation" or "broadcast"
    source_id: int
    name: str
    handed_over: int
    bounced: int
    complained: int
    day: date | None = None  # None: the trailing window

    @property
    def bounce_rate(self) -> float:
        return self.bounced / self.handed_over if self.handed_over else 0.0

    @property
    def complaint_rate(self) -> float:
        return self.complained / self.handed_over if self.handed_over else 0.0


@dataclass(frozen=True)
class ReputationSource:
    kind: str
    group_field: str  # the Message foreign key naming the source, e.g. "automation_id"
    name_field: str  # e.g. "automation__name"
    pause: Callable[[int, str, datetime], bool]  # (id, reason, now) -> paused now?
    # When a person last resumed the source (e.g. "broadcast__resumed_at"); the pause
    # decision counts only mail handed over since then. None: the source has no such field.
    resumed_field: str | None = None


@dataclass(frozen=True)
class Paused:
    figures: ReputationFigures
    reason: str


def _automation_pause(automation_id: int, reason: str, now: datetime) -> bool:
    # Conditional UPDATE: an automation already paused (by a person, or by a check
    # running at the same time) keeps its first reason and is not reported twice.
    return bool(
        Automation.objects.filter(pk=automation_id, active=True).update(
            active=False, paused_reason=reason[:255], paused_at=now, updated_at=now
        )
    )


def _broadcast_pause(broadcast_id: int, reason: str, now: datetime) -> bool:
    # Same conditional UPDATE (sending → paused): a broadcast paused by a person, or
    # already sent or cancelled, is left as it is.
    return broadcast_pause_if_sending(
        broadcast_id=broadcast_id, reason=reason, by=Broadcast.PAUSED_BY_GUARD, now=now
    )


SOURCES: tuple[ReputationSource, ...] = (
    ReputationSource(
        kind="automation",
        group_field="automation_id",
        name_field="automation__name",
        pause=_automation_pause,
        resumed_field="automation__resumed_at",
    ),
    ReputationSource(
        kind="broadcast",
        group_field="broadcast_id",
        name_field="broadcast__name",
        pause=_broadcast_pause,
        resumed_field="broadcast__resumed_at",
    ),
)


def source_figures(
    *,
    source: ReputationSource,
    since: datetime,
    until: datetime,
    by_day: bool = False,
    since_resume: bool = False,
) -> list[ReputationFigures]:
    """Figures per source (and per UTC day when by_day) in [since, until): messages
    handed over in it, and messages with a bounce or complaint event that occurred in
    it. With since_resume, only messages handed over since the source's resumed_at.

    A source with bounces or complaints but no mail handed over in the period (the tail
    of a broadcast sent the day before) has a row with handed_over 0."""
    group, name = source.group_field, source.name_field
    handed = Message.objects.filter(
        status__in=HANDED_TO_ESP, sent_at__gte=since, sent_at__lt=until, **{f"{group}__isnull": False}
    )
    events = TrackingEvent.objects.filter(
        event_type__in=BOUNCE_EVENTS + COMPLAINT_EVENTS,
        occurred_at__gte=since,
        occurred_at__lt=until,
        **{f"message__{group}__isnull": False},
    )
    if since_resume and source.resumed_field:
        resumed = source.resumed_field
        handed = handed.filter(Q(**{f"{resumed}__isnull": True}) | Q(sent_at__gte=F(resumed)))
        events = events.filter(
            Q(**{f"message__{resumed}__isnull": True}) | Q(message__sent_at__gte=F(f"message__{resumed}"))
        )
    handed_keys, event_keys = [group, name], [f"message__{group}", f"message__{name}"]
    if by_day:
        handed = handed.annotate(day=TruncDate("sent_at"))
        events = events.annotate(day=TruncDate("occurred_at"))
        handed_keys.append("day")
        event_keys.append("day")

    figures: dict[tuple[int, date | None], ReputationFigures] = {}
    for row in handed.values(*handed_keys).annotate(handed_over=Count("id")).order_by():
        figures[(row[group], row.get("day"))] = ReputationFigures(
            kind=source.kind,
            source_id=row[group],
            name=row[name],
            handed_over=row["handed_over"],
            bounced=0,
            complained=0,
            day=row.get("day"),
        )
    # Distinct messages: a message the ESP reports twice (two event ids) counts once.
    event_counts = (
        events.values(*event_keys)
        .annotate(
            bounced=Count("message_id", distinct=True, filter=Q(event_type__in=BOUNCE_EVENTS)),
            complained=Count("message_id", distinct=True, filter=Q(event_type__in=COMPLAINT_EVENTS)),
        )
        .order_by()
    )
    for row in event_counts:
        source_id, day = row[f"message__{group}"], row.get("day")
        known = figures.get((source_id, day)) or ReputationFigures(
            kind=source.kind,
            source_id=source_id,
            name=row[f"message__{name}"],
            handed_over=0,
            bounced=0,
            complained=0,
            day=day,
        )
        figures[(source_id, day)] = replace(known, bounced=row["bounced"], complained=row["complained"])
    return sorted(figures.values(), key=lambda f: (f.day or date.min, f.name, f.source_id))


def reputation_report(*, days: int = 7, now: datetime | None = None) -> list[ReputationFigures]:
    """Per UTC day, per source, for the last `days` calendar days (today included),
    newest day first."""
    now = now or timezone.now()
    start = (now - timedelta(days=days - 1)).replace(hour=0, minute=0, second=0, microsecond=0)
    figures = [
        f for source in SOURCES for f in source_figures(source=source, since=start, until=now, by_day=True)
    ]
    return sorted(figures, key=lambda f: (f.day or date.min, f.kind, f.name), reverse=True)


def _rate_text(rate: float) -> str:
    return f"{rate * 100:.2f}%"


def pause_reason(figures: ReputationFigures, *, window_hours: int) -> str:
    """Why these figures pause their source, in words; empty when they do not."""
    options = settings.MAILAUTO
    if figures.handed_over < options["REPUTATION_MIN_VOLUME"]:
        return ""
    reasons = []
    window = f"over the last {window_hours} h"
    complaint_limit = options["REPUTATION_COMPLAINT_RATE"]
    if figures.complaint_rate >= complaint_limit:
        verb = "exceeds" if figures.complaint_rate > complaint_limit else "reaches"
        whose = " (Gmail's limit)" if complaint_limit == GMAIL_COMPLAINT_LIMIT else ""
        reasons.append(
            f"complaint rate {_rate_text(figures.complaint_rate)} {window} {verb} "
            f"{_rate_text(complaint_limit)}{whose}"
        )
    bounce_limit = options["REPUTATION_BOUNCE_RATE"]
    if figures.bounce_rate >= bounce_limit:
        verb = "exceeds" if figures.bounce_rate > bounce_limit else "reaches"
        reasons.append(
            f"bounce rate {_rate_text(figures.bounce_rate)} {window} {verb} {_rate_text(bounce_limit)}"
        )
    return "; ".join(reasons)


def reputation_check(*, now: datetime | None = None) -> list[Paused]:
    """Pause every active source over a limit; return what this call paused."""
    now = now or timezone.now()
    window_hours = settings.MAILAUTO["REPUTATION_WINDOW_HOURS"]
    since = now - timedelta(hours=window_hours)
    paused: list[Paused] = []
    for source in SOURCES:
        for figures in source_figures(source=source, since=since, until=now, since_resume=True):
            reason = pause_reason(figures, window_hours=window_hours)
            if reason and source.pause(figures.source_id, reason, now):
                logger.warning(
                    "reputation guard paused %s %s: %s",
                    source.kind,
                    figures.source_id,
                    reason,
                    extra={"kind": source.kind, "source_id": figures.source_id},
                )
                paused.append(Paused(figures=figures, reason=reason))
    return paused
