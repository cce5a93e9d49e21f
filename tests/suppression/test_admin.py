"""The suppression admin: adding through suppression_add, removing only with a reason."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.contrib.messages import get_messages
from django.test import TestCase
from django.urls import reverse

from suppression.models import Suppression, SuppressionLogEntry, Topic
from suppression.privacy import contact_erase
from suppression.services import suppression_add
from tests import factories

CHANGELIST = reverse("admin:suppression_suppression_changelist")
LOG_CHANGELIST = reverse("admin:suppression_suppressionlogentry_changelist")
ADD = reverse("admin:suppression_suppression_add")


class SuppressionAdminTestCase(TestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        User = get_user_model()
        cls.admin_user = User.objects.create_superuser("root", "root@example.com", "pw")
        # Staff who may look and add, but not lift suppressions.
        cls.clerk = User.objects.create_user("clerk", "clerk@example.com", "pw", is_staff=True)
        cls.clerk.user_permissions.add(
            *Permission.objects.filter(
                content_type__app_label="suppression", codename__in=["view_suppression", "add_suppression"]
            )
        )
        cls.bounced = suppression_add(
            email="bounced@example.com", reason=Suppression.Reason.HARD_BOUNCE, source="webhook:postmark"
        )
        cls.unsubscribed = suppression_add(
            email="news@example.com",
            reason=Suppression.Reason.UNSUBSCRIBE,
            source="unsubscribe",
            topic="newsletter",
        )

    def setUp(self) -> None:
        self.client.force_login(self.admin_user)

    def action_names(self) -> list[str]:
        form = self.client.get(CHANGELIST).context["action_form"]
        return [] if form is None else [name for name, _ in form.fields["action"].choices]

    def remove(self, *suppressions: Suppression, **extra: str) -> object:
        data: dict[str, object] = {
            "action": "remove_suppressions",
            "_selected_action": [s.pk for s in suppressions],
        }
        return self.client.post(CHANGELIST, {**data, **extra})


class SuppressionListTests(SuppressionAdminTestCase):
    def test_changelists_render_with_data(self) -> None:
        response = self.client.get(CHANGELIST)
        self.assertContains(response, "bounced@example.com")
        self.assertContains(response, "newsletter")

        log = self.client.get(LOG_CHANGELIST)
        self.assertContains(log, "news@example.com")
        self.assertContains(log, "webhook:postmark")

    def test_change_page_is_read_only(self) -> None:
        url = reverse("admin:suppression_suppression_change", args=[self.bounced.pk])

        self.assertContains(self.client.get(url), "bounced@example.com")
        response = self.client.post(url, {"email": "other@example.com", "topic": "", "reason": "manual"})

        self.assertEqual(response.status_code, 403)
        self.bounced.refresh_from_db()
        self.assertEqual(self.bounced.email, "bounced@example.com")

    def test_search_by_email(self) -> None:
        response = self.client.get(CHANGELIST, {"q": "bounced"})

        self.assertContains(response, "bounced@example.com")
        self.assertNotContains(response, "news@example.com")

    def test_default_delete_is_disabled(self) -> None:
        url = reverse("admin:suppression_suppression_delete", args=[self.bounced.pk])

        self.assertEqual(self.client.post(url, {"post": "yes"}).status_code, 403)
        self.assertTrue(Suppression.objects.filter(pk=self.bounced.pk).exists())
        self.assertIn("remove_suppressions", self.action_names())
        self.assertNotIn("delete_selected", self.action_names())

    def test_log_is_read_only(self) -> None:
        entry = SuppressionLogEntry.objects.first()
        assert entry is not None
        self.assertEqual(
            self.client.get(reverse("admin:suppression_suppressionlogentry_add")).status_code, 403
        )
        url = reverse("admin:suppression_suppressionlogentry_delete", args=[entry.pk])
        self.assertEqual(self.client.post(url, {"post": "yes"}).status_code, 403)


class SuppressionAddTests(SuppressionAdminTestCase):
    def test_adding_goes_through_suppression_add_and_is_logged(self) -> None:
        response = self.client.post(
            ADD,
            {"email": "  Someone@Example.COM ", "topic": "", "reason": "manual", "detail": "asked by phone"},
        )

        self.assertEqual(response.status_code, 302)
        suppression = Suppression.objects.get(email="someone@example.com")
        self.assertEqual((suppression.reason, suppression.source), ("manual", "admin:root"))
        entry = SuppressionLogEntry.objects.get(email="someone@example.com")
        self.assertEqual((entry.action, entry.source), (SuppressionLogEntry.Action.ADDED, "admin:root"))

    def test_an_existing_address_and_topic_is_refused_on_the_form(self) -> None:
        response = self.client.post(ADD, {"email": "BOUNCED@example.com", "topic": "", "reason": "manual"})

        self.assertEqual(response.status_code, 200)
        self.assertTrue(response.context["adminform"].form.errors)
        self.assertEqual(Suppression.objects.filter(email="bounced@example.com").count(), 1)

    def test_an_erased_address_is_refused_on_the_form_and_stays_a_hash(self) -> None:
        contact = factories.contact(email="gone@example.com")
        contact_erase(contact=contact, actor="test", reason="Art. 17")
        response = self.client.post(ADD, {"email": "Gone@example.com", "topic": "", "reason": "manual"})

        self.assertEqual(response.status_code, 200)
        self.assertIn("was erased (GDPR Art. 17)", str(response.context["adminform"].form.errors))
        self.assertFalse(Suppression.objects.filter(email="gone@example.com").exists())
        self.assertFalse(SuppressionLogEntry.objects.filter(email="gone@example.com").exists())


class SuppressionRemoveTests(SuppressionAdminTestCase):
    def test_the_action_first_asks_for_a_reason(self) -> None:
        response = self.remove(self.bounced)

        self.assertEqual(response.status_code, 200)
        self.assertTemplateUsed(response, "admin/suppression/remove_confirmation.html")
        self.assertContains(response, 'name="action" value="remove_suppressions"')
        self.assertContains(response, "bounced@example.com")
        self.assertContains(response, 'name="reason"')
        self.assertTrue(Suppression.objects.filter(pk=self.bounced.pk).exists())

    def test_confirming_without_a_reason_removes_nothing(self) -> None:
        response = self.remove(self.bounced, post="yes", reason="   ")

        self.assertEqual(response.status_code, 200)
        self.assertContains(response, "A reason is required")
        self.assertTrue(Suppression.objects.filter(pk=self.bounced.pk).exists())
        self.assertFalse(
            SuppressionLogEntry.objects.filter(action=SuppressionLogEntry.Action.REMOVED).exists()
        )

    def test_confirming_with_a_reason_removes_and_logs_it(self) -> None:
        response = self.remove(self.bounced, self.unsubscribed, post="yes", reason="mailbox fixed, ticket 42")

        self.assertEqual(response.status_code, 302)
        self.assertFalse(Suppression.objects.filter(pk__in=[self.bounced.pk, self.unsubscribed.pk]).exists())
        removed = SuppressionLogEntry.objects.filter(action=SuppressionLogEntry.Action.REMOVED).order_by(
            "email"
        )
        self.assertEqual(
            [(e.email, e.topic, e.reason, e.source) for e in removed],
            [
                ("bounced@example.com", "", "mailbox fixed, ticket 42", "admin:root"),
                ("news@example.com", "newsletter", "mailbox fixed, ticket 42", "admin:root"),
            ],
        )
        notes = [str(m) for m in get_messages(response.wsgi_request)]  # type: ignore[attr-defined]
        self.assertIn("2 suppression(s) removed.", notes)

    def test_staff_without_the_delete_permission_cannot_remove(self) -> None:
        self.client.force_login(self.clerk)

        self.assertNotIn("remove_suppressions", self.action_names())
        self.remove(self.bounced, post="yes", reason="because")

        self.assertTrue(Suppression.objects.filter(pk=self.bounced.pk).exists())
        self.assertFalse(
            SuppressionLogEntry.objects.filter(action=SuppressionLogEntry.Action.REMOVED).exists()
        )

    def test_staff_with_the_delete_permission_can_remove(self) -> None:
        self.clerk.user_permissions.add(Permission.objects.get(codename="delete_suppression"))
        self.client.force_login(self.clerk)

        self.remove(self.bounced, post="yes", reason="because")

        self.assertFalse(Suppression.objects.filter(pk=self.bounced.pk).exists())
        self.assertEqual(SuppressionLogEntry.objects.get(action="removed").source, "admin:clerk")


class TopicAdminTests(SuppressionAdminTestCase):
    def test_a_topic_is_created_and_its_slug_is_then_read_only(self) -> None:
        add = reverse("admin:suppression_topic_add")
        response = self.client.post(
            add,
            {"slug": "newsletter", "name": "Newsletter", "description": "", "public": "on", "position": 0},
        )
        self.assertEqual(response.status_code, 302)
        topic = Topic.objects.get(slug="newsletter")
        change = reverse("admin:suppression_topic_change", args=[topic.pk])

        self.client.post(change, {"slug": "renamed", "name": "The newsletter", "position": 1})

        topic.refresh_from_db()
        # Opt-outs are stored against the slug: renaming it would re-subscribe people.
        self.assertEqual((topic.slug, topic.name, topic.public), ("newsletter", "The newsletter", False))
