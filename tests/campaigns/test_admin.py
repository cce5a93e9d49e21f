"""The campaigns admin, through the test client as a superuser."""

from __future__ import annotations

import hashlib
import html
import json
import re
from datetime import UTC, datetime
from typing import Any
from unittest.mock import patch

from django.contrib.auth import get_user_model
from django.contrib.messages import get_messages
from django.db import connection
from django.test import TestCase
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from campaigns import tasks
from campaigns.models import (
    ApiSource,
    Automation,
    Contact,
    EmailTemplate,
    EventType,
    Message,
    OutboxEvent,
    SeedList,
    TemplateVersion,
)
from mailauto.lib import nudge
from suppression.models import AuditLogEntry

T0 = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
SCHEMA = {
    "fields": {
        "plan": {"type": "string", "required": True},
        "card_last4": {"type": "string", "sensitive": True},
    }
}


def changelist(model: type) -> str:
    return reverse(f"admin:campaigns_{model._meta.model_name}_changelist")


def change(obj: object) -> str:
    return reverse(f"admin:campaigns_{obj._meta.model_name}_change", args=[obj.pk])  # type: ignore[attr-defined]


def published_version(template: EmailTemplate, number: int = 1, **fields: object) -> TemplateVersion:
    defaults: dict[str, object] = {
        "subject": "Hi",
        "html": "<p>hello</p>",
        "status": "published",
        "published_at": T0,
    }
    return TemplateVersion.objects.create(template=template, number=number, **{**defaults, **fields})


def event(event_type: EventType, n: int, **fields: object) -> OutboxEvent:
    defaults: dict[str, object] = {"user_id": f"u-{n}", "payload": {"plan": "pro"}, "occurred_at": T0}
    return OutboxEvent.objects.create(
        event_id=f"evt-{event_type.name}-{n}", event_type=event_type, **{**defaults, **fields}
    )


def message(version: TemplateVersion, n: int, **fields: object) -> Message:
    defaults: dict[str, object] = {
        "to_email": f"m{n}@example.com",
        "purpose": "marketing",
        "idempotency_key": f"key-{n}",
    }
    return Message.objects.create(template_version=version, **{**defaults, **fields})


class AdminTestCase(TestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        cls.admin_user = get_user_model().objects.create_superuser("root", "root@example.com", "pw")
        cls.event_type = EventType.objects.create(name="order.paid", schema=SCHEMA)
        cls.template = EmailTemplate.objects.create(name="receipt")
        cls.version = published_version(cls.template)
        cls.automation = Automation.objects.create(
            name="receipts",
            trigger=cls.event_type,
            template=cls.template,
            conditions={"field": "payload.plan", "op": "eq", "value": "pro"},
        )
        cls.contact = Contact.objects.create(
            user_id="u-1", email="ada@example.com", attributes={"first_name": "Ada"}
        )
        cls.event = event(cls.event_type, 1, payload={"plan": "pro", "card_last4": "4242"})
        cls.message = message(
            cls.version,
            1,
            event=cls.event,
            automation=cls.automation,
            contact=cls.contact,
            status=Message.Status.DEAD,
            status_reason="retries exhausted: ESP answered 503",
            error_history=[
                {"at": "2024-06-01T12:00:00+00:00", "attempt": 1, "status": "queued", "error": "ESP <503>"}
            ],
        )
        cls.source = ApiSource.objects.create(name="billing", token_hash="0" * 64, token_prefix="abcd1234")
        cls.seed_list = SeedList.objects.create(name="team", addresses="a@example.com\nb@example.com")

    def setUp(self) -> None:
        self.client.force_login(self.admin_user)

    def messages_of(self, response: object) -> list[str]:
        return [str(m) for m in get_messages(response.wsgi_request)]  # type: ignore[attr-defined]


class PagesRenderTests(AdminTestCase):
    def test_every_changelist_renders_with_its_data(self) -> None:
        expected = {
            Contact: "ada@example.com",
            EventType: "order.paid",
            ApiSource: "abcd1234",
            OutboxEvent: "evt-order.paid-1",
            EmailTemplate: "receipt",
            TemplateVersion: "receipt v1",
            Automation: "payload.plan = &quot;pro&quot;",
            SeedList: "team",
            Message: "retries exhausted: ESP answered 503",
        }
        for model, text in expected.items():
            with self.subTest(model=model.__name__):
                response = self.client.get(changelist(model))
                self.assertEqual(response.status_code, 200)
                self.assertContains(response, text)

    def test_every_change_page_renders(self) -> None:
        for obj, text in [
            (self.contact, "first_name"),
            (self.event_type, "card_last4"),
            (self.source, "abcd1234"),
            (self.event, "evt-order.paid-1"),
            (self.template, "Add a version"),
            (self.version, "Preview"),
            (self.automation, "receipts"),
            (self.seed_list, "b@example.com"),
            (self.message, "m1@example.com"),
        ]:
            with self.subTest(model=type(obj).__name__):
                response = self.client.get(change(obj))
                self.assertEqual(response.status_code, 200)
                self.assertContains(response, text)

    def test_event_type_list_counts_fields_sensitive_fields_and_events(self) -> None:
        response = self.client.get(changelist(EventType))

        # (The double opt-in event type, installed by migration, is listed too.)
        row = next(row for row in response.context["cl"].result_list if row.name == "order.paid")
        self.assertEqual(row.event_count, 1)
        self.assertContains(response, '<td class="field-field_count">2</td>', html=True)
        self.assertContains(response, '<td class="field-sensitive_field_list">card_last4</td>', html=True)

    def test_template_page_lists_its_versions(self) -> None:
        TemplateVersion.objects.create(
            template=self.template, number=2, subject="Draft subject", html="<p>d</p>"
        )

        response = self.client.get(change(self.template))

        self.assertContains(response, "Draft subject")
        self.assertContains(response, change(self.version))

    def test_message_change_page_shows_the_error_history_escaped(self) -> None:
        response = self.client.get(change(self.message))

        self.assertContains(response, "ESP &lt;503&gt;")
        self.assertNotContains(response, "ESP <503>")


class SearchTests(AdminTestCase):
    def results(self, model: type, term: str) -> list[object]:
        response = self.client.get(changelist(model), {"q": term})
        self.assertEqual(response.status_code, 200)
        return list(response.context["cl"].result_list)

    def test_large_tables_are_searched_by_exact_values(self) -> None:
        other = message(self.version, 2, idempotency_key="other-key", esp_message_id="esp-2")

        self.assertEqual(self.results(Message, "m1@example.com"), [self.message])
        self.assertEqual(self.results(Message, "esp-2"), [other])
        self.assertEqual(self.results(Message, "other-key"), [other])
        self.assertEqual(self.results(Message, "m1@"), [])  # no substring scans
        self.assertEqual(self.results(OutboxEvent, "evt-order.paid-1"), [self.event])
        self.assertEqual(self.results(OutboxEvent, "u-1"), [self.event])
        self.assertEqual(self.results(Contact, "ada@example.com"), [self.contact])
        self.assertEqual(self.results(Contact, "ada"), [])


class BoundedQueriesTests(AdminTestCase):
    def count_queries(self, url: str) -> int:
        with CaptureQueriesContext(connection) as queries:
            response = self.client.get(url)
        self.assertEqual(response.status_code, 200)
        return len(queries)

    def test_message_changelist_queries_do_not_grow_with_rows(self) -> None:
        one_row = self.count_queries(changelist(Message))
        for n in range(2, 31):
            template = EmailTemplate.objects.create(name=f"t{n}")
            automation = Automation.objects.create(name=f"a{n}", trigger=self.event_type, template=template)
            message(published_version(template), n, automation=automation)

        thirty_rows = self.count_queries(changelist(Message))

        self.assertEqual(thirty_rows, one_row)
        self.assertLessEqual(thirty_rows, 12)

    def test_outbox_changelist_queries_do_not_grow_with_rows(self) -> None:
        one_row = self.count_queries(changelist(OutboxEvent))
        for n in range(2, 31):
            event(EventType.objects.create(name=f"type.{n}"), n)

        thirty_rows = self.count_queries(changelist(OutboxEvent))

        self.assertEqual(thirty_rows, one_row)
        self.assertLessEqual(thirty_rows, 12)

    def test_automation_and_event_type_changelists_do_not_grow_with_rows(self) -> None:
        before = {
            model: self.count_queries(changelist(model)) for model in (Automation, EventType, EmailTemplate)
        }
        for n in range(2, 12):
            template = EmailTemplate.objects.create(name=f"t{n}")
            published_version(template)
            trigger = EventType.objects.create(name=f"type.{n}", schema=SCHEMA)
            event(trigger, n)
            Automation.objects.create(name=f"a{n}", trigger=trigger, template=template)

        for model, count in before.items():
            with self.subTest(model=model.__name__):
                self.assertEqual(self.count_queries(changelist(model)), count)


class OutboxEventAdminTests(AdminTestCase):
    def test_change_page_shows_the_payload_redacted(self) -> None:
        response = self.client.get(change(self.event))

        self.assertContains(response, "[redacted]")
        self.assertContains(response, "pro")
        self.assertNotContains(response, "4242")

    def test_payload_is_never_in_the_list(self) -> None:
        response = self.client.get(changelist(OutboxEvent))

        self.assertNotContains(response, "4242")
        self.assertNotContains(response, "card_last4")

    def test_events_are_read_only(self) -> None:
        response = self.client.post(change(self.event), {"user_id": "hacked"})

        self.assertEqual(response.status_code, 403)
        self.event.refresh_from_db()
        self.assertEqual(self.event.user_id, "u-1")

    def test_replay_requeues_dead_events_and_nudges_after_commit(self) -> None:
        dead = event(self.event_type, 2, status=OutboxEvent.Status.DEAD, attempts=5)
        processed = event(self.event_type, 3, status=OutboxEvent.Status.PROCESSED, attempts=1)

        with patch.object(tasks.events_process, "apply_async") as apply_async:
            with self.captureOnCommitCallbacks() as callbacks:
                response = self.client.post(
                    changelist(OutboxEvent),
                    {"action": "replay_events", "_selected_action": [dead.pk, processed.pk], "index": 0},
                )
            self.assertFalse(apply_async.called)  # nothing is enqueued before commit
            self.assertEqual(len(callbacks), 1)
            callbacks[0]()
            nudge.flush_pending()  # sent from a background thread; wait for it

        apply_async.assert_called_once_with(retry=False)
        self.assertEqual(response.status_code, 302)
        dead.refresh_from_db()
        processed.refresh_from_db()
        self.assertEqual((dead.status, dead.attempts), (OutboxEvent.Status.PENDING, 0))
        self.assertEqual(processed.status, OutboxEvent.Status.PROCESSED)
        self.assertIn("1 event(s) queued for replay.", self.messages_of(response))

    def test_replay_of_nothing_replayable_does_not_nudge(self) -> None:
        processed = event(self.event_type, 3, status=OutboxEvent.Status.PROCESSED)

        with self.captureOnCommitCallbacks() as callbacks:
            response = self.client.post(
                changelist(OutboxEvent),
                {"action": "replay_events", "_selected_action": [processed.pk], "index": 0},
            )

        self.assertEqual(callbacks, [])
        self.assertIn("0 event(s) queued for replay.", self.messages_of(response))


class MessageAdminTests(AdminTestCase):
    def test_replay_requeues_dead_and_failed_messages_and_nudges_after_commit(self) -> None:
        failed = message(self.version, 2, status=Message.Status.FAILED)
        accepted = message(self.version, 3, status=Message.Status.FAILED, esp_message_id="esp-1")
        sent = message(self.version, 4, status=Message.Status.SENT)

        with patch.object(tasks.messages_send, "apply_async") as apply_async:
            with self.captureOnCommitCallbacks() as callbacks:
                response = self.client.post(
                    changelist(Message),
                    {
                        "action": "replay_messages",
                        "_selected_action": [self.message.pk, failed.pk, accepted.pk, sent.pk],
                        "index": 0,
                    },
                )
            self.assertFalse(apply_async.called)  # nothing is enqueued before commit
            self.assertEqual(len(callbacks), 1)
            callbacks[0]()

        apply_async.assert_called_once_with(retry=False)
        statuses = dict(Message.objects.values_list("pk", "status"))
        self.assertEqual(statuses[self.message.pk], Message.Status.QUEUED)
        self.assertEqual(statuses[failed.pk], Message.Status.QUEUED)
        self.assertEqual(statuses[accepted.pk], Message.Status.FAILED)  # the ESP took it: never resent
        self.assertEqual(statuses[sent.pk], Message.Status.SENT)
        self.assertIn("2 message(s) queued for replay.", self.messages_of(response))

    def test_replay_refuses_a_message_that_may_have_reached_the_esp_and_says_so(self) -> None:
        maybe = message(
            self.version,
            5,
            status=Message.Status.DEAD,
            status_reason="still unknown after one resend",
            resent_after_unknown=True,
        )
        with (
            patch.object(tasks.messages_send, "apply_async") as apply_async,
            self.captureOnCommitCallbacks(execute=True),
        ):
            response = self.client.post(
                changelist(Message),
                {"action": "replay_messages", "_selected_action": [maybe.pk], "index": 0},
            )
        apply_async.assert_not_called()  # nothing was queued, so no worker is woken
        maybe.refresh_from_db()
        self.assertEqual(maybe.status, Message.Status.DEAD)
        [text] = self.messages_of(response)
        self.assertIn("0 message(s) queued for replay. 1 not replayed", text)
        self.assertIn(f"could send it twice: {maybe.pk}.", text)
        [level] = [m.level_tag for m in get_messages(response.wsgi_request)]
        self.assertEqual(level, "warning")

    def test_messages_are_read_only(self) -> None:
        self.assertEqual(
            self.client.post(change(self.message), {"to_email": "x@example.com"}).status_code, 403
        )
        self.assertEqual(self.client.get(reverse("admin:campaigns_message_add")).status_code, 403)
        self.assertEqual(
            self.client.get(reverse("admin:campaigns_message_delete", args=[self.message.pk])).status_code,
            403,
        )


class ApiSourceAdminTests(AdminTestCase):
    def test_token_is_shown_once_at_creation_and_never_again(self) -> None:
        response = self.client.post(reverse("admin:campaigns_apisource_add"), {"name": "crm"})

        self.assertEqual(response.status_code, 302)
        shown = [m for m in self.messages_of(response) if "API token" in m]
        self.assertEqual(len(shown), 1)
        match = re.search(r"The API token for crm is: (\S+) —", shown[0])
        assert match is not None
        raw = match.group(1)
        source = ApiSource.objects.get(name="crm")
        self.assertEqual(source.token_hash, hashlib.sha256(raw.encode()).hexdigest())
        self.assertEqual(source.token_prefix, raw[:8])
        self.assertContains(self.client.get(response.url), raw)  # the page the add redirects to

        for url in (changelist(ApiSource), change(source)):
            page = self.client.get(url)
            self.assertContains(page, source.token_prefix)
            self.assertNotContains(page, raw)
            self.assertNotContains(page, source.token_hash)

    def test_editing_keeps_the_token(self) -> None:
        response = self.client.post(change(self.source), {"name": "billing-v2", "active": ""})

        self.assertEqual(response.status_code, 302)
        self.source.refresh_from_db()
        self.assertEqual(
            (self.source.name, self.source.active, self.source.token_hash), ("billing-v2", False, "0" * 64)
        )


class TemplateVersionAdminTests(AdminTestCase):
    def add(self, **data: object) -> object:
        form = {
            "template": self.template.pk,
            "subject": "Hi",
            "html": "<p>x</p>",
            "text": "",
            "declared_sensitive_fields": "[]",
        }
        return self.client.post(reverse("admin:campaigns_templateversion_add"), {**form, **data})

    def test_adding_creates_the_next_draft_through_the_service(self) -> None:
        response = self.add(html="<p>new</p>", declared_sensitive_fields='["card_last4"]')

        self.assertEqual(response.status_code, 302)
        created = TemplateVersion.objects.get(template=self.template, number=2)
        self.assertEqual(created.status, TemplateVersion.Status.DRAFT)
        self.assertEqual(created.declared_sensitive_fields, ["card_last4"])

    def test_bad_template_syntax_is_shown_on_the_form(self) -> None:
        response = self.add(html="<p>{{ x|safe }}</p>")

        self.assertEqual(response.status_code, 200)
        form = response.context["adminform"].form
        self.assertIn("safe", " ".join(form.errors["html"]))
        self.assertContains(response, "errorlist")
        self.assertFalse(TemplateVersion.objects.filter(number=2).exists())

    def test_non_string_declared_fields_are_shown_on_the_form(self) -> None:
        response = self.add(declared_sensitive_fields="[1, 2]")

        self.assertEqual(response.status_code, 200)
        self.assertIn("declared_sensitive_fields", response.context["adminform"].form.errors)

    def test_draft_can_be_edited(self) -> None:
        draft = TemplateVersion.objects.create(
            template=self.template, number=2, subject="Hi", html="<p>d</p>"
        )

        response = self.client.post(
            change(draft),
            {"subject": "Edited", "html": "<p>e</p>", "text": "", "declared_sensitive_fields": "[]"},
        )

        self.assertEqual(response.status_code, 302)
        draft.refresh_from_db()
        self.assertEqual(
            (draft.subject, draft.number, draft.status), ("Edited", 2, TemplateVersion.Status.DRAFT)
        )

    def test_published_version_is_read_only(self) -> None:
        page = self.client.get(change(self.version))
        self.assertNotContains(page, 'name="_save"')

        response = self.client.post(
            change(self.version),
            {"subject": "Changed", "html": "<p>c</p>", "text": "", "declared_sensitive_fields": "[]"},
        )

        self.assertEqual(response.status_code, 403)
        self.version.refresh_from_db()
        self.assertEqual(self.version.subject, "Hi")

    def test_publish_action(self) -> None:
        good = TemplateVersion.objects.create(
            template=self.template, number=2, subject="Hi", html="<p>ok</p>"
        )
        bad = TemplateVersion.objects.create(
            template=self.template, number=3, subject="Hi", html="{{ x|safe }}"
        )

        response = self.client.post(
            changelist(TemplateVersion),
            {"action": "publish_versions", "_selected_action": [good.pk, bad.pk], "index": 0},
        )

        good.refresh_from_db()
        bad.refresh_from_db()
        self.assertEqual(good.status, TemplateVersion.Status.PUBLISHED)
        self.assertIsNotNone(good.published_at)
        self.assertEqual(bad.status, TemplateVersion.Status.DRAFT)
        notes = self.messages_of(response)
        self.assertIn("1 version(s) published.", notes)
        self.assertTrue(any("Not published" in note and "safe" in note for note in notes))

    def test_copy_action_makes_a_new_draft(self) -> None:
        response = self.client.post(
            changelist(TemplateVersion),
            {"action": "copy_versions", "_selected_action": [self.version.pk], "index": 0},
        )

        copy = TemplateVersion.objects.get(template=self.template, number=2)
        self.assertEqual((copy.status, copy.html), (TemplateVersion.Status.DRAFT, self.version.html))
        self.assertIn("1 draft(s) created.", self.messages_of(response))

    def test_preview_is_escaped_into_a_sandboxed_iframe(self) -> None:
        draft = TemplateVersion.objects.create(
            template=self.template,
            number=2,
            subject="Hi {{ contact.first_name }}",
            html='<p style="color:red">Plan {{ payload.plan }}</p>',
        )

        response = self.client.get(change(draft))

        content = response.content.decode()
        self.assertIn('<iframe sandbox="" srcdoc="', content)
        # The whole rendered document is inside the attribute: its quotes are escaped,
        # so the first literal quote after srcdoc=" is the attribute's own.
        srcdoc = re.search(r'srcdoc="([^"]*)"', content)
        assert srcdoc is not None
        self.assertIn('<p style="color:red">Plan example</p>', html.unescape(srcdoc.group(1)))
        self.assertNotIn('<p style="color:red">Plan example', content)
        # Sample data: the trigger's schema for the payload, a placeholder for the rest.
        self.assertIn("<strong>Subject:</strong> Hi [first_name]", content)


class ContactAdminGdprTests(AdminTestCase):
    """The GDPR actions on the admin site the project serves (tests/suppression/
    test_privacy.py covers them in depth on a site of its own)."""

    def setUp(self) -> None:
        self.client.force_login(self.admin_user)

    def post_action(self, action: str, **extra: object) -> Any:
        data = {"action": action, "_selected_action": [self.contact.pk], **extra}
        return self.client.post(changelist(Contact), data)

    def test_export_downloads_the_contacts_data_and_is_audited(self) -> None:
        response = self.post_action("export_contacts_action")

        self.assertEqual(response.status_code, 200)
        self.assertIn("attachment;", response["Content-Disposition"])
        exported = json.loads(response.content)["contacts"]
        self.assertEqual([c["contact"]["user_id"] for c in exported], ["u-1"])
        self.assertEqual(
            list(AuditLogEntry.objects.values_list("action", "actor")), [("export", "admin:root")]
        )

    def test_erase_needs_a_reason_then_erases_and_is_audited(self) -> None:
        self.assertContains(self.post_action("erase_contacts_action"), "This cannot be undone")
        self.contact.refresh_from_db()
        self.assertIsNone(self.contact.erased_at)

        self.post_action("erase_contacts_action", post="yes", reason="Art. 17 request #12")

        self.contact.refresh_from_db()
        self.assertIsNotNone(self.contact.erased_at)
        self.assertNotEqual(self.contact.email, "ada@example.com")
        self.assertEqual(
            list(AuditLogEntry.objects.values_list("action", "actor")), [("erase", "admin:root")]
        )


class AutomationAdminTests(AdminTestCase):
    def post_action(self, action: str, *automations: Automation) -> object:
        return self.client.post(
            changelist(Automation),
            {"action": action, "_selected_action": [a.pk for a in automations], "index": 0},
        )

    def test_activate_validates_each_automation(self) -> None:
        unpublished = EmailTemplate.objects.create(name="no-versions")
        broken = Automation.objects.create(name="broken", trigger=self.event_type, template=unpublished)

        response = self.post_action("activate", self.automation, broken)

        self.automation.refresh_from_db()
        broken.refresh_from_db()
        self.assertTrue(self.automation.active)
        self.assertFalse(broken.active)
        notes = self.messages_of(response)
        self.assertIn("1 automation(s) activated.", notes)
        self.assertTrue(any("broken" in note and "no published version" in note for note in notes))

    def test_deactivate(self) -> None:
        Automation.objects.filter(pk=self.automation.pk).update(active=True)

        response = self.post_action("deactivate", self.automation)

        self.automation.refresh_from_db()
        self.assertFalse(self.automation.active)
        self.assertIn("1 automation(s) deactivated.", self.messages_of(response))

    def test_an_automation_paused_by_the_reputation_guard_says_why_until_reactivated(self) -> None:
        paused_at = timezone.now().replace(microsecond=0)
        reason = "complaint rate 0.50% over the last 24 h exceeds 0.30% (Gmail's limit)"
        Automation.objects.filter(pk=self.automation.pk).update(
            active=False, paused_reason=reason, paused_at=paused_at
        )
        shown = f"automatically at {paused_at:%Y-%m-%d %H:%M} UTC: {reason}"

        self.assertContains(self.client.get(changelist(Automation)), html.escape(shown))
        self.assertContains(self.client.get(change(self.automation)), html.escape(shown))

        self.post_action("activate", self.automation)

        self.automation.refresh_from_db()
        self.assertEqual((self.automation.active, self.automation.paused_reason), (True, ""))
        self.assertIsNone(self.automation.paused_at)
        self.assertNotContains(self.client.get(change(self.automation)), html.escape(reason))

    def test_change_page_counts_messages_by_status_in_one_query(self) -> None:
        message(self.version, 2, automation=self.automation, status=Message.Status.SENT)
        message(self.version, 3, automation=self.automation, status=Message.Status.SENT)

        with CaptureQueriesContext(connection) as queries:
            response = self.client.get(change(self.automation))

        self.assertContains(response, "sent (accepted by the ESP)</a></td><td>2</td>")
        self.assertContains(response, "dead (retries exhausted)</a></td><td>1</td>")
        # Each count links to exactly those messages.
        self.assertContains(
            response,
            f'href="{changelist(Message)}?automation__id__exact={self.automation.pk}&amp;status__exact=sent"',
        )
        counting = [q["sql"] for q in queries if 'FROM "campaigns_message"' in q["sql"]]
        self.assertEqual(len(counting), 1)

    def test_change_page_of_an_automation_that_sent_nothing(self) -> None:
        quiet = Automation.objects.create(name="quiet", trigger=self.event_type, template=self.template)
        self.assertContains(self.client.get(change(quiet)), "No messages yet.")

    def test_editing_an_active_automation_cannot_break_it(self) -> None:
        Automation.objects.filter(pk=self.automation.pk).update(active=True)
        unpublished = EmailTemplate.objects.create(name="no-versions")

        response = self.client.post(
            change(self.automation),
            {
                "name": "receipts",
                "trigger": self.event_type.pk,
                "conditions": "{}",
                "template": unpublished.pk,
                "pinned_version": "",
                "delay": "0",
                "purpose": "marketing",
            },
        )

        self.assertEqual(response.status_code, 200)
        self.assertIn("template", response.context["adminform"].form.errors)
        self.automation.refresh_from_db()
        self.assertEqual(self.automation.template, self.template)

    def test_invalid_rule_is_shown_on_the_form(self) -> None:
        response = self.client.post(
            change(self.automation),
            {
                "name": "receipts",
                "trigger": self.event_type.pk,
                "conditions": '{"field": "payload.plan", "op": "matches", "value": "x"}',
                "template": self.template.pk,
                "pinned_version": "",
                "delay": "0",
                "purpose": "marketing",
            },
        )

        self.assertEqual(response.status_code, 200)
        self.assertIn("matches", " ".join(response.context["adminform"].form.errors["conditions"]))
