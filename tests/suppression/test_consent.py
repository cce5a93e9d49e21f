"""The consent ledger, the compliance switches and the double opt-in flow."""

from __future__ import annotations

from datetime import timedelta
from importlib import import_module

import time_machine
from django.conf import settings
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.core import signing
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.db.migrations.recorder import MigrationRecorder
from django.test import TestCase, override_settings
from django.urls import include, path
from django.utils import timezone

import campaigns
from campaigns.delivery import message_render
from campaigns.models import Automation, EventType, Message, OutboxEvent
from campaigns.processing import events_process_batch
from campaigns.services import automation_set_active
from suppression.admin_compliance import ConsentNoticeAdmin, ConsentRecordAdmin
from suppression.consent import (
    CONFIRM_TOKEN_SALT,
    CONSENT_REQUESTED_EVENT,
    CONSENT_REQUESTED_SCHEMA,
    DOUBLE_OPT_IN_AUTOMATION,
    ConsentError,
    consent_collect,
    consent_confirm_token,
    consent_decision,
    consent_grant,
    consent_request,
    consent_state,
    consent_withdraw,
    double_opt_in_automation,
    double_opt_in_enabled,
    gdpr_applies,
)
from suppression.models.consent import AuditLogEntry, ConsentNotice, ConsentRecord, ImmutableRecordError
from suppression.privacy import email_hash
from tests import factories

# The lead mounts suppression.consent_urls under /consent/ in mailauto/urls.py and
# imports suppression.admin_compliance from suppression/admin.py; these tests mount both
# on their own (the admin classes on a site of their own).
consent_admin_site = admin.AdminSite(name="consent_test_admin")
consent_admin_site.register(ConsentNotice, ConsentNoticeAdmin)
consent_admin_site.register(ConsentRecord, ConsentRecordAdmin)
urlpatterns = [
    path("consent/", include("suppression.consent_urls")),
    path("admin/", consent_admin_site.urls),
]


def switches(**options: object) -> override_settings:
    return override_settings(MAILAUTO={**settings.MAILAUTO, **options})


ALL_OFF = {"GDPR": False, "CCPA": False, "CONSENT_CHECK": False}


class ConsentLedgerTests(TestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        cls.contact = factories.contact(user_id="u-ledger", email="Ledger@Example.com")
        cls.notice = ConsentNotice.objects.create(
            name="newsletter", version="1", text="We send news monthly."
        )

    def test_withdrawal_is_a_new_row_and_the_grant_stays_unchanged(self) -> None:
        grant = consent_grant(
            contact=self.contact,
            purpose="marketing",
            source="signup-form",
            notice=self.notice,
            ip="203.0.113.7",
            user_agent="Mozilla/5.0",
            evidence={"form": "footer"},
        )
        withdrawal = consent_withdraw(contact=self.contact, purpose="marketing", source="api")

        self.assertNotEqual(grant.pk, withdrawal.pk)
        self.assertEqual(ConsentRecord.objects.filter(contact=self.contact).count(), 2)
        grant.refresh_from_db()
        self.assertEqual(grant.action, ConsentRecord.Action.GRANTED)
        self.assertEqual(grant.ip_address, "203.0.113.7")
        self.assertEqual(grant.user_agent, "Mozilla/5.0")
        self.assertEqual(grant.notice, self.notice)
        self.assertEqual(grant.evidence, {"form": "footer"})
        self.assertEqual(grant.email_hash, email_hash("ledger@example.com"))
        self.assertEqual(withdrawal.action, ConsentRecord.Action.WITHDRAWN)

    def test_saving_an_existing_record_is_refused(self) -> None:
        grant = consent_grant(contact=self.contact, purpose="marketing", source="api")
        grant.action = ConsentRecord.Action.WITHDRAWN
        with self.assertRaises(ImmutableRecordError):
            grant.save()
        grant.refresh_from_db()
        self.assertEqual(grant.action, ConsentRecord.Action.GRANTED)

    def test_bulk_update_and_delete_are_refused(self) -> None:
        consent_grant(contact=self.contact, purpose="marketing", source="api")
        with self.assertRaises(ImmutableRecordError):
            ConsentRecord.objects.filter(contact=self.contact).update(action="withdrawn")
        with self.assertRaises(ImmutableRecordError):
            ConsentRecord.objects.filter(contact=self.contact).delete()
        self.assertEqual(
            list(ConsentRecord.objects.filter(contact=self.contact).values_list("action", flat=True)),
            ["granted"],
        )

    def test_latest_row_decides(self) -> None:
        start = timezone.now()
        with time_machine.travel(start, tick=False):
            consent_grant(contact=self.contact, purpose="marketing", source="api")
        self.assertEqual(consent_state(contact=self.contact, purpose="marketing").action, "granted")
        with time_machine.travel(start + timedelta(minutes=1), tick=False):
            consent_withdraw(contact=self.contact, purpose="marketing", source="api")
        self.assertEqual(consent_state(contact=self.contact, purpose="marketing").action, "withdrawn")
        with time_machine.travel(start + timedelta(minutes=2), tick=False):
            latest = consent_grant(contact=self.contact, purpose="marketing", source="admin")
        self.assertEqual(consent_state(contact=self.contact, purpose="marketing"), latest)

    def test_rows_in_the_same_instant_are_ordered_by_insertion(self) -> None:
        with time_machine.travel(timezone.now(), tick=False):
            consent_grant(contact=self.contact, purpose="marketing", source="api")
            withdrawal = consent_withdraw(contact=self.contact, purpose="marketing", source="api")
        self.assertEqual(consent_state(contact=self.contact, purpose="marketing"), withdrawal)

    def test_no_record_means_no_state_and_purposes_are_separate(self) -> None:
        self.assertIsNone(consent_state(contact=self.contact, purpose="marketing"))
        consent_grant(contact=self.contact, purpose="product-updates", source="api")
        self.assertIsNone(consent_state(contact=self.contact, purpose="marketing"))
        self.assertIsNotNone(consent_state(contact=self.contact, purpose="product-updates"))

    def test_a_pending_request_does_not_change_the_state(self) -> None:
        grant = consent_grant(contact=self.contact, purpose="marketing", source="api")
        with override_settings(ROOT_URLCONF=__name__):
            consent_request(contact=self.contact, purpose="marketing", source="signup-form")
        self.assertEqual(consent_state(contact=self.contact, purpose="marketing"), grant)

    def test_a_used_notice_cannot_be_changed_but_an_unused_one_can(self) -> None:
        draft = ConsentNotice.objects.create(name="draft", version="1", text="first wording")
        draft.text = "second wording"
        draft.save()
        consent_grant(contact=self.contact, purpose="marketing", source="api", notice=self.notice)

        self.notice.text = "Rewritten after the fact."
        with self.assertRaises(ImmutableRecordError):
            self.notice.save()
        self.notice.refresh_from_db()
        self.assertEqual(self.notice.text, "We send news monthly.")

    def test_an_erased_contact_cannot_change_consent(self) -> None:
        erased = factories.contact(user_id="u-gone")
        erased.erased_at = timezone.now()
        erased.save(update_fields=["erased_at"])
        with self.assertRaises(ConsentError):
            consent_grant(contact=erased, purpose="marketing", source="api")
        self.assertFalse(ConsentRecord.objects.filter(contact=erased).exists())

    def test_a_change_by_staff_is_audited_and_one_by_the_person_is_not(self) -> None:
        consent_grant(contact=self.contact, purpose="marketing", source="signup-form")
        self.assertFalse(AuditLogEntry.objects.exists())

        record = consent_withdraw(
            contact=self.contact, purpose="marketing", source="admin", actor="admin:root"
        )
        entry = AuditLogEntry.objects.get()
        self.assertEqual(entry.action, AuditLogEntry.Action.CONSENT_WITHDRAWN)
        self.assertEqual(entry.actor, "admin:root")
        self.assertEqual(entry.contact_pk, self.contact.pk)
        self.assertEqual(entry.detail["consent_record"], record.pk)
        self.assertNotIn("ledger@example.com", str(entry.detail).lower())


class ComplianceSwitchTests(TestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        cls.eu = factories.contact(user_id="u-eu")
        cls.eu.region = "DE "  # stored as typed; compared stripped and lower-cased
        cls.eu.save(update_fields=["region"])
        cls.us = factories.contact(user_id="u-us")
        cls.us.region = "us"
        cls.us.save(update_fields=["region"])
        cls.unknown = factories.contact(user_id="u-unknown")
        cls.opted_out = factories.contact(user_id="u-dns")
        cls.opted_out.region = "us"
        cls.opted_out.do_not_sell = True
        cls.opted_out.save(update_fields=["region", "do_not_sell"])

    def decide(self, contact: object, purpose: str = "marketing", transactional: bool = False) -> tuple:
        decision = consent_decision(contact=contact, purpose=purpose, transactional=transactional)
        return decision.allowed, decision.reason

    def test_with_every_switch_off_consent_is_not_required(self) -> None:
        with switches(**ALL_OFF):
            self.assertEqual(self.decide(self.eu), (True, ""))
            self.assertEqual(self.decide(self.opted_out, "advertising"), (True, ""))

    def test_consent_check_requires_a_grant_for_the_exact_purpose(self) -> None:
        with switches(**{**ALL_OFF, "CONSENT_CHECK": True}):
            self.assertEqual(self.decide(self.us), (False, "no consent recorded for 'marketing'"))
            consent_grant(contact=self.us, purpose="product-updates", source="api")
            self.assertEqual(self.decide(self.us), (False, "no consent recorded for 'marketing'"))
            consent_grant(contact=self.us, purpose="marketing", source="api")
            self.assertEqual(self.decide(self.us), (True, ""))

    def test_consent_check_honours_a_withdrawal(self) -> None:
        consent_grant(contact=self.us, purpose="marketing", source="api")
        consent_withdraw(contact=self.us, purpose="marketing", source="api")
        with switches(**{**ALL_OFF, "CONSENT_CHECK": True}):
            allowed, reason = self.decide(self.us)
        self.assertFalse(allowed)
        self.assertRegex(reason, r"^consent for 'marketing' withdrawn on \d{4}-\d{2}-\d{2}$")

    def test_consent_check_names_a_pending_double_opt_in(self) -> None:
        with override_settings(ROOT_URLCONF=__name__):
            consent_request(contact=self.us, purpose="marketing", source="signup-form")
        with switches(**{**ALL_OFF, "CONSENT_CHECK": True}):
            self.assertEqual(
                self.decide(self.us), (False, "consent for 'marketing' requested, not yet confirmed")
            )

    def test_consent_check_does_not_apply_to_transactional_mail(self) -> None:
        with switches(**{**ALL_OFF, "CONSENT_CHECK": True}):
            self.assertEqual(self.decide(self.us, "receipts", transactional=True), (True, ""))

    def test_gdpr_requires_consent_for_marketing_in_eu_regions_only(self) -> None:
        with switches(**{**ALL_OFF, "GDPR": True}):
            self.assertEqual(
                self.decide(self.eu), (False, "no consent recorded for 'marketing' (GDPR: region 'de')")
            )
            self.assertEqual(self.decide(self.us), (True, ""))
            self.assertEqual(self.decide(self.unknown), (True, ""))
            self.assertEqual(self.decide(self.eu, "receipts", transactional=True), (True, ""))
            consent_grant(contact=self.eu, purpose="marketing", source="signup-form")
            self.assertEqual(self.decide(self.eu), (True, ""))

    def test_gdpr_covers_an_unknown_region_only_when_listed(self) -> None:
        with switches(**{**ALL_OFF, "GDPR": True, "GDPR_REGIONS": ["eu", "unknown"]}):
            self.assertEqual(
                self.decide(self.unknown),
                (False, "no consent recorded for 'marketing' (GDPR: region unknown)"),
            )
            self.assertEqual(self.decide(self.eu), (True, ""))  # "de" is not listed here

    def test_a_changed_gdpr_region_list_takes_effect_at_once(self) -> None:
        # The normalised list is remembered; it must never outlive the setting.
        for listed, expected in ((["de"], True), (["FR "], False), (["de"], True), ([], False)):
            with self.subTest(listed=listed), switches(GDPR_REGIONS=listed):
                self.assertEqual(gdpr_applies(contact=self.eu), expected)
        with switches(GDPR_REGIONS=["fr"]):
            settings.MAILAUTO["GDPR_REGIONS"].append(" De")  # changed in place
            self.assertTrue(gdpr_applies(contact=self.eu))

    def test_gdpr_off_does_not_require_consent_in_the_eu(self) -> None:
        with switches(**ALL_OFF):
            self.assertEqual(self.decide(self.eu), (True, ""))

    def test_ccpa_blocks_sharing_purposes_for_do_not_sell_contacts(self) -> None:
        with switches(**{**ALL_OFF, "CCPA": True, "CCPA_SHARING_PURPOSES": ["sponsored"]}):
            self.assertEqual(
                self.decide(self.opted_out, "sponsored"),
                (False, "do-not-sell/share (CCPA): purpose 'sponsored' shares data with third parties"),
            )
            # Transactional or not: the flag is about sharing, not about consent.
            self.assertFalse(self.decide(self.opted_out, "sponsored", transactional=True)[0])
            # The business's own marketing is neither a sale nor sharing.
            self.assertEqual(self.decide(self.opted_out, "marketing"), (True, ""))
            # Contacts who did not opt out get sharing purposes.
            self.assertEqual(self.decide(self.us, "sponsored"), (True, ""))

    def test_ccpa_off_ignores_do_not_sell(self) -> None:
        with switches(**{**ALL_OFF, "CCPA_SHARING_PURPOSES": ["sponsored"]}):
            self.assertEqual(self.decide(self.opted_out, "sponsored"), (True, ""))

    def test_an_erased_contact_gets_nothing(self) -> None:
        self.us.erased_at = timezone.now()
        self.us.save(update_fields=["erased_at"])
        with switches(**ALL_OFF):
            self.assertEqual(
                self.decide(self.us, "receipts", transactional=True), (False, "contact erased (GDPR Art. 17)")
            )


@override_settings(ROOT_URLCONF=__name__, SITE_URL="https://mail.example.org")
class DoubleOptInTests(TestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        cls.contact = factories.contact(user_id="u-doi", email="doi@example.com")
        cls.notice = ConsentNotice.objects.create(
            name="newsletter", version="2", text="Monthly news; unsubscribe any time."
        )

    def request(self) -> tuple[ConsentRecord, str]:
        record = consent_request(
            contact=self.contact, purpose="newsletter", source="signup-form", notice=self.notice
        )
        event = OutboxEvent.objects.get(event_type__name=CONSENT_REQUESTED_EVENT)
        return record, event.payload["confirm_url"].removeprefix("https://mail.example.org")

    def grants(self) -> int:
        return ConsentRecord.objects.filter(action=ConsentRecord.Action.GRANTED).count()

    def test_request_records_a_request_and_emits_consent_requested(self) -> None:
        record = consent_request(
            contact=self.contact, purpose="newsletter", source="signup-form", notice=self.notice
        )

        self.assertEqual(record.action, ConsentRecord.Action.REQUESTED)
        event_type = EventType.objects.get(name=CONSENT_REQUESTED_EVENT)
        self.assertEqual(event_type.schema, CONSENT_REQUESTED_SCHEMA)
        event = OutboxEvent.objects.get(event_type=event_type)
        self.assertEqual(event.user_id, "u-doi")
        self.assertEqual(event.payload["purpose"], "newsletter")
        self.assertRegex(
            event.payload["confirm_url"], r"^https://mail\.example\.org/consent/confirm/[\w:-]+/$"
        )
        self.assertIsNone(consent_state(contact=self.contact, purpose="newsletter"))

    def test_repeated_requests_send_one_email_per_interval(self) -> None:
        start = timezone.now()
        with time_machine.travel(start, tick=False):
            first = consent_request(contact=self.contact, purpose="newsletter", source="signup-form")
        with time_machine.travel(start + timedelta(minutes=9), tick=False):
            again = consent_request(contact=self.contact, purpose="newsletter", source="signup-form")
        self.assertEqual(again, first)
        self.assertEqual(OutboxEvent.objects.count(), 1)
        with time_machine.travel(start + timedelta(minutes=11), tick=False):
            later = consent_request(contact=self.contact, purpose="newsletter", source="signup-form")
        self.assertNotEqual(later, first)
        self.assertEqual(OutboxEvent.objects.count(), 2)

    def test_a_second_request_reuses_the_event_type(self) -> None:
        consent_request(contact=self.contact, purpose="newsletter", source="signup-form")
        consent_request(contact=self.contact, purpose="offers", source="signup-form")
        self.assertEqual(EventType.objects.filter(name=CONSENT_REQUESTED_EVENT).count(), 1)
        self.assertEqual(OutboxEvent.objects.filter(event_type__name=CONSENT_REQUESTED_EVENT).count(), 2)

    def test_get_shows_the_page_and_changes_nothing(self) -> None:
        _, url = self.request()
        before = ConsentRecord.objects.count()

        response = self.client.get(url)

        self.assertContains(response, "newsletter")
        self.assertContains(response, "Monthly news; unsubscribe any time.")
        self.assertContains(response, '<form method="post">')
        self.assertEqual(ConsentRecord.objects.count(), before)

    def test_post_grants_with_ip_user_agent_and_the_request_as_evidence(self) -> None:
        request, url = self.request()

        response = self.client.post(url, REMOTE_ADDR="198.51.100.23", HTTP_USER_AGENT="MailApp/1.0")

        self.assertContains(response, "confirmed")
        grant = ConsentRecord.objects.get(action=ConsentRecord.Action.GRANTED)
        self.assertEqual(grant.contact, self.contact)
        self.assertEqual(grant.purpose, "newsletter")
        self.assertEqual(grant.source, "double-opt-in")
        self.assertEqual(grant.ip_address, "198.51.100.23")
        self.assertEqual(grant.user_agent, "MailApp/1.0")
        self.assertEqual(grant.notice, self.notice)
        self.assertEqual(grant.evidence["request_id"], request.pk)
        self.assertEqual(consent_state(contact=self.contact, purpose="newsletter"), grant)

    def test_confirming_twice_records_one_grant(self) -> None:
        _, url = self.request()
        self.client.post(url)
        second = self.client.post(url)
        self.assertEqual(second.status_code, 200)
        self.assertEqual(self.grants(), 1)

    def test_a_tampered_token_is_rejected_and_changes_nothing(self) -> None:
        _, url = self.request()
        token = url.removeprefix("/consent/confirm/").rstrip("/")
        tampered = f"/consent/confirm/{token[:-2]}{'AA' if token[-2:] != 'AA' else 'BB'}/"
        before = ConsentRecord.objects.count()

        self.assertEqual(self.client.get(tampered).status_code, 400)
        response = self.client.post(tampered)

        self.assertContains(response, "not valid", status_code=400)
        self.assertEqual(ConsentRecord.objects.count(), before)

    def test_an_expired_token_is_rejected_and_a_fresh_one_accepted(self) -> None:
        start = timezone.now()
        with time_machine.travel(start, tick=False):
            _, url = self.request()
        with time_machine.travel(start + timedelta(days=7, seconds=1), tick=False):
            response = self.client.post(url)
        self.assertContains(response, "expired", status_code=400)
        self.assertEqual(self.grants(), 0)
        with time_machine.travel(start + timedelta(days=6), tick=False):
            self.assertEqual(self.client.post(url).status_code, 200)
        self.assertEqual(self.grants(), 1)

    def test_a_token_signed_for_another_purpose_or_row_is_rejected(self) -> None:
        request, _ = self.request()
        grant = consent_grant(contact=self.contact, purpose="other", source="api")
        other_salt = signing.dumps({"r": request.pk}, salt="suppression.unsubscribe", compress=True)
        not_a_request = signing.dumps({"r": grant.pk}, salt=CONFIRM_TOKEN_SALT, compress=True)
        before = ConsentRecord.objects.count()

        for token in (other_salt, not_a_request):
            with self.subTest(token=token):
                self.assertEqual(self.client.post(f"/consent/confirm/{token}/").status_code, 400)
        self.assertEqual(ConsentRecord.objects.count(), before)

    def test_the_token_names_the_request_it_was_made_for(self) -> None:
        # Frozen clock: the token is signed with a timestamp in seconds, so two tokens
        # made across a second boundary differ (this test failed now and then).
        with time_machine.travel(timezone.now(), tick=False):
            request, url = self.request()
            self.assertIn(consent_confirm_token(record=request), url)

    def test_a_link_for_an_erased_contact_no_longer_applies(self) -> None:
        _, url = self.request()
        self.contact.erased_at = timezone.now()
        self.contact.save(update_fields=["erased_at"])
        self.assertEqual(self.client.post(url).status_code, 400)
        self.assertEqual(self.grants(), 0)

    def switch_double_opt_in(self, *, on: bool) -> None:
        # The admin's switch: the installed automation, activated or not.
        automation = double_opt_in_automation()
        automation_set_active(automation=automation, active=on)

    def test_the_migration_installs_the_double_opt_in_automation_switched_off(self) -> None:
        migration = ("suppression", "0003_double_opt_in_automation")
        self.assertIn(migration, MigrationRecorder(connection).applied_migrations())
        # Run it again on its own historical models, on a database without the rows (a
        # TransactionTestCase's flush removes them; the applied record stays).
        Automation.objects.filter(name=DOUBLE_OPT_IN_AUTOMATION).delete()
        historical = MigrationExecutor(connection).loader.project_state(migration).apps
        import_module("suppression.migrations.0003_double_opt_in_automation").install(historical, None)

        automation = Automation.objects.select_related("trigger").get(name=DOUBLE_OPT_IN_AUTOMATION)
        self.assertEqual(automation.trigger.name, CONSENT_REQUESTED_EVENT)
        self.assertEqual((automation.active, automation.is_transactional), (False, True))
        self.assertTrue(automation.template.versions.filter(status="published").exists())
        self.assertFalse(double_opt_in_enabled())
        self.assertEqual(double_opt_in_automation(), automation)  # found, not made again

    def test_collect_grants_at_once_or_asks_for_confirmation(self) -> None:
        self.switch_double_opt_in(on=False)
        direct = consent_collect(contact=self.contact, purpose="newsletter", source="signup-form")
        self.switch_double_opt_in(on=True)
        pending = consent_collect(contact=self.contact, purpose="offers", source="signup-form")
        self.assertEqual(direct.action, ConsentRecord.Action.GRANTED)
        self.assertEqual(pending.action, ConsentRecord.Action.REQUESTED)
        self.assertEqual(
            list(OutboxEvent.objects.values_list("payload__purpose", flat=True)),
            ["offers"],
        )

    def test_a_transactional_automation_on_the_event_queues_the_confirmation_email(self) -> None:
        _, url = self.request()
        version = factories.published_version(html='<p><a href="{{ payload.confirm_url }}">Confirm</a></p>')
        factories.automation(
            EventType.objects.get(name=CONSENT_REQUESTED_EVENT), version, is_transactional=True
        )

        events_process_batch()

        message = Message.objects.get()
        self.assertEqual(message.status, Message.Status.QUEUED)
        self.assertEqual(message.to_email, "doi@example.com")
        self.assertIn(f'href="https://mail.example.org{url}"', message_render(message=message).html)

    def test_the_installed_automation_emails_the_link_once_switched_on(self) -> None:
        self.switch_double_opt_in(on=True)
        consent_collect(contact=self.contact, purpose="newsletter", source="signup-form")
        url = OutboxEvent.objects.get(event_type__name=CONSENT_REQUESTED_EVENT).payload["confirm_url"]

        events_process_batch()

        message = Message.objects.get()
        self.assertEqual((message.status, message.automation.name), ("queued", DOUBLE_OPT_IN_AUTOMATION))
        rendered = message_render(message=message)
        self.assertEqual(rendered.subject, "Please confirm your subscription")
        self.assertIn(f'href="{url}"', rendered.html)

    def test_identify_with_double_opt_in_asks_once_instead_of_granting(self) -> None:
        self.switch_double_opt_in(on=True)
        for _ in range(3):  # an application that calls identify() on every login
            campaigns.identify("u-doi", email="doi@example.com", consent={"newsletter": True})

        self.assertIsNone(consent_state(contact=self.contact, purpose="newsletter"))
        self.assertEqual(
            list(ConsentRecord.objects.values_list("action", "source")), [("requested", "identify")]
        )
        self.assertEqual(OutboxEvent.objects.filter(event_type__name=CONSENT_REQUESTED_EVENT).count(), 1)

        self.switch_double_opt_in(on=False)
        campaigns.identify("u-doi", email="doi@example.com", consent={"newsletter": True})
        self.assertEqual(consent_state(contact=self.contact, purpose="newsletter").action, "granted")


@override_settings(ROOT_URLCONF=__name__)
class ConsentAdminTests(TestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        cls.root = get_user_model().objects.create_superuser("root", "root@example.org", "pw")
        cls.contact = factories.contact(user_id="u-admin", email="admin-made@example.com")
        cls.notice = ConsentNotice.objects.create(name="phone", version="1", text="Said yes on the phone.")

    def setUp(self) -> None:
        self.client.force_login(self.root)

    def test_staff_record_consent_through_the_service_and_are_audited(self) -> None:
        response = self.client.post(
            "/admin/suppression/consentrecord/add/",
            {
                "contact": self.contact.pk,
                "purpose": "marketing",
                "action": "granted",
                "notice": self.notice.pk,
                "note": "call on 3 March",
            },
        )

        self.assertEqual(response.status_code, 302)
        record = ConsentRecord.objects.get()
        self.assertEqual((record.action, record.source), ("granted", "admin"))
        self.assertEqual(record.evidence, {"note": "call on 3 March"})
        self.assertEqual(record.email_hash, email_hash("admin-made@example.com"))
        entry = AuditLogEntry.objects.get()
        self.assertEqual((entry.action, entry.actor), ("consent_granted", "admin:root"))

    def test_the_ledger_cannot_be_edited_in_the_admin(self) -> None:
        record = consent_grant(contact=self.contact, purpose="marketing", source="api")
        url = f"/admin/suppression/consentrecord/{record.pk}/change/"

        self.assertEqual(self.client.get(url).status_code, 200)
        response = self.client.post(
            url, {"purpose": "other", "action": "withdrawn", "contact": self.contact.pk}
        )

        self.assertEqual(response.status_code, 403)
        record.refresh_from_db()
        self.assertEqual(record.purpose, "marketing")

    def test_a_used_notice_is_read_only_and_an_unused_one_editable(self) -> None:
        unused = ConsentNotice.objects.create(name="draft", version="1", text="draft")
        consent_grant(contact=self.contact, purpose="marketing", source="api", notice=self.notice)
        data = {"name": "phone", "version": "1", "text": "Rewritten."}

        used = self.client.post(f"/admin/suppression/consentnotice/{self.notice.pk}/change/", data)
        editable = self.client.post(
            f"/admin/suppression/consentnotice/{unused.pk}/change/", {**data, "name": "draft"}
        )

        self.assertEqual(used.status_code, 403)
        self.notice.refresh_from_db()
        self.assertEqual(self.notice.text, "Said yes on the phone.")
        self.assertEqual(editable.status_code, 302)
        unused.refresh_from_db()
        self.assertEqual(unused.text, "Rewritten.")
