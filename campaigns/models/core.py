"""The campaigns data model: contacts, event types, the outbox, templates, automations,
messages. Rows are the source of truth; statuses say where each unit of work is."""

from __future__ import annotations

import hashlib
from datetime import timedelta

from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator
from django.db import models
from django.db.models import Q
from django.db.models.functions import Cast, Lower, Upper
from django.utils import timezone

EVENT_TYPE_NAME = RegexValidator(
    r"^[a-z0-9][a-z0-9_.\-]{0,99}$",
    "Use lowercase letters, digits, '.', '_' and '-', like 'user.signed_up'.",
)


class Contact(models.Model):
    """A person the application knows by its own user id (upserted by identify())."""

    user_id = models.CharField(max_length=255, unique=True)
    email = models.EmailField(max_length=254, db_index=True)
    attributes = models.JSONField(default=dict, blank=True)
    region = models.CharField(
        max_length=32, blank=True, help_text="Data-residency region, e.g. 'eu', 'us'. Empty means unknown."
    )
    do_not_sell = models.BooleanField(default=False, help_text="CCPA: the contact opted out of sale/sharing.")
    erased_at = models.DateTimeField(
        null=True, blank=True, help_text="GDPR erasure: PII removed at this time."
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-id"]
        indexes = [
            # For email__iexact, which Django writes as UPPER("email"::text) = UPPER(%s):
            # the unsubscribe and preference paths find every contact with an address
            # however identify() spelled it (suppression.services).
            models.Index(Upper(Cast("email", output_field=models.TextField())), name="contact_email_iexact"),
        ]

    def __str__(self) -> str:
        return f"{self.user_id} <{self.email}>"

    def as_context(self) -> dict[str, object]:
        """The contact as rules and templates see it: attributes flattened in, with
        email and user_id always winning over an attribute of the same name."""
        return {**self.attributes, "email": self.email, "user_id": self.user_id}


class EventType(models.Model):
    """A kind of event the application emits, with the schema its payload must fit."""

    name = models.CharField(max_length=100, unique=True, validators=[EVENT_TYPE_NAME])
    description = models.TextField(blank=True)
    schema = models.JSONField(
        default=dict,
        blank=True,
        help_text='Payload schema, e.g. {"fields": {"plan": {"type": "string", "required": true}}}. '
        "See the README, 'Event types and payload schemas'.",
    )
    active = models.BooleanField(default=True, help_text="Inactive event types are refused at emit time.")
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        from campaigns.schemas import SchemaError, validate_schema_definition

        try:
            validate_schema_definition(self.schema)
        except SchemaError as err:
            raise ValidationError({"schema": str(err)}) from err


class ApiSource(models.Model):
    """A service outside the monolith allowed to POST /api/events/ with its own token.

    Only a SHA-256 of the token is stored; the token itself is shown once at creation.
    """

    name = models.CharField(max_length=100, unique=True)
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    token_prefix = models.CharField(max_length=12, editable=False)
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        verbose_name = "API source"

    def __str__(self) -> str:
        return self.name

    @staticmethod
    def hash_token(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()


class OutboxEvent(models.Model):
    """One emitted event. Written in the caller's transaction; processed by workers."""

    class Status(models.TextChoices):
        PENDING = "pending", "pending"
        PROCESSING = "processing", "processing"
        PROCESSED = "processed", "processed"
        RETRYING = "retrying", "failed, will retry"
        DEAD = "dead", "dead (retries exhausted)"
        REFUSED = "refused", "refused (not allowed to process)"

    # Unique and indexed through Meta, not unique=True / db_index=True: on Postgres those
    # also build a varchar_pattern_ops index for LIKE 'x%', which nothing here asks for
    # (the admin's search is exact), and every emit() paid for two more index inserts.
    event_id = models.CharField(max_length=255)
    event_type = models.ForeignKey(EventType, on_delete=models.PROTECT, related_name="events")
    user_id = models.CharField(max_length=255)
    payload = models.JSONField(default=dict, blank=True)
    source = models.CharField(max_length=100, blank=True)
    occurred_at = models.DateTimeField()
    created_at = models.DateTimeField(default=timezone.now)

    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    available_at = models.DateTimeField(default=timezone.now)
    locked_until = models.DateTimeField(null=True, blank=True)
    processed_at = models.DateTimeField(null=True, blank=True)
    result = models.CharField(max_length=255, blank=True, help_text="What processing decided, in words.")
    last_error = models.TextField(blank=True)
    error_history = models.JSONField(default=list, blank=True)

    class Meta:
        ordering = ["-id"]
        indexes = [
            # The claim query only ever looks at unfinished rows; keep that index small.
            models.Index(
                fields=["available_at", "id"],
                name="outbox_claimable",
                condition=Q(status__in=["pending", "processing", "retrying"]),
            ),
            models.Index(fields=["status", "-id"], name="outbox_status"),
            models.Index(fields=["user_id"], name="outbox_user_id"),
        ]
        constraints = [models.UniqueConstraint(fields=["event_id"], name="outbox_event_id_unique")]

    def __str__(self) -> str:
        return f"{self.event_type_id}:{self.event_id}"


class EmailTemplate(models.Model):
    """A named email template; its content lives in numbered TemplateVersions."""

    name = models.CharField(max_length=200, unique=True)
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def latest_published(self) -> TemplateVersion | None:
        return self.versions.filter(status=TemplateVersion.Status.PUBLISHED).order_by("-number").first()


class TemplateVersion(models.Model):
    """One version of a template. Drafts may be edited; published versions never change,
    so every Message can say exactly what it was rendered from."""

    class Status(models.TextChoices):
        DRAFT = "draft", "draft"
        PUBLISHED = "published", "published"

    template = models.ForeignKey(EmailTemplate, on_delete=models.PROTECT, related_name="versions")
    number = models.PositiveIntegerField()
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.DRAFT)
    subject = models.CharField(max_length=998)
    html = models.TextField(help_text="Django template syntax, restricted: see the README.")
    text = models.TextField(blank=True, help_text="Optional; generated from the HTML when empty.")
    declared_sensitive_fields = models.JSONField(
        default=list,
        blank=True,
        help_text='Sensitive payload fields this version may use, e.g. ["card_last4"].',
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    published_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["template", "-number"]
        constraints = [
            models.UniqueConstraint(fields=["template", "number"], name="template_version_number_unique"),
            models.CheckConstraint(
                condition=Q(status="draft") | Q(published_at__isnull=False),
                name="template_version_published_has_date",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.template.name} v{self.number} ({self.status})"

    @property
    def is_published(self) -> bool:
        return self.status == self.Status.PUBLISHED


class Automation(models.Model):
    """A marketer's rule: when <event type> happens and <conditions> hold, send <template>."""

    name = models.CharField(max_length=200, unique=True)
    trigger = models.ForeignKey(EventType, on_delete=models.PROTECT, related_name="automations")
    conditions = models.JSONField(
        default=dict,
        blank=True,
        help_text='Rule language, e.g. {"field": "payload.plan", "op": "eq", "value": "pro"}. '
        "Empty means always. See the README, 'The rule language'.",
    )
    template = models.ForeignKey(EmailTemplate, on_delete=models.PROTECT, related_name="automations")
    pinned_version = models.ForeignKey(
        TemplateVersion,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="+",
        help_text="Leave empty to use the latest published version at the time each event is processed.",
    )
    delay = models.DurationField(
        default=timedelta(0), blank=True, help_text="Wait this long after the event."
    )
    purpose = models.CharField(
        max_length=100,
        default="marketing",
        help_text="The topic recipients can opt out of, e.g. 'marketing', 'product-updates'.",
    )
    is_transactional = models.BooleanField(
        default=False,
        help_text="Transactional mail (receipts, password resets) ignores topic opt-outs, never suppression.",
    )
    active = models.BooleanField(default=False)
    paused_reason = models.CharField(
        max_length=255, blank=True, help_text="Why it was paused automatically (reputation guard)."
    )
    paused_at = models.DateTimeField(null=True, blank=True)
    resumed_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="When it was last switched on; the reputation guard judges it on mail sent since.",
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]
        indexes = [models.Index(fields=["trigger", "active"], name="automation_trigger")]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        from campaigns.rules import RuleError, validate_rule

        errors: dict[str, str] = {}
        try:
            validate_rule(self.conditions)
        except RuleError as err:
            errors["conditions"] = str(err)
        if self.pinned_version_id and self.template_id:
            version = self.pinned_version
            if version is not None and version.template_id != self.template_id:
                errors["pinned_version"] = "The pinned version belongs to another template."
            elif version is not None and not version.is_published:
                errors["pinned_version"] = "Only a published version can be pinned."
        if self.delay is not None and self.delay < timedelta(0):
            errors["delay"] = "The delay cannot be negative."
        if errors:
            raise ValidationError(errors)


class SeedList(models.Model):
    """Internal addresses (the team, inbox-placement probes) used to preview and test."""

    name = models.CharField(max_length=200, unique=True)
    addresses = models.TextField(help_text="One email address per line.")
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    def __str__(self) -> str:
        return self.name

    @property
    def address_list(self) -> list[str]:
        return [line.strip() for line in self.addresses.splitlines() if line.strip()]


class Message(models.Model):
    """One email to one contact, caused by one (event, automation) pair at most once."""

    class Status(models.TextChoices):
        QUEUED = "queued", "queued"
        CLAIMED = "claimed", "claimed by a worker"
        SENDING = "sending", "handed to the ESP"
        UNKNOWN = "unknown", "outcome unknown (awaiting ESP webhook)"
        SENT = "sent", "sent (accepted by the ESP)"
        DELIVERED = "delivered", "delivered"
        OPENED = "opened", "opened"
        CLICKED = "clicked", "clicked"
        BOUNCED = "bounced", "bounced"
        COMPLAINED = "complained", "complained (marked as spam)"
        UNSUBSCRIBED = "unsubscribed", "unsubscribed"
        SUPPRESSED = "suppressed", "not sent: suppressed"
        FAILED = "failed", "failed permanently"
        DEAD = "dead", "dead (retries exhausted)"
        CANCELLED = "cancelled", "not sent: cancelled"

    # States a worker may still act on; everything else is final until a person acts.
    IN_PROGRESS = (Status.QUEUED, Status.CLAIMED, Status.SENDING, Status.UNKNOWN)

    # Unique (Meta.constraints), not unique=True: on Postgres a field-level unique or
    # db_index on a CharField also builds a varchar_pattern_ops "_like" index for LIKE
    # queries nobody makes here, and every status change rewrites every index of this
    # table (status is indexed, so no update is HOT).
    idempotency_key = models.CharField(max_length=300)
    event = models.ForeignKey(
        OutboxEvent, on_delete=models.SET_NULL, null=True, blank=True, related_name="messages"
    )
    automation = models.ForeignKey(
        Automation, on_delete=models.SET_NULL, null=True, blank=True, related_name="messages"
    )
    broadcast = models.ForeignKey(
        "campaigns.Broadcast",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="messages",
        db_index=False,  # see message_broadcast_status
    )
    contact = models.ForeignKey(
        Contact, on_delete=models.SET_NULL, null=True, blank=True, related_name="messages"
    )
    to_email = models.EmailField(max_length=254)
    template_version = models.ForeignKey(TemplateVersion, on_delete=models.PROTECT, related_name="messages")
    purpose = models.CharField(max_length=100)
    transactional = models.BooleanField(default=False)

    status = models.CharField(max_length=20, choices=Status.choices, default=Status.QUEUED)
    status_reason = models.CharField(max_length=255, blank=True)
    send_after = models.DateTimeField(default=timezone.now)
    priority = models.PositiveSmallIntegerField(
        default=100, help_text="Lower is sooner: under a warm-up cap, low numbers go first."
    )
    attempts = models.PositiveIntegerField(default=0, help_text="Hand-offs to the ESP.")
    claims = models.PositiveIntegerField(
        default=0,
        help_text="Times a worker claimed it (a message that keeps killing its worker is dead-lettered).",
    )
    locked_until = models.DateTimeField(null=True, blank=True)
    resent_after_unknown = models.BooleanField(
        default=False, help_text="Already resent once after its outcome was unknown; never again."
    )
    esp_message_id = models.CharField(max_length=255, blank=True)  # indexed in Meta, see above
    subject = models.CharField(max_length=998, blank=True, help_text="As rendered.")
    last_error = models.TextField(blank=True)
    error_history = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    sent_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-id"]
        indexes = [
            models.Index(
                fields=["priority", "send_after", "id"],
                name="message_claimable",
                condition=Q(status__in=["queued", "claimed", "sending"]),
            ),
            models.Index(fields=["status", "-id"], name="message_status"),
            models.Index(fields=["to_email"], name="message_to_email"),
            models.Index(fields=["sent_at"], name="message_sent_at"),
            models.Index(fields=["esp_message_id"], name="message_esp_message_id"),
            # Instead of the FK's own index: serves the FK, a broadcast's counts by
            # status and its "anything still in progress?" check; automation mail
            # (broadcast null) is not in it.
            models.Index(
                fields=["broadcast", "status"],
                name="message_broadcast_status",
                condition=Q(broadcast__isnull=False),
            ),
        ]
        constraints = [
            models.UniqueConstraint(fields=["idempotency_key"], name="message_idempotency_key_unique"),
            # One message per mailbox per broadcast, whatever the spelling of the
            # address ("Bob@Example.com" is bob@example.com's mailbox): two contacts
            # sharing an address, even in different materialisation batches, get one.
            models.UniqueConstraint(
                Lower("to_email"),
                "broadcast",
                condition=Q(broadcast__isnull=False),
                name="message_broadcast_address",
            ),
        ]

    def __str__(self) -> str:
        return f"message {self.pk} to {self.to_email} ({self.status})"
