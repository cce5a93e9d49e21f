"""Broadcasts: one-off campaigns a marketer sends to an audience of contacts.

A broadcast's audience becomes Message rows in batches (campaigns/broadcasts/); from
there on its mail goes through the same delivery engine as an automation's."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q
from django.utils import timezone

__all__ = ["Broadcast"]


class Broadcast(models.Model):
    """Send <template> to every contact matching <audience>, once.

    draft → scheduled → sending → sent; sending ⇄ paused (by a person or by the
    reputation guard, with the reason); anything not yet sent → cancelled.
    """

    class Status(models.TextChoices):
        DRAFT = "draft", "draft"
        SCHEDULED = "scheduled", "scheduled"
        SENDING = "sending", "sending"
        PAUSED = "paused", "paused"
        SENT = "sent", "sent"
        CANCELLED = "cancelled", "cancelled"

    # Edits (audience, template, purpose) are only allowed before sending starts.
    EDITABLE = (Status.DRAFT, Status.SCHEDULED)
    # Statuses whose queued messages the delivery engine may claim and hand off. SENT is
    # in: a message replayed after the broadcast finished goes out. A paused broadcast's
    # mail waits for the resume; a cancelled one's is cancelled by the sweeper.
    MAY_SEND = (Status.SENDING, Status.SENT)
    # The reputation guard's name in paused_by; a person is "admin:<username>".
    PAUSED_BY_GUARD = "reputation guard"

    name = models.CharField(max_length=200)
    template = models.ForeignKey(
        "campaigns.EmailTemplate", on_delete=models.PROTECT, related_name="broadcasts"
    )
    template_version = models.ForeignKey(
        "campaigns.TemplateVersion",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        editable=False,
        related_name="+",
        help_text="The template's latest published version when sending started; every message pins it.",
    )
    purpose = models.CharField(
        max_length=100,
        default="marketing",
        help_text="The topic recipients can opt out of, e.g. 'marketing', 'newsletter'.",
    )
    audience = models.JSONField(
        default=dict,
        blank=True,
        help_text='Rule language over contact fields, e.g. {"field": "contact.plan", "op": "eq", "value": "pro"}. '
        "Empty means every contact. See the README, 'The rule language'.",
    )
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.DRAFT)
    scheduled_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True, help_text="Sent or cancelled at.")
    paused_at = models.DateTimeField(null=True, blank=True)
    paused_by = models.CharField(
        max_length=150, blank=True, help_text="'reputation guard', or 'admin:<username>' for a person."
    )
    paused_reason = models.CharField(max_length=255, blank=True)
    resumed_at = models.DateTimeField(
        null=True,
        blank=True,
        editable=False,
        help_text="Last resumed at; the reputation guard only counts mail sent since then.",
    )
    start_error = models.CharField(
        max_length=255,
        blank=True,
        editable=False,
        help_text="Why the scheduler could not start it at its scheduled time (it went back to draft).",
    )
    cancelled_reason = models.CharField(max_length=255, blank=True)

    # Materialisation: contacts are turned into messages in id order, one batch per
    # transaction; `cursor` is the last contact id considered, committed with the batch.
    # Only contacts that existed when sending started (id <= contact_id_limit) are in it.
    cursor = models.BigIntegerField(default=0, editable=False)
    contact_id_limit = models.BigIntegerField(null=True, blank=True, editable=False)
    audience_done_at = models.DateTimeField(
        null=True, blank=True, editable=False, help_text="Every contact of the audience has its message."
    )
    audience_size = models.PositiveIntegerField(
        default=0, editable=False, help_text="Contacts that matched the audience so far."
    )
    recipients = models.PositiveIntegerField(
        default=0,
        editable=False,
        help_text="Messages created. Fewer than the audience when a contact's region may not be "
        "processed or its address already has this broadcast.",
    )
    # Message counts by status, refreshed by the sweeper (the admin list reads this
    # instead of counting a big broadcast's messages on every page view).
    stats = models.JSONField(default=dict, blank=True, editable=False)
    stats_updated_at = models.DateTimeField(null=True, blank=True, editable=False)

    created_by = models.CharField(max_length=150, blank=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-id"]
        indexes = [
            # The sweeper looks for due, sending and recently finished broadcasts.
            models.Index(fields=["status", "scheduled_at"], name="broadcast_status"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=~Q(status="scheduled") | Q(scheduled_at__isnull=False),
                name="broadcast_scheduled_has_time",
            ),
            models.CheckConstraint(
                condition=Q(status__in=["draft", "scheduled", "cancelled"])
                | Q(template_version__isnull=False),
                name="broadcast_started_has_version",
            ),
        ]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        from campaigns.rules import AudienceError, audience_validate

        try:
            audience_validate(self.audience)
        except AudienceError as err:
            raise ValidationError({"audience": str(err)}) from err

    @property
    def is_editable(self) -> bool:
        return self.status in self.EDITABLE
