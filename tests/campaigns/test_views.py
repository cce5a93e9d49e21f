"""POST /api/events/: token auth, one event or a list, field-level errors."""

from __future__ import annotations

import json
from unittest import mock

from django.core.cache import cache
from django.test import TestCase, override_settings

from campaigns.models import OutboxEvent
from campaigns.services import api_source_create
from mailauto.lib import nudge
from tests import factories


class EventsApiTests(TestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        factories.event_type()
        cls.source, cls.token = api_source_create(name="billing")

    def setUp(self) -> None:
        cache.clear()
        patcher = mock.patch("campaigns.tasks.events_process.apply_async")
        self.nudge = patcher.start()
        self.addCleanup(patcher.stop)
        self.addCleanup(nudge.flush_pending)  # runs first: deferred nudges reach the mock

    def post(self, body: object, token: str | None = None, content_type: str = "application/json"):  # type: ignore[no-untyped-def]
        headers = {"Authorization": f"Bearer {token or self.token}"}
        data = body if isinstance(body, str | bytes) else json.dumps(body)
        return self.client.post("/api/events/", data=data, content_type=content_type, headers=headers)

    def test_one_event_is_accepted_with_202(self) -> None:
        with self.captureOnCommitCallbacks(execute=True):
            response = self.post(
                {"event_type": "user.signed_up", "user_id": "u-1", "payload": {"plan": "pro"}}
            )
        self.assertEqual(response.status_code, 202)
        event = OutboxEvent.objects.get(event_id=response.json()["event_id"])
        self.assertEqual(event.source, "billing")
        nudge.flush_pending()
        self.nudge.assert_called_once()

    def test_a_list_of_events_is_accepted(self) -> None:
        response = self.post(
            [
                {
                    "event_type": "user.signed_up",
                    "user_id": "u-1",
                    "payload": {"plan": "pro"},
                    "event_id": "a",
                },
                {
                    "event_type": "user.signed_up",
                    "user_id": "u-2",
                    "payload": {"plan": "free"},
                    "event_id": "b",
                },
            ]
        )
        self.assertEqual(response.status_code, 202)
        self.assertEqual(response.json(), {"event_ids": ["a", "b"]})
        self.assertEqual(OutboxEvent.objects.count(), 2)

    def test_missing_or_wrong_token_is_401(self) -> None:
        body = json.dumps({"event_type": "user.signed_up", "user_id": "u-1", "payload": {"plan": "pro"}})
        self.assertEqual(
            self.client.post("/api/events/", body, content_type="application/json").status_code, 401
        )
        self.assertEqual(self.post(json.loads(body), token="wrong").status_code, 401)
        self.assertFalse(OutboxEvent.objects.exists())

    def test_inactive_source_is_401(self) -> None:
        self.source.active = False
        self.source.save()
        response = self.post({"event_type": "user.signed_up", "user_id": "u-1", "payload": {"plan": "pro"}})
        self.assertEqual(response.status_code, 401)

    def test_bad_payload_is_400_with_field_errors_and_nothing_written(self) -> None:
        response = self.post({"event_type": "user.signed_up", "user_id": "u-1", "payload": {"plan": 7}})
        self.assertEqual(response.status_code, 400)
        self.assertIn("payload.plan", response.json()["errors"])
        self.assertFalse(OutboxEvent.objects.exists())

    def test_one_bad_event_in_a_list_rejects_all(self) -> None:
        response = self.post(
            [
                {"event_type": "user.signed_up", "user_id": "u-1", "payload": {"plan": "pro"}},
                {"event_type": "nope", "user_id": "u-2", "payload": {}},
            ]
        )
        self.assertEqual(response.status_code, 400)
        self.assertIn("events[1].event_type", response.json()["errors"])
        self.assertFalse(OutboxEvent.objects.exists())

    def test_malformed_json_is_400(self) -> None:
        response = self.post("{not json")
        self.assertEqual(response.status_code, 400)
        self.assertIn("not valid JSON", response.json()["error"])

    def test_wrong_content_type_is_415(self) -> None:
        response = self.post("a=b", content_type="application/x-www-form-urlencoded")
        self.assertEqual(response.status_code, 415)

    def test_get_is_405(self) -> None:
        self.assertEqual(self.client.get("/api/events/").status_code, 405)

    def test_rate_limit_answers_429(self) -> None:
        from django.conf import settings

        with override_settings(MAILAUTO={**settings.MAILAUTO, "EVENTS_API_RATE_LIMIT": "2/m"}):
            codes = [
                self.post(
                    {"event_type": "user.signed_up", "user_id": "u", "payload": {"plan": "pro"}}
                ).status_code
                for _ in range(3)
            ]
        self.assertEqual(codes, [202, 202, 429])
