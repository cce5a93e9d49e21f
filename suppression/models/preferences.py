"""Topics recipients can opt out of. The opt-outs themselves are Suppression rows
(topic = the slug, reason = unsubscribe), so there is one list to check before sending."""

from __future__ import annotations

from django.db import models
from django.utils import timezone


class Topic(models.Model):
    """A kind of mail a recipient can choose to get or not: one automation purpose."""

    slug = models.SlugField(
        max_length=100,
        unique=True,
        help_text="The purpose automations are tagged with, e.g. 'marketing', 'product-updates'. "
        "Opt-outs are stored against it, so it cannot be changed once created.",
    )
    name = models.CharField(max_length=200, help_text="What recipients see, e.g. 'Product news'.")
    description = models.TextField(blank=True, help_text="One sentence for the preference centre.")
    public = models.BooleanField(
        default=True, help_text="Listed in the preference centre, where recipients can opt in and out."
    )
    position = models.PositiveIntegerField(default=0, help_text="Order in the preference centre.")
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["position", "name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.slug})"
