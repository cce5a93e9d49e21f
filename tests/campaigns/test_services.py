"""campaigns.services: template versions, API sources, automation activation."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import time_machine
from django.core.exceptions import NON_FIELD_ERRORS, ValidationError
from django.test import TestCase

from campaigns.models import ApiSource, Automation, Contact, EmailTemplate, EventType, TemplateVersion
from campaigns.services import (
    api_source_authenticate,
    api_source_create,
    automation_set_active,
    template_version_copy,
    template_version_create,
    template_version_preview,
    template_version_publish,
    template_version_update,
)

T0 = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
CARD_SCHEMA = {
    "fields": {
        "plan": {"type": "string", "required": True},
        "card_last4": {"type": "string", "sensitive": True},
    }
}


class TemplateVersionCreateTests(TestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        cls.template = EmailTemplate.objects.create(name="welcome")
        cls.other = EmailTemplate.objects.create(name="receipt")

    def test_versions_are_numbered_per_template_and_start_as_drafts(self) -> None:
        first = template_version_create(template=self.template, subject="Hi", html="<p>one</p>")
        second = template_version_create(template=self.template, subject="Hi", html="<p>two</p>")
        other = template_version_create(template=self.other, subject="Receipt", html="<p>r</p>")

        self.assertEqual((first.number, second.number, other.number), (1, 2, 1))
        self.assertEqual({first.status, second.status, other.status}, {TemplateVersion.Status.DRAFT})
        self.assertIsNone(second.published_at)

    def test_numbering_continues_after_the_highest_number_not_the_count(self) -> None:
        TemplateVersion.objects.create(template=self.template, number=7, subject="Hi", html="<p>old</p>")

        version = template_version_create(template=self.template, subject="Hi", html="<p>new</p>")

        self.assertEqual(version.number, 8)

    def test_safe_filter_is_rejected_on_the_html_field_naming_the_filter(self) -> None:
        with self.assertRaises(ValidationError) as caught:
            template_version_create(template=self.template, subject="Hi", html="<p>{{ x|safe }}</p>")

        errors = caught.exception.message_dict
        self.assertIn("html", errors)
        self.assertIn("safe", " ".join(errors["html"]))
        self.assertNotIn("subject", errors)
        self.assertFalse(TemplateVersion.objects.filter(template=self.template).exists())

    def test_an_error_in_the_subject_is_reported_on_the_subject(self) -> None:
        with self.assertRaises(ValidationError) as caught:
            template_version_create(template=self.template, subject="Hi {{ x|safe }}", html="<p>fine</p>")

        errors = caught.exception.message_dict
        self.assertIn("subject", errors)
        self.assertNotIn("html", errors)
        self.assertNotIn(NON_FIELD_ERRORS, errors)

    def test_declared_sensitive_fields_must_be_strings(self) -> None:
        for bad in ([1], ["card_last4", None], "card_last4", [""]):
            with self.subTest(declared=bad), self.assertRaises(ValidationError) as caught:
                template_version_create(
                    template=self.template,
                    subject="Hi",
                    html="<p>x</p>",
                    declared_sensitive_fields=bad,  # type: ignore[arg-type]
                )
            self.assertIn("declared_sensitive_fields", caught.exception.message_dict)
        self.assertFalse(TemplateVersion.objects.filter(template=self.template).exists())

    def test_declared_sensitive_fields_are_stored(self) -> None:
        version = template_version_create(
            template=self.template, subject="Hi", html="<p>x</p>", declared_sensitive_fields=["card_last4"]
        )

        version.refresh_from_db()
        self.assertEqual(version.declared_sensitive_fields, ["card_last4"])


class TemplateVersionLifecycleTests(TestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        cls.template = EmailTemplate.objects.create(name="welcome")

    def setUp(self) -> None:
        self.draft = template_version_create(template=self.template, subject="Hi", html="<p>draft</p>")

    def test_update_changes_a_draft(self) -> None:
        template_version_update(
            version=self.draft,
            subject="Hello",
            html="<p>edited</p>",
            text="edited",
            declared_sensitive_fields=[],
        )

        self.draft.refresh_from_db()
        self.assertEqual(
            (self.draft.subject, self.draft.html, self.draft.text), ("Hello", "<p>edited</p>", "edited")
        )

    def test_update_validates_the_template(self) -> None:
        with self.assertRaises(ValidationError) as caught:
            template_version_update(
                version=self.draft, subject="Hi", html="{{ x|safe }}", text="", declared_sensitive_fields=[]
            )

        self.assertIn("html", caught.exception.message_dict)
        self.draft.refresh_from_db()
        self.assertEqual(self.draft.html, "<p>draft</p>")

    def test_published_versions_are_immutable(self) -> None:
        template_version_publish(version=self.draft)
        stale = TemplateVersion.objects.get(pk=self.draft.pk)
        stale.status = TemplateVersion.Status.DRAFT  # a copy loaded before the publish

        with self.assertRaises(ValidationError) as caught:
            template_version_update(
                version=stale, subject="Changed", html="<p>changed</p>", text="", declared_sensitive_fields=[]
            )

        self.assertEqual(
            caught.exception.messages, ["published versions are immutable; create a new version"]
        )
        self.draft.refresh_from_db()
        self.assertEqual(self.draft.subject, "Hi")

    def test_publish_sets_status_and_published_at(self) -> None:
        with time_machine.travel(T0, tick=False):
            template_version_publish(version=self.draft)

        self.draft.refresh_from_db()
        self.assertEqual(self.draft.status, TemplateVersion.Status.PUBLISHED)
        self.assertEqual(self.draft.published_at, T0)

    def test_publishing_twice_keeps_the_first_publication_date(self) -> None:
        with time_machine.travel(T0, tick=False):
            template_version_publish(version=self.draft)
        with time_machine.travel(T0 + timedelta(days=1), tick=False):
            template_version_publish(version=self.draft)

        self.draft.refresh_from_db()
        self.assertEqual(self.draft.published_at, T0)

    def test_publish_validates_again_and_names_the_filter(self) -> None:
        # Written directly, as if it predated the rule it now breaks.
        legacy = TemplateVersion.objects.create(
            template=self.template, number=9, subject="Hi", html="{{ x|safe }}"
        )

        with self.assertRaises(ValidationError) as caught:
            template_version_publish(version=legacy)

        self.assertIn("safe", " ".join(caught.exception.message_dict["html"]))
        legacy.refresh_from_db()
        self.assertEqual(legacy.status, TemplateVersion.Status.DRAFT)
        self.assertIsNone(legacy.published_at)

    def test_copy_makes_a_new_draft_from_a_published_version(self) -> None:
        template_version_update(
            version=self.draft,
            subject="S",
            html="<p>H</p>",
            text="T",
            declared_sensitive_fields=["card_last4"],
        )
        template_version_publish(version=self.draft)

        copy = template_version_copy(version=self.draft)

        self.assertNotEqual(copy.pk, self.draft.pk)
        self.assertEqual(copy.number, 2)
        self.assertEqual(copy.status, TemplateVersion.Status.DRAFT)
        self.assertIsNone(copy.published_at)
        self.assertEqual(
            (copy.subject, copy.html, copy.text, copy.declared_sensitive_fields),
            ("S", "<p>H</p>", "T", ["card_last4"]),
        )


class TemplateVersionPreviewTests(TestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        cls.template = EmailTemplate.objects.create(name="receipt")
        cls.event_type = EventType.objects.create(name="order.paid", schema=CARD_SCHEMA)
        cls.contact = Contact.objects.create(
            user_id="u-1", email="ada@example.com", attributes={"first_name": "Ada"}
        )
        cls.html = "<p>{{ contact.first_name }} {{ payload.plan }} card={{ payload.card_last4 }}</p>"

    def test_preview_renders_contact_and_payload(self) -> None:
        version = template_version_create(
            template=self.template, subject="Hi {{ contact.first_name }}", html=self.html
        )

        rendered = template_version_preview(
            version=version, contact=self.contact, payload={"plan": "pro"}, event_type=self.event_type
        )

        self.assertIn("Ada", rendered.subject)
        self.assertIn("Ada pro", rendered.html)

    def test_undeclared_sensitive_fields_are_withheld(self) -> None:
        version = template_version_create(template=self.template, subject="Hi", html=self.html)

        rendered = template_version_preview(
            version=version,
            contact=self.contact,
            payload={"plan": "pro", "card_last4": "4242"},
            event_type=self.event_type,
        )

        self.assertIn("pro", rendered.html)
        self.assertNotIn("4242", rendered.html)

    def test_declared_sensitive_fields_are_rendered(self) -> None:
        version = template_version_create(
            template=self.template, subject="Hi", html=self.html, declared_sensitive_fields=["card_last4"]
        )

        rendered = template_version_preview(
            version=version,
            contact=self.contact,
            payload={"plan": "pro", "card_last4": "4242"},
            event_type=self.event_type,
        )

        self.assertIn("card=4242", rendered.html)

    def test_preview_without_contact_or_event_type_uses_a_placeholder_contact(self) -> None:
        version = template_version_create(
            template=self.template, subject="Hi", html="<p>{{ contact.email }}</p>"
        )

        rendered = template_version_preview(version=version, contact=None, payload={}, event_type=None)

        self.assertIn("preview@example.com", rendered.html)


class ApiSourceTests(TestCase):
    def test_create_stores_only_the_hash_and_a_prefix(self) -> None:
        source, token = api_source_create(name="billing")

        source.refresh_from_db()
        self.assertGreaterEqual(len(token), 43)  # token_urlsafe(32)
        self.assertEqual(source.token_hash, hashlib.sha256(token.encode()).hexdigest())
        self.assertEqual(source.token_prefix, token[:8])
        stored = ApiSource.objects.filter(pk=source.pk).values().get()
        self.assertNotIn(token, [str(value) for value in stored.values()])

    def test_each_source_gets_its_own_token(self) -> None:
        _, first = api_source_create(name="billing")
        _, second = api_source_create(name="crm")

        self.assertNotEqual(first, second)

    def test_duplicate_name_is_refused(self) -> None:
        api_source_create(name="billing")

        with self.assertRaises(ValidationError):
            api_source_create(name="billing")

    def test_authenticate_finds_the_source_and_records_use(self) -> None:
        source, token = api_source_create(name="billing")

        with time_machine.travel(T0, tick=False):
            found = api_source_authenticate(token=token)

        self.assertEqual(found, source)
        source.refresh_from_db()
        self.assertEqual(source.last_used_at, T0)

    def test_wrong_or_empty_tokens_are_refused(self) -> None:
        _, token = api_source_create(name="billing")

        for bad in ("", token[:-1], token + "x", token.upper(), "x" * 5000):
            with self.subTest(token=bad[:20]):
                self.assertIsNone(api_source_authenticate(token=bad))

    def test_inactive_source_is_refused(self) -> None:
        source, token = api_source_create(name="billing")
        ApiSource.objects.filter(pk=source.pk).update(active=False)

        self.assertIsNone(api_source_authenticate(token=token))
        source.refresh_from_db()
        self.assertIsNone(source.last_used_at)

    def test_last_used_at_is_written_at_most_once_a_minute(self) -> None:
        source, token = api_source_create(name="billing")

        with time_machine.travel(T0, tick=False):
            api_source_authenticate(token=token)
        with time_machine.travel(T0 + timedelta(seconds=59), tick=False):
            api_source_authenticate(token=token)
        source.refresh_from_db()
        self.assertEqual(source.last_used_at, T0)

        with time_machine.travel(T0 + timedelta(seconds=61), tick=False):
            api_source_authenticate(token=token)
        source.refresh_from_db()
        self.assertEqual(source.last_used_at, T0 + timedelta(seconds=61))


class AutomationSetActiveTests(TestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        cls.trigger = EventType.objects.create(name="user.signed_up")
        cls.template = EmailTemplate.objects.create(name="welcome")
        cls.unpublished = EmailTemplate.objects.create(name="draft-only")
        cls.draft = TemplateVersion.objects.create(
            template=cls.unpublished, number=1, subject="Hi", html="<p>x</p>"
        )
        cls.published = TemplateVersion.objects.create(
            template=cls.template,
            number=1,
            subject="Hi",
            html="<p>x</p>",
            status="published",
            published_at=T0,
        )

    def automation(self, **fields: object) -> Automation:
        defaults: dict[str, object] = {"name": "welcome", "trigger": self.trigger, "template": self.template}
        return Automation.objects.create(**{**defaults, **fields})

    def test_valid_automation_is_activated(self) -> None:
        automation = self.automation(conditions={"field": "payload.plan", "op": "eq", "value": "pro"})

        automation_set_active(automation=automation, active=True)

        automation.refresh_from_db()
        self.assertTrue(automation.active)

    def test_invalid_rule_is_refused(self) -> None:
        automation = self.automation(conditions={"field": "payload.plan", "op": "matches", "value": "p.*"})

        with self.assertRaises(ValidationError) as caught:
            automation_set_active(automation=automation, active=True)

        self.assertIn("conditions", caught.exception.message_dict)
        self.assertIn("matches", caught.exception.message_dict["conditions"][0])
        automation.refresh_from_db()
        self.assertFalse(automation.active)

    def test_template_without_a_published_version_is_refused(self) -> None:
        automation = self.automation(template=self.unpublished)

        with self.assertRaises(ValidationError) as caught:
            automation_set_active(automation=automation, active=True)

        self.assertIn("template", caught.exception.message_dict)
        automation.refresh_from_db()
        self.assertFalse(automation.active)

    def test_a_pinned_draft_is_refused(self) -> None:
        automation = self.automation(template=self.unpublished, pinned_version=self.draft)

        with self.assertRaises(ValidationError) as caught:
            automation_set_active(automation=automation, active=True)

        self.assertIn("pinned_version", caught.exception.message_dict)

    def test_a_pinned_published_version_is_enough(self) -> None:
        automation = self.automation(pinned_version=self.published)

        automation_set_active(automation=automation, active=True)

        automation.refresh_from_db()
        self.assertTrue(automation.active)

    def test_deactivation_needs_no_validation(self) -> None:
        automation = self.automation(conditions={"bogus": True}, active=True)

        automation_set_active(automation=automation, active=False)

        automation.refresh_from_db()
        self.assertFalse(automation.active)
