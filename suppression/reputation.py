"""The reputation guard: bounce and complaint rates per sending source (automations
and broadcasts), and the automatic pause of a source whose rates would hurt the
sender's reputation.

A rate is bounced (or complained) messages over messages handed to the ESP (statuses
sent, delivered, opened, clicked, bounced, complained, unsubscribed), by the time they
were handed over (sent_at). Message.status is a message's latest state, so a complaint
shows as "complained" unless something later overwrote it; the TrackingEvent store will
allow exact counts once it lands.

Gmail's sender guidelines ask bulk senders to keep the spam rate reported in Postmaster
Tools below 0.10% and never to reach 0.30%; REPUTATION_COMPLAINT_RATE defaults to that
0.30% limit. A source is paused when a rate over the trailing window
(REPUTATION_WINDOW_HOURS) reaches its limit and it handed at least
REPUTATION_MIN_VOLUME messages to the ESP in that window: below that volume one
complaint would swing the rate, and it would pause small automations at random.

A source a person resumed is judged on the mail it handed over since the resume: the
window still holds the bounces or complaints that paused it, and counting them again
would pause it again at once, before the fix could show. Broadcasts and automations
record resumed_at when a person resumes or switches them on.

Each kind of source is one ReputationSource (its Message foreign key, its name field
and a conditional pause); broadcasts pause from sending to paused, with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from django.conf import settings
from django.db.models import Count, F, Q
from django.db.models.functions import TruncDate
from django.utils import timezone

from campaigns.broadcasts import broadcast_pause_if_sending
from campaigns.models import Automation, Broadcast, Message

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
    """Figures per source (and per UTC day when by_day) for messages handed over in
    [since, until); with since_resume, in [max(since, the source's resumed_at), until)."""
    messages = Message.objects.filter(
        status__in=HANDED_TO_ESP,
        sent_at__gte=since,
        sent_at__lt=until,
        **{f"{source.group_field}__isnull": False},
    )
    if since_resume and source.resumed_field:
        resumed = source.resumed_field
        messages = messages.filter(Q(**{f"{resumed}__isnull": True}) | Q(sent_at__gte=F(resumed)))
    keys = [source.group_field, source.name_field]
    if by_day:
        messages = messages.annotate(day=TruncDate("sent_at"))
        keys.append("day")
    rows = (
        messages.values(*keys)
        .annotate(
            handed_over=Count("id"),
            bounced=Count("id", filter=Q(status=Message.Status.BOUNCED)),
            complained=Count("id", filter=Q(status=Message.Status.COMPLAINED)),
        )
        .order_by(*reversed(keys))
    )
    return [
        ReputationFigures(
            kind=source.kind,
            source_id=row[source.group_field],
            name=row[source.name_field],
            handed_over=row["handed_over"],
            bounced=row["bounced"],
            complained=row["complained"],
            day=row.get("day"),
        )
        for row in rows
    ]


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
