"""The suppression list and its change log. Postgres is the truth; caches only mirror it."""

from __future__ import annotations

from django.db import models
from django.utils import timezone


class Suppression(models.Model):
    """An address we must not email (for any purpose, or for one topic)."""

    class Reason(models.TextChoices):
        HARD_BOUNCE = "hard_bounce", "hard bounce"
        SOFT_BOUNCES = "soft_bounces", "repeated soft bounces"
        COMPLAINT = "complaint", "spam complaint"
        UNSUBSCRIBE = "unsubscribe", "unsubscribed"
        INVALID = "invalid", "invalid address (rejected by the ESP)"
        MANUAL = "manual", "added manually"

    email = models.EmailField(max_length=254)
    # Empty topic means every purpose (transactional mail included, except for an
    # unsubscribe, which only ever covers marketing topics).
    topic = models.CharField(max_length=100, blank=True)
    reason = models.CharField(max_length=20, choices=Reason.choices)
    source = models.CharField(
        max_length=100, help_text="Who or what suppressed it: 'webhook:postmark', a username…"
    )
    detail = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["email", "topic"], name="suppression_email_topic_unique")
        ]

    def __str__(self) -> str:
        return f"{self.email} ({self.get_reason_display()})"


class SuppressionLogEntry(models.Model):
    """Every change to the suppression list, with who made it and why."""

    class Action(models.TextChoices):
        ADDED = "added", "added"
        REMOVED = "removed", "removed"

    email = models.EmailField(max_length=254, db_index=True)
    topic = models.CharField(max_length=100, blank=True)
    action = models.CharField(max_length=10, choices=Action.choices)
    reason = models.CharField(max_length=255)
    source = models.CharField(max_length=100)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]
        verbose_name_plural = "suppression log"

    def __str__(self) -> str:
        return f"{self.email} {self.action} ({self.reason})"
