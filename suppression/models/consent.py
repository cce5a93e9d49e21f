"""The consent ledger (who agreed to what, when, seeing which notice, on what evidence),
the privacy audit log, and the hashed suppressions that outlive a GDPR erasure.

The ledger is append-only: GDPR Art. 7(1) puts the burden of proof on us ("the
controller shall be able to demonstrate that the data subject has consented"), so a
withdrawal is a new row and history is never rewritten. The single exception is erasure
(Art. 17), which drops the IP address, user agent and evidence of a person's rows and
keeps the action, time, source, notice and a keyed hash of the address.
"""

from __future__ import annotations

from typing import Any

from django.db import models
from django.db.models import Q
from django.utils import timezone

__all__ = [
    "AuditLogEntry",
    "ConsentNotice",
    "ConsentRecord",
    "HashedSuppression",
    "ImmutableRecordError",
]


class ImmutableRecordError(Exception):
    """An attempt to change a row the ledger promises never to change."""


class ConsentNotice(models.Model):
    """The text a person was shown when asked for consent. Once a ConsentRecord refers to
    a version, that version never changes: publish a new version instead."""

    name = models.CharField(max_length=100, help_text="e.g. 'newsletter-signup'.")
    version = models.CharField(max_length=50, help_text="e.g. '2025-01' or '3'.")
    text = models.TextField(help_text="Exactly what the person saw.")
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["name", "-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["name", "version"], name="consent_notice_name_version_unique")
        ]

    def __str__(self) -> str:
        return f"{self.name} v{self.version}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        # A guard, not a side effect: evidence must keep pointing at the text that was shown.
        if not self._state.adding and self.is_used:
            raise ImmutableRecordError(
                f"Consent notice {self} is referenced by consent records; create a new version instead."
            )
        super().save(*args, **kwargs)

    @property
    def is_used(self) -> bool:
        return self.pk is not None and ConsentRecord.objects.filter(notice_id=self.pk).exists()


class ConsentRecordQuerySet(models.QuerySet["ConsentRecord"]):
    """Bulk updates and deletes are refused: the ledger is append-only.

    (Deleting a Contact still works: Django nulls the foreign key through the base
    manager, and the record stays as evidence keyed by the email hash.)
    """

    def update(self, **kwargs: Any) -> int:
        raise ImmutableRecordError("Consent records are append-only: record a new row instead.")

    def delete(self) -> tuple[int, dict[str, int]]:
        raise ImmutableRecordError("Consent records are append-only and are never deleted.")

    def scrub_personal_data(self) -> int:
        """GDPR erasure, the one permitted change: drop what identifies the device and
        any free-form evidence; keep action, time, source, notice and the email hash."""
        return super().update(ip_address=None, user_agent="", evidence={"erased": True})


class ConsentRecord(models.Model):
    """One consent event for one contact and one purpose. The latest granted/withdrawn
    row decides; a "requested" row (double opt-in pending) decides nothing."""

    class Action(models.TextChoices):
        REQUESTED = "requested", "requested (awaiting confirmation)"
        GRANTED = "granted", "granted"
        WITHDRAWN = "withdrawn", "withdrawn"

    # SET_NULL rather than PROTECT: a contact may still be deleted outright, and the
    # record survives as evidence keyed by email_hash (erasure itself keeps the contact).
    contact = models.ForeignKey(
        "campaigns.Contact",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="consent_records",
    )
    email_hash = models.CharField(
        max_length=64, db_index=True, help_text="Keyed HMAC-SHA256 of the address at the time."
    )
    purpose = models.CharField(max_length=100)
    action = models.CharField(max_length=10, choices=Action.choices)
    occurred_at = models.DateTimeField(default=timezone.now)
    source = models.CharField(
        max_length=100, help_text="How it was collected: 'signup-form', 'double-opt-in', 'admin', 'api'…"
    )
    ip_address = models.GenericIPAddressField(null=True, blank=True)
    user_agent = models.CharField(max_length=512, blank=True)
    notice = models.ForeignKey(
        ConsentNotice, on_delete=models.PROTECT, null=True, blank=True, related_name="records"
    )
    evidence = models.JSONField(default=dict, blank=True)

    objects = ConsentRecordQuerySet.as_manager()

    class Meta:
        ordering = ["-occurred_at", "-id"]
        indexes = [
            models.Index(fields=["contact", "purpose", "-occurred_at", "-id"], name="consent_record_latest"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(action__in=["requested", "granted", "withdrawn"]),
                name="consent_record_action_valid",
            )
        ]

    def __str__(self) -> str:
        return f"{self.purpose}: {self.action} ({self.source}, {self.occurred_at:%Y-%m-%d %H:%M})"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if not self._state.adding:
            raise ImmutableRecordError("Consent records are append-only: record a new row instead.")
        super().save(*args, **kwargs)


class HashedSuppression(models.Model):
    """An address erased under GDPR Art. 17 that must never be emailed again. Only a
    keyed HMAC of the normalised address is kept (see suppression.privacy.email_hash)."""

    email_hash = models.CharField(max_length=64, unique=True)
    reason = models.CharField(max_length=255)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.email_hash[:12]}… ({self.reason})"


class AuditLogEntry(models.Model):
    """Every export, erasure and staff-made consent change, with who did it and why.
    The contact is referenced by id and email hash, never by its address."""

    class Action(models.TextChoices):
        EXPORT = "export", "export (GDPR Art. 15/20)"
        ERASE = "erase", "erasure (GDPR Art. 17)"
        CONSENT_REQUESTED = "consent_requested", "consent requested"
        CONSENT_GRANTED = "consent_granted", "consent granted"
        CONSENT_WITHDRAWN = "consent_withdrawn", "consent withdrawn"
        SUPPRESSION_LIFTED = "suppression_lifted", "hashed suppression lifted"

    action = models.CharField(max_length=30, choices=Action.choices)
    # Not a foreign key: the entry must outlive the contact and never cascade.
    contact_pk = models.BigIntegerField(null=True, blank=True, db_index=True)
    email_hash = models.CharField(max_length=64, blank=True, db_index=True)
    actor = models.CharField(max_length=150)
    reason = models.TextField(blank=True)
    detail = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "privacy audit log"
        permissions = [
            ("export_contact", "Can export a contact's personal data (GDPR Art. 15/20)"),
            ("erase_contact", "Can erase a contact's personal data (GDPR Art. 17)"),
        ]

    def __str__(self) -> str:
        return f"{self.get_action_display()} of contact {self.contact_pk} by {self.actor}"
