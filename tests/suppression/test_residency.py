"""Data residency: which contacts' regions may be processed."""

from __future__ import annotations

from django.conf import settings
from django.test import SimpleTestCase, TestCase, override_settings

from suppression.residency import region_allowed, residency_decision
from tests import factories


def regions(*allowed: str) -> override_settings:
    return override_settings(MAILAUTO={**settings.MAILAUTO, "ALLOWED_REGIONS": list(allowed)})


class RegionAllowedTests(SimpleTestCase):
    def test_an_empty_list_allows_every_region_including_unknown(self) -> None:
        with regions():
            for region in ("eu", "us", "", "anything"):
                with self.subTest(region=region):
                    self.assertTrue(region_allowed(region))

    def test_a_configured_list_allows_only_listed_regions(self) -> None:
        with regions("eu", "ch"):
            self.assertTrue(region_allowed("eu"))
            self.assertTrue(region_allowed(" EU "))
            self.assertTrue(region_allowed("ch"))
            self.assertFalse(region_allowed("us"))
            # No aliases: "eu" does not stand for its member states.
            self.assertFalse(region_allowed("de"))

    def test_a_changed_setting_takes_effect_at_once(self) -> None:
        # The normalised list is remembered; it must never outlive the setting.
        with regions("eu"):
            self.assertFalse(region_allowed("ch"))
        with regions("CH "):
            self.assertTrue(region_allowed("ch"))
            self.assertFalse(region_allowed("eu"))
            settings.MAILAUTO["ALLOWED_REGIONS"].append("eu")  # changed in place
            self.assertTrue(region_allowed("eu"))
        with regions("eu"):
            self.assertFalse(region_allowed("ch"))
        with regions():
            self.assertTrue(region_allowed("ch"))

    def test_an_unknown_region_needs_unknown_listed(self) -> None:
        with regions("eu"):
            self.assertFalse(region_allowed(""))
        with regions("eu", "unknown"):
            self.assertTrue(region_allowed(""))
            self.assertTrue(region_allowed("  "))
        with regions("eu", ""):
            self.assertTrue(region_allowed(""))

    def test_the_setting_is_compared_case_insensitively(self) -> None:
        with regions("EU"):
            self.assertTrue(region_allowed("eu"))


class ResidencyDecisionTests(TestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        cls.eu = factories.contact(user_id="u-eu")
        cls.eu.region = "eu"
        cls.eu.save(update_fields=["region"])
        cls.us = factories.contact(user_id="u-us")
        cls.us.region = "us"
        cls.us.save(update_fields=["region"])
        cls.nowhere = factories.contact(user_id="u-nowhere")

    def test_allowed_contacts_have_no_reason(self) -> None:
        with regions("eu"):
            self.assertEqual(residency_decision(contact=self.eu), (True, ""))
        with regions():
            self.assertEqual(residency_decision(contact=self.us), (True, ""))
            self.assertEqual(residency_decision(contact=self.nowhere), (True, ""))

    def test_a_contact_outside_the_allowed_regions_is_refused_with_a_reason(self) -> None:
        with regions("eu", "ch"):
            self.assertEqual(
                residency_decision(contact=self.us),
                (False, "contact region 'us' is not in ALLOWED_REGIONS (ch, eu)"),
            )

    def test_a_contact_without_region_is_refused_when_a_list_is_configured(self) -> None:
        with regions("eu"):
            self.assertEqual(
                residency_decision(contact=self.nowhere),
                (False, "contact region unknown; ALLOWED_REGIONS (eu) does not list 'unknown'"),
            )
        with regions("eu", "unknown"):
            self.assertEqual(residency_decision(contact=self.nowhere), (True, ""))
