"""/metrics in Prometheus text format, and structured logs without personal data."""

from __future__ import annotations

import json
import logging
import re

from django.conf import settings
from django.core.cache import cache
from django.test import override_settings

from campaigns.delivery import messages_send_batch
from campaigns.models import Message
from mailauto.lib.structured_logs import JsonFormatter, KeyValueFormatter
from tests import factories
from tests.campaigns.test_delivery import SandboxTestCase


def sample(body: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", body, re.MULTILINE)
    assert match, f"{name} not in metrics"
    return float(match.group(1))


class MetricsTests(SandboxTestCase):
    def setUp(self) -> None:
        super().setUp()
        cache.clear()

    def test_sends_latency_and_queue_depths_are_exported(self) -> None:
        self.queued()
        factories.message(self.version, self.contact, self.event, status=Message.Status.DEAD)
        before = self.client.get("/metrics").content.decode()
        self.assertEqual(sample(before, 'mailauto_messages_in_flight{status="queued"}'), 1)
        self.assertEqual(sample(before, 'mailauto_sends_total{outcome="sent"}'), 0)

        messages_send_batch()
        response = self.client.get("/metrics")
        self.assertEqual(response.status_code, 200)
        self.assertTrue(response["Content-Type"].startswith("text/plain; version=0.0.4"))
        body = response.content.decode()
        self.assertEqual(sample(body, 'mailauto_sends_total{outcome="sent"}'), 1)
        self.assertEqual(sample(body, "mailauto_esp_requests_total"), 1)
        self.assertEqual(sample(body, 'mailauto_messages_in_flight{status="queued"}'), 0)
        self.assertEqual(sample(body, 'mailauto_dead_letters{kind="message"}'), 1)
        self.assertEqual(sample(body, "mailauto_event_to_esp_seconds_count"), 1)
        self.assertEqual(sample(body, 'mailauto_event_to_esp_seconds_bucket{le="+Inf"}'), 1)
        self.assertIn('mailauto_broker_queue_length{queue="sends"}', body)

    def test_retries_are_counted(self) -> None:
        self.queued()
        self.sandbox.set_faults(fail_503=1)
        messages_send_batch()
        body = self.client.get("/metrics").content.decode()
        self.assertEqual(sample(body, "mailauto_retries_total"), 1)

    def test_the_effective_rate_drops_after_a_429(self) -> None:
        ceiling = settings.MAILAUTO["RATE_LIMIT_PER_SECOND"]
        self.queued()
        self.sandbox.set_faults(fail_429=1)
        messages_send_batch()
        body = self.client.get("/metrics").content.decode()
        self.assertEqual(sample(body, 'mailauto_rate_limit_per_second{bucket="esp",kind="ceiling"}'), ceiling)
        self.assertLess(
            sample(body, 'mailauto_rate_limit_per_second{bucket="esp",kind="effective"}'), ceiling
        )

    def test_token_protects_the_endpoint_when_set(self) -> None:
        with override_settings(MAILAUTO={**settings.MAILAUTO, "METRICS_TOKEN": "s3cret"}):
            self.assertEqual(self.client.get("/metrics").status_code, 401)
            ok = self.client.get("/metrics", headers={"Authorization": "Bearer s3cret"})
            self.assertEqual(ok.status_code, 200)

    def test_delivery_logs_carry_ids_and_no_address(self) -> None:
        message = self.queued()
        with self.assertLogs("campaigns.delivery", level="INFO") as logs:
            messages_send_batch()
        record = logs.records[-1]
        line = KeyValueFormatter("%(message)s").format(record)
        self.assertIn(str(message.pk), line)
        as_json = json.loads(JsonFormatter().format(record))
        self.assertEqual(as_json["message_ids"], [message.pk])
        self.assertEqual(as_json["outbox_event_ids"], [message.event_id])
        self.assertIsNotNone(message.event_id)
        for r in logs.records:
            self.assertNotIn("@", KeyValueFormatter("%(message)s").format(r))
            self.assertNotIn("ada@example.com", JsonFormatter().format(r))


def test_key_value_formatter_appends_extras() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "event failed", (), None)
    record.event_id = "e-1"
    assert KeyValueFormatter("%(message)s").format(record) == 'event failed event_id="e-1"'


class FailureLogTests(SandboxTestCase):
    """A failure's log lines carry ids and where it happened, never the exception's
    message: database and validation errors quote the values they refused."""

    def test_a_failing_event_logs_its_row_id_and_a_traceback_without_personal_data(self) -> None:
        from unittest import mock

        from campaigns import processing

        event = factories.outbox_event(self.type, "u-1", event_id="signup-ada@example.com")

        def boom(**kwargs: object) -> None:
            detail = "Key (email)=(ada" + "@example.com) already exists"  # as Postgres says it
            raise ValueError(detail)

        with (
            mock.patch.object(processing, "event_plan", side_effect=boom),
            self.assertLogs("campaigns.processing", level="WARNING") as logs,
        ):
            processing.events_process_batch()
        failed = [r for r in logs.records if r.getMessage() == "event processing failed"]
        self.assertIn(event.pk, [r.outbox_event_id for r in failed])  # type: ignore[attr-defined]
        for record in logs.records:
            for formatted in (
                KeyValueFormatter("%(message)s").format(record),
                JsonFormatter().format(record),
            ):
                self.assertNotIn("@", formatted)
                self.assertIn("ValueError (message not logged", formatted)
                self.assertIn("in boom", formatted)  # where it happened is still there
        event.refresh_from_db()
        self.assertIn("ada@example.com", event.last_error)  # the admin still shows the message


def test_a_chained_exception_shows_every_type_and_no_message() -> None:
    address = "ada" + "@example.com"  # not on the lines the traceback quotes
    try:
        try:
            raise KeyError(address)
        except KeyError as inner:
            raise RuntimeError(f"for {address}") from inner
    except RuntimeError:
        import sys

        text = JsonFormatter().formatException(sys.exc_info())
    assert "@" not in text
    assert "builtins.KeyError" in text and "builtins.RuntimeError" in text
    assert text.index("KeyError") < text.index("RuntimeError")
