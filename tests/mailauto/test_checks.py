"""System checks: stable ids for dangerous or missing configuration."""

from __future__ import annotations

from django.conf import settings
from django.test import SimpleTestCase, override_settings

from mailauto import checks


class CheckTests(SimpleTestCase):
    def ids(self, results: list) -> set[str]:
        return {r.id for r in results}

    def test_default_configuration_passes(self) -> None:
        self.assertEqual(checks.check_esp(None), [])
        self.assertEqual(checks.check_mailauto_options(None), [])

    def test_missing_esp_key_is_E001(self) -> None:
        with override_settings(
            ANYMAIL={"WEBHOOK_SECRET": "a:b"}, EMAIL_BACKEND="anymail.backends.postmark.EmailBackend"
        ):
            self.assertIn("mailauto.E001", self.ids(checks.check_esp(None)))

    def test_missing_webhook_secret_is_E002(self) -> None:
        anymail = {k: v for k, v in settings.ANYMAIL.items() if k != "WEBHOOK_SECRET"}
        with override_settings(ANYMAIL=anymail):
            self.assertIn("mailauto.E002", self.ids(checks.check_esp(None)))

    def test_an_empty_webhook_secret_is_E002_and_a_list_with_one_real_one_is_not(self) -> None:
        for secret, flagged in [("", True), ([""], True), ([], True), (["", "a:b"], False), ("a:b", False)]:
            with (
                self.subTest(secret=secret),
                override_settings(ANYMAIL={**settings.ANYMAIL, "WEBHOOK_SECRET": secret}),
            ):
                self.assertEqual("mailauto.E002" in self.ids(checks.check_esp(None)), flagged)

    def test_non_utc_time_zone_is_W001(self) -> None:
        with override_settings(TIME_ZONE="Europe/Amsterdam"):
            self.assertEqual(self.ids(checks.check_time_zone(None)), {"mailauto.W001"})

    def test_bad_option_is_E003(self) -> None:
        with override_settings(MAILAUTO={**settings.MAILAUTO, "RETRY_MAX_ATTEMPTS": 0}):
            self.assertEqual(self.ids(checks.check_mailauto_options(None)), {"mailauto.E003"})

    def test_deploy_checks_flag_the_development_defaults(self) -> None:
        with override_settings(SECRET_KEY=checks.DEV_SECRET_KEY, DEBUG=True):
            ids = self.ids(checks.check_production_secrets(None))
        self.assertTrue({"mailauto.E010", "mailauto.E011", "mailauto.E012", "mailauto.E013"} <= ids)
