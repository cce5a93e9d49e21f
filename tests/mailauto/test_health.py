"""/health/ reports the database, the broker and the ESP configuration."""

from __future__ import annotations

from django.test import TestCase, override_settings


class HealthTests(TestCase):
    def test_healthy_when_database_broker_and_esp_answer(self) -> None:
        response = self.client.get("/health/")
        body = response.json()
        self.assertEqual(response.status_code, 200, body)
        self.assertEqual(body["status"], "ok")
        self.assertEqual(body["checks"]["database"], "ok")
        self.assertEqual(body["checks"]["broker"], "ok")
        self.assertTrue(body["checks"]["esp"].startswith("ok"))

    def test_unhealthy_with_503_when_the_esp_is_misconfigured(self) -> None:
        with override_settings(
            ANYMAIL={"WEBHOOK_SECRET": "a:b"}, EMAIL_BACKEND="anymail.backends.postmark.EmailBackend"
        ):
            response = self.client.get("/health/")
        self.assertEqual(response.status_code, 503)
        self.assertIn("error", response.json()["checks"]["esp"])

    def test_unhealthy_when_the_broker_is_unreachable(self) -> None:
        from mailauto.celery import app

        original = app.conf.broker_url
        app.conf.broker_url = "redis://127.0.0.1:1/0"
        try:
            response = self.client.get("/health/")
        finally:
            app.conf.broker_url = original
        self.assertEqual(response.status_code, 503)
        self.assertIn("error", response.json()["checks"]["broker"])
