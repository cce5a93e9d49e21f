"""GDPR export and erasure: everything of one contact out, everything of it gone, nothing
of anyone else touched; the hashed suppression; the audit log; the admin actions and the
management commands."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tempfile
from typing import Any
from unittest import mock

from django.apps import apps
from django.conf import settings
from django.contrib import admin
from django.contrib.admin.models import CHANGE, LogEntry
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.contrib.contenttypes.models import ContentType
from django.contrib.messages import get_messages
from django.core.management import CommandError, call_command
from django.db import models
from django.db.models import Q, TextField
from django.db.models.functions import Cast
from django.test import TestCase, override_settings
from django.urls import path
from django.utils import timezone

from campaigns.models import Contact, Message, OutboxEvent
from suppression.admin_compliance import ContactPrivacyActionsMixin
from suppression.consent import consent_grant, consent_withdraw
from suppression.models import Suppression, SuppressionLogEntry
from suppression.models.consent import AuditLogEntry, ConsentRecord, HashedSuppression
from suppression.privacy import (
    contact_erase,
    contact_export,
    email_hash,
    hashed_suppression_lift,
    is_hashed_suppressed,
)
from suppression.services import suppression_add
from tests import factories

ADA_EMAIL = "ada.lovelace@example.com"
ADA_USER = "u-ada-7421"
BOB_EMAIL = "bob.babbage@example.com"
BOB_USER = "u-bob-1234"


class ContactAdminWithPrivacyActions(ContactPrivacyActionsMixin, admin.ModelAdmin):
    """What campaigns' ContactAdmin does: take the two actions from the mixin."""

    list_display = ["user_id", "email"]


test_site = admin.AdminSite(name="privacy_test_admin")
test_site.register(Contact, ContactAdminWithPrivacyActions)
urlpatterns = [path("admin/", test_site.urls)]
CHANGELIST = "/admin/campaigns/contact/"


def tracking_event_model() -> type[models.Model] | None:
    try:
        return apps.get_model("webhooks", "TrackingEvent")
    except LookupError:
        return None


def touched_models() -> list[type[models.Model]]:
    found = [
        Contact,
        Message,
        OutboxEvent,
        ConsentRecord,
        Suppression,
        SuppressionLogEntry,
        HashedSuppression,
        AuditLogEntry,
        LogEntry,
    ]
    tracking = tracking_event_model()
    return [*found, tracking] if tracking else found


def rows_mentioning(needle: str) -> dict[str, int]:
    """Rows, per model, with `needle` in any text or JSON column (case-insensitive)."""
    found = {}
    for model in touched_models():
        names = [
            f.name
            for f in model._meta.concrete_fields
            if isinstance(f, models.CharField | models.TextField | models.JSONField)
        ]
        condition = Q()
        for name in names:
            condition |= Q(**{f"as_text_{name}__icontains": needle})
        count = (
            model._default_manager.annotate(**{f"as_text_{name}": Cast(name, TextField()) for name in names})
            .filter(condition)
            .count()
        )
        if count:
            found[model._meta.label] = count
    return found


class PrivacyTestCase(TestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        cls.ada = factories.contact(user_id=ADA_USER, email="Ada.Lovelace@Example.com", first_name="Ada")
        cls.ada.region = "gb"
        cls.ada.save(update_fields=["region"])
        cls.bob = factories.contact(user_id=BOB_USER, email=BOB_EMAIL, first_name="Bob")
        signup = factories.event_type()
        invite = factories.event_type("user.invited", schema={})
        version = factories.published_version(subject="Hello")
        automation = factories.automation(signup, version, name="Welcome")

        cls.ada_event = factories.outbox_event(
            signup, ADA_USER, {"plan": "pro"}, event_id=f"signup-{ADA_EMAIL}", source="web"
        )
        cls.ada_event.result = f"no contact with user_id {ADA_USER!r} (identify() it first)"
        cls.ada_event.save(update_fields=["result"])
        cls.bob_event = factories.outbox_event(signup, BOB_USER, {"plan": "free"}, event_id="signup-bob")
        # Bob invited Ada: Bob's event, mentioning Ada's address.
        cls.invite = factories.outbox_event(
            invite, BOB_USER, {"invitee": ADA_EMAIL, "note": "join us"}, event_id="invite-1"
        )

        cls.ada_sent = factories.message(
            version,
            cls.ada,
            cls.ada_event,
            automation=automation,
            status=Message.Status.BOUNCED,
            subject="Hello Ada",
            esp_message_id="esp-ada-1",
            sent_at=timezone.now(),
            last_error=f"406 inactive recipient: {ADA_EMAIL}",
            error_history=[{"error": f"first try for <{ADA_EMAIL}>"}],
        )
        cls.ada_queued = factories.message(version, cls.ada, subject="Later")
        cls.bob_sent = factories.message(
            version, cls.bob, cls.bob_event, status=Message.Status.SENT, subject="Hello Bob"
        )

        consent_grant(
            contact=cls.ada,
            purpose="marketing",
            source="signup-form",
            ip="203.0.113.9",
            user_agent="AdaBrowser/1.0",
            evidence={"typed_email": ADA_EMAIL},
        )
        consent_withdraw(contact=cls.ada, purpose="marketing", source="api", ip="203.0.113.10")
        consent_grant(contact=cls.bob, purpose="marketing", source="signup-form", ip="198.51.100.1")

        suppression_add(email=ADA_EMAIL, reason=Suppression.Reason.HARD_BOUNCE, source="webhook:postmark")
        suppression_add(
            email=ADA_EMAIL, reason=Suppression.Reason.UNSUBSCRIBE, source="unsubscribe", topic="newsletter"
        )
        suppression_add(email=BOB_EMAIL, reason=Suppression.Reason.COMPLAINT, source="webhook:postmark")

        tracking = tracking_event_model()
        cls.tracking_available = tracking is not None
        if tracking is not None:
            cls.ada_tracking = tracking.objects.create(  # type: ignore[attr-defined]
                esp="postmark",
                esp_event_id="pm-1",
                event_type="bounced",
                message=cls.ada_sent,
                esp_message_id="esp-ada-1",
                recipient=ADA_EMAIL,
                occurred_at=timezone.now(),
                mta_response=f"550 5.1.1 <{ADA_EMAIL}>: user unknown",
                esp_event={"Email": ADA_EMAIL, "RecordType": "Bounce"},
            )
            cls.bob_tracking = tracking.objects.create(  # type: ignore[attr-defined]
                esp="postmark",
                esp_event_id="pm-2",
                event_type="delivered",
                message=cls.bob_sent,
                esp_message_id="esp-bob-1",
                recipient=BOB_EMAIL,
                occurred_at=timezone.now(),
                esp_event={"Recipient": BOB_EMAIL},
            )

        cls.root = get_user_model().objects.create_superuser("root", "root@example.org", "pw")
        LogEntry.objects.create(
            user=cls.root,
            content_type=ContentType.objects.get_for_model(Contact),
            object_id=str(cls.ada.pk),
            object_repr=str(cls.ada),
            action_flag=CHANGE,
            change_message=f"Changed email to {ADA_EMAIL}.",
        )


class ExportTests(PrivacyTestCase):
    def test_export_contains_everything_of_the_contact(self) -> None:
        data = contact_export(contact=self.ada, actor="ops:alice", reason="ticket 42")

        json.dumps(data)  # plain JSON, no encoder needed
        self.assertEqual(data["contact"]["user_id"], ADA_USER)
        self.assertEqual(data["contact"]["email"], "Ada.Lovelace@Example.com")
        self.assertEqual(data["contact"]["attributes"], {"first_name": "Ada"})
        self.assertEqual(data["contact"]["region"], "gb")
        self.assertEqual(
            [(c["action"], c["source"], c["ip_address"]) for c in data["consents"]],
            [("granted", "signup-form", "203.0.113.9"), ("withdrawn", "api", "203.0.113.10")],
        )
        self.assertEqual(data["consents"][0]["user_agent"], "AdaBrowser/1.0")
        self.assertEqual([e["event_id"] for e in data["events"]], [f"signup-{ADA_EMAIL}"])
        self.assertEqual(data["events"][0]["payload"], {"plan": "pro"})
        self.assertEqual({m["id"] for m in data["messages"]}, {self.ada_sent.pk, self.ada_queued.pk})
        self.assertIn("Hello Ada", [m["subject"] for m in data["messages"]])
        self.assertEqual(
            sorted((s["reason"], s["topic"]) for s in data["suppressions"]),
            [("hard_bounce", ""), ("unsubscribe", "newsletter")],
        )
        if self.tracking_available:
            self.assertEqual([t["esp_event_id"] for t in data["tracking_events"]], ["pm-1"])

    def test_export_contains_nothing_of_another_contact(self) -> None:
        text = json.dumps(contact_export(contact=self.ada)).lower()

        for needle in (BOB_EMAIL, BOB_USER, "signup-bob", "invite-1", "hello bob", "198.51.100.1", "pm-2"):
            with self.subTest(needle=needle):
                self.assertNotIn(needle, text)

    def test_export_is_audited_by_reference_not_by_address(self) -> None:
        contact_export(contact=self.ada, actor="ops:alice", reason="ticket 42")

        entry = AuditLogEntry.objects.get(action=AuditLogEntry.Action.EXPORT)
        self.assertEqual(
            (entry.contact_pk, entry.actor, entry.reason), (self.ada.pk, "ops:alice", "ticket 42")
        )
        self.assertEqual(entry.email_hash, email_hash(ADA_EMAIL))
        self.assertEqual(entry.detail["messages"], 2)
        self.assertNotIn("AuditLogEntry", str(rows_mentioning(ADA_EMAIL)))


class ErasureTests(PrivacyTestCase):
    def test_the_address_and_user_id_are_in_no_row_of_any_table_touched(self) -> None:
        AuditLogEntry.objects.create(
            action=AuditLogEntry.Action.EXPORT, actor="ops", reason=f"asked by {ADA_EMAIL} by mail"
        )
        before = rows_mentioning(ADA_EMAIL)
        expected = {
            "campaigns.Contact",
            "campaigns.Message",
            "campaigns.OutboxEvent",
            "suppression.ConsentRecord",
            "suppression.Suppression",
            "suppression.SuppressionLogEntry",
            "suppression.AuditLogEntry",
            "admin.LogEntry",
        }
        if self.tracking_available:
            expected.add("webhooks.TrackingEvent")
        self.assertEqual(set(before), expected)  # the check can see every place
        self.assertIn("campaigns.OutboxEvent", rows_mentioning(ADA_USER))

        contact_erase(contact=self.ada, actor="ops:alice", reason=f"Art. 17 request from {ADA_EMAIL}")

        self.assertEqual(rows_mentioning(ADA_EMAIL), {})
        self.assertEqual(rows_mentioning(ADA_USER), {})
        self.assertEqual(rows_mentioning("203.0.113.9"), {})
        self.assertEqual(rows_mentioning("AdaBrowser"), {})

    def test_another_contact_is_untouched(self) -> None:
        before = rows_mentioning(BOB_EMAIL), rows_mentioning(BOB_USER)
        contact_erase(contact=self.ada, actor="ops", reason="request")
        self.assertEqual((rows_mentioning(BOB_EMAIL), rows_mentioning(BOB_USER)), before)
        self.bob.refresh_from_db()
        self.assertEqual((self.bob.email, self.bob.attributes), (BOB_EMAIL, {"first_name": "Bob"}))
        self.assertIsNone(self.bob.erased_at)
        self.assertTrue(Suppression.objects.filter(email=BOB_EMAIL).exists())
        self.assertFalse(is_hashed_suppressed(BOB_EMAIL))

    def test_the_contact_is_anonymised_in_place(self) -> None:
        contact_erase(contact=self.ada, actor="ops", reason="request")

        self.ada.refresh_from_db()
        self.assertEqual(self.ada.email, f"erased+{self.ada.pk}@erased.invalid")
        self.assertEqual(self.ada.attributes, {})
        self.assertIsNotNone(self.ada.erased_at)
        self.assertTrue(self.ada.user_id.startswith("erased:"))
        self.ada_event.refresh_from_db()
        self.assertEqual((self.ada_event.payload, self.ada_event.user_id), ({}, self.ada.user_id))
        self.invite.refresh_from_db()
        self.assertEqual(self.invite.payload, {"invitee": "[erased]", "note": "join us"})

    def test_messages_lose_address_and_subject_and_unsent_ones_are_stopped(self) -> None:
        result = contact_erase(contact=self.ada, actor="ops", reason="request")

        self.ada_sent.refresh_from_db()
        self.assertEqual(self.ada_sent.to_email, f"erased+{self.ada.pk}@erased.invalid")
        self.assertEqual(self.ada_sent.subject, "")
        self.assertEqual(self.ada_sent.status, Message.Status.BOUNCED)  # statistics stay
        self.ada_queued.refresh_from_db()
        self.assertEqual(self.ada_queued.status, Message.Status.SUPPRESSED)
        self.assertEqual(self.ada_queued.status_reason, "contact erased (GDPR Art. 17)")
        self.assertEqual((result.messages, result.messages_stopped), (2, 1))

    def test_a_message_with_unknown_outcome_is_never_resent_to_the_placeholder(self) -> None:
        Message.objects.filter(pk=self.ada_queued.pk).update(status=Message.Status.UNKNOWN)
        result = contact_erase(contact=self.ada, actor="ops", reason="request")

        self.ada_queued.refresh_from_db()
        self.assertEqual(self.ada_queued.status, Message.Status.UNKNOWN)
        self.assertTrue(self.ada_queued.resent_after_unknown)
        self.assertEqual(result.messages_in_flight, 1)

    def test_consent_records_keep_action_time_and_source_but_not_the_device(self) -> None:
        before = list(
            ConsentRecord.objects.filter(contact=self.ada)
            .order_by("id")
            .values_list("action", "occurred_at", "source")
        )
        contact_erase(contact=self.ada, actor="ops", reason="request")

        rows = ConsentRecord.objects.filter(contact=self.ada).order_by("id")
        self.assertEqual(list(rows.values_list("action", "occurred_at", "source")), before)
        self.assertEqual(set(rows.values_list("ip_address", "user_agent")), {(None, "")})
        self.assertEqual(rows[0].email_hash, email_hash(ADA_EMAIL))
        bob_grant = ConsentRecord.objects.get(contact=self.bob)
        self.assertEqual(bob_grant.ip_address, "198.51.100.1")

    def test_a_hashed_suppression_replaces_the_plain_ones_and_blocks_the_address(self) -> None:
        self.assertFalse(is_hashed_suppressed(ADA_EMAIL))

        contact_erase(contact=self.ada, actor="ops", reason="request")

        self.assertFalse(Suppression.objects.filter(email=ADA_EMAIL).exists())
        hashed = HashedSuppression.objects.get()
        self.assertEqual(hashed.email_hash, email_hash(ADA_EMAIL))
        self.assertIn("hard bounce", hashed.reason)
        # Keyed: not the plain SHA-256 anyone could compute from a list of addresses.
        self.assertNotEqual(hashed.email_hash, hashlib.sha256(ADA_EMAIL.encode()).hexdigest())
        self.assertTrue(is_hashed_suppressed(ADA_EMAIL))
        self.assertTrue(is_hashed_suppressed("  ADA.Lovelace@example.COM "))
        self.assertTrue(is_hashed_suppressed(f"erased+{self.ada.pk}@erased.invalid"))
        self.assertEqual(
            SuppressionLogEntry.objects.filter(email=f"erased+{self.ada.pk}@erased.invalid").count(), 2
        )

    def test_the_hash_survives_a_key_rotation_through_the_fallbacks(self) -> None:
        contact_erase(contact=self.ada, actor="ops", reason="request")
        old_key = settings.SECRET_KEY
        with override_settings(SECRET_KEY="a-new-secret-key", SECRET_KEY_FALLBACKS=[old_key]):
            self.assertTrue(is_hashed_suppressed(ADA_EMAIL))
        with override_settings(SECRET_KEY="a-new-secret-key", SECRET_KEY_FALLBACKS=[]):
            self.assertFalse(is_hashed_suppressed(ADA_EMAIL))

    def test_tracking_events_lose_recipient_and_raw_payload(self) -> None:
        if not self.tracking_available:
            self.skipTest("webhooks.TrackingEvent is not installed yet")
        contact_erase(contact=self.ada, actor="ops", reason="request")

        self.ada_tracking.refresh_from_db()
        self.assertEqual(self.ada_tracking.recipient, f"erased+{self.ada.pk}@erased.invalid")
        self.assertEqual(self.ada_tracking.esp_event, {})
        self.assertEqual(self.ada_tracking.mta_response, "550 5.1.1 <[erased]>: user unknown")
        self.bob_tracking.refresh_from_db()
        self.assertEqual(self.bob_tracking.esp_event, {"Recipient": BOB_EMAIL})

    def test_erasure_is_audited_by_reference(self) -> None:
        contact_erase(contact=self.ada, actor="ops:alice", reason=f"ticket 7, from {ADA_EMAIL}")

        entry = AuditLogEntry.objects.get(action=AuditLogEntry.Action.ERASE)
        self.assertEqual((entry.contact_pk, entry.actor), (self.ada.pk, "ops:alice"))
        self.assertEqual(entry.reason, "ticket 7, from [erased]")
        self.assertEqual(entry.email_hash, email_hash(ADA_EMAIL))
        self.assertEqual(entry.detail["messages"], 2)
        self.assertEqual(entry.detail["suppressions"], 2)

    def test_erasure_is_all_or_nothing(self) -> None:
        with (
            mock.patch.object(HashedSuppression.objects, "get_or_create", side_effect=RuntimeError("boom")),
            self.assertRaises(RuntimeError),
        ):
            contact_erase(contact=self.ada, actor="ops", reason="request")

        self.ada.refresh_from_db()
        self.assertEqual(self.ada.email, "Ada.Lovelace@Example.com")
        self.assertIsNone(self.ada.erased_at)
        self.ada_queued.refresh_from_db()
        self.assertEqual(self.ada_queued.status, Message.Status.QUEUED)
        self.assertEqual(Suppression.objects.filter(email=ADA_EMAIL).count(), 2)
        self.assertFalse(AuditLogEntry.objects.exists())

    def test_erasing_twice_is_harmless(self) -> None:
        contact_erase(contact=self.ada, actor="ops", reason="request")
        self.ada.refresh_from_db()
        first = (self.ada.email, self.ada.user_id, self.ada.erased_at)
        contact_erase(contact=self.ada, actor="ops", reason="again")
        self.ada.refresh_from_db()
        self.assertEqual((self.ada.email, self.ada.user_id, self.ada.erased_at), first)
        self.assertEqual(HashedSuppression.objects.count(), 1)
        self.assertEqual(rows_mentioning(ADA_EMAIL), {})

    def test_an_actor_and_a_reason_are_required(self) -> None:
        with self.assertRaises(ValueError):
            contact_erase(contact=self.ada, actor="ops", reason=" ")
        self.ada.refresh_from_db()
        self.assertIsNone(self.ada.erased_at)

    def test_a_hashed_suppression_can_be_lifted_with_a_reason(self) -> None:
        contact_erase(contact=self.ada, actor="ops", reason="request")
        with self.assertRaises(ValueError):
            hashed_suppression_lift(email=ADA_EMAIL, actor="ops", reason="")
        self.assertTrue(hashed_suppression_lift(email=ADA_EMAIL, actor="ops", reason="signed up again"))
        self.assertFalse(is_hashed_suppressed(ADA_EMAIL))
        self.assertTrue(AuditLogEntry.objects.filter(action=AuditLogEntry.Action.SUPPRESSION_LIFTED).exists())


class CommandTests(PrivacyTestCase):
    def test_gdpr_export_writes_json_to_stdout(self) -> None:
        out = io.StringIO()
        call_command("gdpr_export", "--user-id", ADA_USER, "--actor", "ops", stdout=out)
        data = json.loads(out.getvalue())
        self.assertEqual(data["contact"]["user_id"], ADA_USER)
        self.assertEqual(AuditLogEntry.objects.get().actor, "ops")

    def test_gdpr_export_writes_a_private_file(self) -> None:
        with tempfile.TemporaryDirectory() as directory:
            target = os.path.join(directory, "ada.json")
            call_command("gdpr_export", "--user-id", ADA_USER, "--output", target, stderr=io.StringIO())
            with open(target, encoding="utf-8") as handle:
                self.assertEqual(json.load(handle)["contact"]["email"], "Ada.Lovelace@Example.com")
            self.assertEqual(stat.S_IMODE(os.stat(target).st_mode), 0o600)

    def test_gdpr_erase_then_export_by_the_original_user_id(self) -> None:
        out = io.StringIO()
        call_command(
            "gdpr_erase", "--user-id", ADA_USER, "--reason", "Art. 17", "--actor", "ops:alice", stdout=out
        )
        self.assertIn(f"Erased contact {self.ada.pk}", out.getvalue())
        self.assertEqual(AuditLogEntry.objects.get().actor, "ops:alice")

        export = io.StringIO()
        call_command("gdpr_export", "--user-id", ADA_USER, stdout=export)
        self.assertEqual(
            json.loads(export.getvalue())["contact"]["email"], f"erased+{self.ada.pk}@erased.invalid"
        )

    def test_an_unknown_user_id_is_an_error(self) -> None:
        with self.assertRaises(CommandError):
            call_command("gdpr_export", "--user-id", "nobody", stdout=io.StringIO())
        with self.assertRaises(CommandError):
            call_command("gdpr_erase", "--user-id", "nobody", "--reason", "x", "--actor", "y")


@override_settings(ROOT_URLCONF=__name__)
class AdminActionTests(PrivacyTestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        super().setUpTestData()
        cls.clerk = get_user_model().objects.create_user("clerk", "clerk@example.org", "pw", is_staff=True)
        cls.clerk.user_permissions.add(
            *Permission.objects.filter(
                content_type__app_label="campaigns", codename__in=["view_contact", "change_contact"]
            )
        )

    def post_action(self, action: str, *contacts: Contact, **extra: Any) -> Any:
        data = {"action": action, "_selected_action": [c.pk for c in contacts], **extra}
        return self.client.post(CHANGELIST, data)

    def messages_of(self, response: Any) -> list[str]:
        return [str(m) for m in get_messages(response.wsgi_request)]

    def test_export_action_downloads_json_and_audits(self) -> None:
        self.client.force_login(self.root)
        response = self.post_action("export_contacts_action", self.ada, self.bob)

        self.assertEqual(response.status_code, 200)
        self.assertIn("attachment;", response["Content-Disposition"])
        data = json.loads(response.content)
        self.assertEqual([c["contact"]["user_id"] for c in data["contacts"]], [ADA_USER, BOB_USER])
        self.assertEqual(
            set(AuditLogEntry.objects.values_list("contact_pk", "actor")),
            {(self.ada.pk, "admin:root"), (self.bob.pk, "admin:root")},
        )

    def test_export_action_needs_the_export_permission(self) -> None:
        self.client.force_login(self.clerk)
        response = self.post_action("export_contacts_action", self.ada)
        # Not one of the clerk's actions: the changelist again, no download, no audit.
        self.assertNotIn("Content-Disposition", response)
        self.assertFalse(AuditLogEntry.objects.exists())

    def test_erase_action_asks_for_a_reason_first(self) -> None:
        self.client.force_login(self.root)
        response = self.post_action("erase_contacts_action", self.ada)
        self.assertContains(response, "This cannot be undone")
        self.assertContains(response, 'name="action" value="erase_contacts_action"')
        self.assertContains(response, 'name="reason"')

        missing = self.post_action("erase_contacts_action", self.ada, post="yes", reason="  ")
        self.assertContains(missing, "A reason is required")

        self.ada.refresh_from_db()
        self.assertIsNone(self.ada.erased_at)
        self.assertFalse(AuditLogEntry.objects.exists())

    def test_erase_action_with_a_reason_erases_and_audits(self) -> None:
        self.client.force_login(self.root)
        response = self.post_action("erase_contacts_action", self.ada, post="yes", reason="Art. 17, ticket 9")

        self.assertEqual(response.status_code, 302)
        self.ada.refresh_from_db()
        self.assertIsNotNone(self.ada.erased_at)
        self.bob.refresh_from_db()
        self.assertIsNone(self.bob.erased_at)
        entry = AuditLogEntry.objects.get(action=AuditLogEntry.Action.ERASE)
        self.assertEqual((entry.actor, entry.reason), ("admin:root", "Art. 17, ticket 9"))

    def test_erase_action_needs_the_erase_permission(self) -> None:
        self.client.force_login(self.clerk)
        changelist = self.client.get(CHANGELIST)
        self.assertNotContains(changelist, "erase_contacts_action")  # not offered
        self.assertNotContains(changelist, "export_contacts_action")
        self.post_action("erase_contacts_action", self.ada, post="yes", reason="because")

        self.ada.refresh_from_db()
        self.assertIsNone(self.ada.erased_at)

    def test_a_staff_user_given_the_erase_permission_gets_the_action(self) -> None:
        self.clerk.user_permissions.add(
            Permission.objects.get(content_type__app_label="suppression", codename="erase_contact")
        )
        self.client.force_login(self.clerk)
        changelist = self.client.get(CHANGELIST)
        self.assertContains(changelist, "erase_contacts_action")
        self.assertNotContains(changelist, "export_contacts_action")
        response = self.post_action("erase_contacts_action", self.ada, post="yes", reason="ticket 12")
        self.assertIn("1 contact(s) erased.", self.messages_of(response))
        self.ada.refresh_from_db()
        self.assertIsNotNone(self.ada.erased_at)


class ErasureStopsTheAddressTests(PrivacyTestCase):
    def test_mail_queued_to_the_address_for_another_contact_is_stopped(self) -> None:
        version = factories.published_version(subject="Hi")
        # Spelt differently: the same mailbox.
        twin = factories.contact(user_id="u-ada-twin", email=ADA_EMAIL.upper())
        queued = factories.message(version, twin)
        claimed = factories.message(version, twin, status=Message.Status.CLAIMED, locked_until=timezone.now())
        sent = factories.message(version, twin, status=Message.Status.SENT)
        bobs = factories.message(version, self.bob)

        result = contact_erase(contact=self.ada, actor="ops", reason="request")

        self.assertEqual(result.messages_stopped_other_contacts, 2)
        for message in (queued, claimed):
            message.refresh_from_db()
            self.assertEqual(message.status, Message.Status.SUPPRESSED)
            self.assertEqual(message.status_reason, "suppressed: erased (GDPR Art. 17)")
            self.assertIsNone(message.locked_until)
        sent.refresh_from_db()
        bobs.refresh_from_db()
        self.assertEqual((sent.status, bobs.status), (Message.Status.SENT, Message.Status.QUEUED))
        # The twin's rows are the twin's: they keep its address.
        self.assertEqual(queued.to_email, ADA_EMAIL.upper())
