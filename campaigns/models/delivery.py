"""Delivery models: IP/domain warm-up schedules and their per-day send counters.

The rate limits themselves are not rows: they live in Redis (campaigns/throttle/)."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

__all__ = ["WarmupDay", "WarmupSchedule", "default_daily_caps"]


# Three weeks: doubling while volumes are small, then +40-50% a day, as mailbox
# providers (and ESPs' own warm-up guides) want to see volume grow; no cap from day 22.
DEFAULT_DAILY_CAPS: tuple[int | None, ...] = (
    *(50, 100, 200, 400, 800, 1_500, 2_500, 4_000, 6_000, 9_000, 13_000),
    *(18_000, 25_000, 35_000, 50_000, 70_000, 100_000, 140_000, 200_000, 280_000, 400_000),
    None,
)


def default_daily_caps() -> list[int | None]:
    """DEFAULT_DAILY_CAPS: 50 a day on day 1 to 400,000 on day 21, then no cap (null)."""
    return list(DEFAULT_DAILY_CAPS)


class WarmupSchedule(models.Model):
    """A warm-up curve for a new sending domain or IP (or a message stream): how many
    messages may go each day, and when to stop climbing because recipients complain.

    `step` indexes `daily_caps`; warmup_advance() moves it one step a day only while the
    previous day's bounce and complaint rates stay within the thresholds, and otherwise
    holds it, saying why in `reason`.
    """

    name = models.CharField(
        max_length=255,
        unique=True,
        help_text="The sending domain (the From domain, e.g. 'mail.example.com'), or the message "
        "stream named by MAILAUTO_WARMUP_STREAM.",
    )
    start_date = models.DateField(help_text="Day 1 of the curve (UTC). Nothing is sent before it.")
    active = models.BooleanField(default=True, help_text="Inactive schedules limit nothing.")
    daily_caps = models.JSONField(
        default=default_daily_caps,
        help_text="Messages per day for each step, e.g. [50, 100, 200, 400, null]; null means "
        "unlimited. After the last step the last value stays.",
    )
    max_bounce_rate = models.FloatField(
        default=0.02,
        validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
        help_text="Hold the curve when more than this fraction of a day's messages bounce (0.02 = 2%).",
    )
    max_complaint_rate = models.FloatField(
        default=0.001,
        validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
        help_text="Hold the curve when more than this fraction of a day's messages draw a spam "
        "complaint (0.001 = 0.1%).",
    )
    step = models.PositiveIntegerField(default=0, help_text="The current step: an index into the daily caps.")
    held = models.BooleanField(default=False, help_text="The last daily review did not advance the curve.")
    reason = models.CharField(
        max_length=255, blank=True, help_text="What the last daily review decided, and why."
    )
    evaluated_on = models.DateField(
        null=True, blank=True, editable=False, help_text="The last day warmup_advance() reviewed."
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=Q(max_bounce_rate__gte=0, max_bounce_rate__lte=1)
                & Q(max_complaint_rate__gte=0, max_complaint_rate__lte=1),
                name="warmup_schedule_rates_are_fractions",
            ),
        ]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        self.name = (self.name or "").strip().lower()
        caps = self.daily_caps
        if (
            not isinstance(caps, list)
            or not caps
            or not all(c is None or (isinstance(c, int) and not isinstance(c, bool) and c >= 0) for c in caps)
        ):
            raise ValidationError(
                {
                    "daily_caps": "A non-empty JSON list of whole numbers ≥ 0 or null, e.g. [50, 100, 200, null]."
                }
            )
        if self.step >= len(caps):
            raise ValidationError({"step": f"The curve has {len(caps)} steps (0 to {len(caps) - 1})."})

    def cap_for_step(self, step: int) -> int | None:
        """Messages allowed on a day at this step; None is unlimited."""
        caps = self.daily_caps
        return caps[min(step, len(caps) - 1)]

    @property
    def current_cap(self) -> int | None:
        return self.cap_for_step(self.step)


class WarmupDay(models.Model):
    """How many messages one schedule let through on one UTC day, against that day's cap.

    `sent` only grows through warmup_take()'s conditional UPDATE, which never lets it
    pass `cap`; the check constraint makes that a property of the table, not of the code.
    """

    schedule = models.ForeignKey(WarmupSchedule, on_delete=models.CASCADE, related_name="days")
    day = models.DateField()
    step = models.PositiveIntegerField()
    cap = models.PositiveIntegerField(null=True, blank=True, help_text="Empty: unlimited.")
    sent = models.PositiveIntegerField(default=0, help_text="Messages let through (handed to the ESP).")
    held = models.BooleanField(default=False)
    reason = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["schedule", "-day"]
        constraints = [
            models.UniqueConstraint(fields=["schedule", "day"], name="warmup_day_unique"),
            models.CheckConstraint(
                condition=Q(cap__isnull=True) | Q(sent__lte=models.F("cap")), name="warmup_day_within_cap"
            ),
        ]

    def __str__(self) -> str:
        cap = "unlimited" if self.cap is None else self.cap
        return f"{self.schedule} {self.day}: {self.sent}/{cap}"
