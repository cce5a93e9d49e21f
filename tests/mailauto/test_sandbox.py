"""The local ESP sandbox, over real HTTP: Anymail's Postmark backend against it, the
batch endpoint, fault injection, webhooks back to a local receiver, the control API and
the two ways of running it."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from anymail.exceptions import AnymailAPIError, AnymailRecipientsRefused, AnymailRequestsAPIError
from anymail.message import AnymailMessage
from anymail.signals import EventType
from anymail.webhooks.postmark import PostmarkTrackingWebhookView
from django.test import override_settings

from mailauto.sandbox import SandboxClient, SandboxError, SandboxServer

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "postmark"
BASE_DIR = Path(__file__).resolve().parent.parent.parent
TOKEN = "test-server-token"


# --- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(server_token=TOKEN) as server:
        yield server


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as r:
        yield r


@pytest.fixture
def webhook_sandbox(receiver: WebhookReceiver) -> Iterator[SandboxServer]:
    with SandboxServer(
        server_token=TOKEN,
        webhook_url=receiver.url + "webhooks/postmark/tracking/",
        webhook_auth="hook-user:hook-pass",
        webhook_backoff_s=0.01,
    ) as server:
        yield server


class WebhookReceiver:
    """A stand-in for the app's webhook endpoint: records every POST, and answers with
    the statuses queued in `statuses` first, then 200."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.statuses: list[int] = []
        self._cond = threading.Condition()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with outer._cond:
                    status = outer.statuses.pop(0) if outer.statuses else 200
                    outer.posts.append(
                        {"path": self.path, "headers": dict(self.headers), "json": json.loads(body)}
                    )
                    outer._cond.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/"

    def wait_for(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        with self._cond:
            self._cond.wait_for(lambda: len(self.posts) >= count, timeout=timeout)
            assert len(self.posts) >= count, f"received {len(self.posts)} of {count} webhooks"
            return list(self.posts)

    def payloads(self) -> list[dict[str, Any]]:
        with self._cond:
            return [p["json"] for p in self.posts]

    def __enter__(self) -> WebhookReceiver:
        threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@contextmanager
def anymail_to(sandbox: SandboxServer, token: str = TOKEN) -> Iterator[None]:
    with override_settings(
        EMAIL_BACKEND="anymail.backends.postmark.EmailBackend",
        ANYMAIL={"POSTMARK_SERVER_TOKEN": token, "POSTMARK_API_URL": sandbox.url, "WEBHOOK_SECRET": "u:p"},
    ):
        yield


def message(to: str = "alice@example.com", **kwargs: Any) -> AnymailMessage:
    kwargs.setdefault("subject", "Welcome")
    kwargs.setdefault("body", "Hello there")
    kwargs.setdefault("from_email", "Shop <hello@shop.test>")
    return AnymailMessage(to=[to], **kwargs)


def post_json(sandbox: SandboxServer, path: str, data: Any, token: str = TOKEN) -> requests.Response:
    return requests.post(
        sandbox.url + path,
        data=data if isinstance(data, str | bytes) else json.dumps(data),
        headers={
            "X-Postmark-Server-Token": token,
            "Content-Type": "application/json",
            "Accept": "application/json",
        },
        timeout=10,
    )


def postmark_message(to: str, **extra: Any) -> dict[str, Any]:
    return {"From": "hello@shop.test", "To": to, "Subject": "Hi", "TextBody": "Hello", **extra}


def as_anymail_event(payload: dict[str, Any]) -> Any:
    """Read a webhook body exactly as the app's Anymail tracking view will."""
    with override_settings(ANYMAIL={"WEBHOOK_SECRET": "u:p"}):
        return PostmarkTrackingWebhookView().esp_to_anymail_event(payload)


# --- Anymail's Postmark backend against the sandbox ------------------------------------------


def test_anymail_send_returns_the_sandbox_message_id(sandbox: SandboxServer) -> None:
    msg = message(to="Alice <alice@example.com>")
    with anymail_to(sandbox):
        msg.send()

    [recorded] = sandbox.messages()
    assert msg.anymail_status.message_id == recorded["message_id"]
    assert msg.anymail_status.recipients["alice@example.com"].status == "sent"
    assert recorded["from"] == "hello@shop.test"
    assert recorded["to"] == ["alice@example.com"]
    assert recorded["subject"] == "Welcome"
    assert recorded["text"] == "Hello there"


def test_anymail_metadata_tag_headers_and_stream_are_recorded(sandbox: SandboxServer) -> None:
    msg = message(
        cc=["carol@example.com"],
        bcc=["bob@example.com"],
        headers={"List-Unsubscribe": "<https://shop.test/u/1>"},
        metadata={"mailauto_message_id": "42", "automation": "welcome"},
        tags=["welcome"],
        esp_extra={"MessageStream": "broadcast"},
    )
    msg.attach_alternative("<p>Hello <a href='https://shop.test/x'>there</a></p>", "text/html")
    with anymail_to(sandbox):
        msg.send()

    recorded = sandbox.message(msg.anymail_status.message_id)
    assert recorded is not None
    assert recorded["metadata"] == {"mailauto_message_id": "42", "automation": "welcome"}
    assert recorded["tag"] == "welcome"
    assert recorded["message_stream"] == "broadcast"
    assert recorded["headers"] == {"List-Unsubscribe": "<https://shop.test/u/1>"}
    assert (recorded["cc"], recorded["bcc"]) == (["carol@example.com"], ["bob@example.com"])
    assert recorded["html"].startswith("<p>Hello")
    assert recorded["raw"]["Metadata"] == recorded["metadata"]


def test_only_inactive_recipient_is_refused_with_error_406(sandbox: SandboxServer) -> None:
    with anymail_to(sandbox), pytest.raises(AnymailRecipientsRefused):
        message(to="inactive@example.com").send()

    response = post_json(sandbox, "email", postmark_message("inactive.2@example.com"))
    assert response.status_code == 422
    assert response.json()["ErrorCode"] == 406
    assert sandbox.messages() == []
    assert sandbox.stats()["rejected"] == 2


def test_partly_inactive_message_is_sent_to_the_active_recipients_only(sandbox: SandboxServer) -> None:
    msg = AnymailMessage("Hi", "Hello", "hello@shop.test", ["alice@example.com", "Inactive-7@Example.com"])
    with anymail_to(sandbox):
        msg.send()

    statuses = msg.anymail_status.recipients
    assert statuses["alice@example.com"].status == "sent"
    assert statuses["Inactive-7@Example.com"].status == "rejected"
    [recorded] = sandbox.messages()
    assert recorded["inactive"] == ["inactive-7@example.com"]


@pytest.mark.parametrize(
    ("data", "message_start"),
    [
        (postmark_message("not-an-address"), "Invalid 'To' address: 'not-an-address'"),
        (postmark_message("alice@example.com", Cc="x@bad domain"), "Invalid 'Cc' address"),
        ({"To": "alice@example.com", "TextBody": "Hello"}, "Invalid 'From' address"),
        ({"From": "hello@shop.test", "TextBody": "Hello"}, "Zero recipients specified"),
        (postmark_message("alice@example.com", TextBody=""), "Provide either email TextBody or HtmlBody"),
        (postmark_message(", ".join(f"r{n}@example.com" for n in range(51))), "Maximum of 50 recipients"),
        (postmark_message("alice@example.com", Metadata={"nested": {"no": 1}}), "Invalid metadata content"),
    ],
)
def test_invalid_message_is_refused_with_error_300(
    sandbox: SandboxServer, data: dict[str, Any], message_start: str
) -> None:
    response = post_json(sandbox, "email", data)

    assert response.status_code == 422
    assert response.json()["ErrorCode"] == 300
    assert response.json()["Message"].startswith(message_start)
    assert sandbox.messages() == []


def test_fifty_recipients_are_allowed(sandbox: SandboxServer) -> None:
    to = ", ".join(f"r{n}@example.com" for n in range(25))
    cc = ", ".join(f"c{n}@example.com" for n in range(25))

    response = post_json(sandbox, "email", postmark_message(to, Cc=cc))

    assert response.status_code == 200, response.text
    assert len(sandbox.messages(to="c24@example.com")) == 1


def test_anymail_reports_invalid_recipient(sandbox: SandboxServer) -> None:
    # Anymail validates syntax itself; this address passes Anymail but not Postmark's
    # stricter mailbox rule (no spaces or parentheses in the local part).
    with anymail_to(sandbox), pytest.raises(AnymailRecipientsRefused):
        message(to='"a(b)"@example.com').send()


def test_bad_token_raises_api_error_401(sandbox: SandboxServer) -> None:
    with anymail_to(sandbox, token="wrong-token"), pytest.raises(AnymailAPIError) as excinfo:
        message().send()

    assert excinfo.value.status_code == 401
    assert excinfo.value.response.json()["ErrorCode"] == 10
    assert sandbox.messages() == []
    assert sandbox.stats()["by_status"] == {"401": 1}


# --- the batch endpoint ----------------------------------------------------------------------


def test_batch_of_500_answers_one_result_per_message_in_order(sandbox: SandboxServer) -> None:
    batch = [
        postmark_message(
            f"inactive-{n}@example.com" if n == 7 else f"user{n}@example.com", Metadata={"n": str(n)}
        )
        for n in range(500)
    ]
    batch[300]["To"] = "broken"

    response = post_json(sandbox, "email/batch", batch)

    assert response.status_code == 200
    results = response.json()
    assert len(results) == 500
    assert results[7]["ErrorCode"] == 406
    assert "inactive-7@example.com" in results[7]["Message"]
    assert results[300]["ErrorCode"] == 300
    ok = [r for n, r in enumerate(results) if n not in (7, 300)]
    assert all(r["ErrorCode"] == 0 and r["Message"] == "OK" for r in ok)
    assert [r["To"] for r in results[:3]] == ["user0@example.com", "user1@example.com", "user2@example.com"]
    assert len({r["MessageID"] for r in ok}) == 498
    recorded = sandbox.messages()
    assert [m["message_id"] for m in recorded] == [r["MessageID"] for r in ok]
    assert recorded[0]["metadata"] == {"n": "0"}
    assert recorded[0]["endpoint"] == "email/batch"
    stats = sandbox.stats()
    assert (stats["accepted"], stats["rejected"], stats["batch_requests"]) == (498, 2, 1)


def test_batch_over_500_messages_is_refused(sandbox: SandboxServer) -> None:
    response = post_json(sandbox, "email/batch", [postmark_message(f"u{n}@example.com") for n in range(501)])

    assert response.status_code == 422
    assert response.json()["ErrorCode"] == 410
    assert sandbox.messages() == []


def test_anymail_batch_send_uses_the_batch_endpoint(sandbox: SandboxServer) -> None:
    msg = AnymailMessage("Hi", "Hello", "hello@shop.test", ["a@example.com", "b@example.com"])
    msg.merge_metadata = {"a@example.com": {"k": "a"}, "b@example.com": {"k": "b"}}
    with anymail_to(sandbox):
        msg.send()

    recorded = sandbox.messages()
    assert {m["endpoint"] for m in recorded} == {"email/batch"}
    by_to = {m["to"][0]: m for m in recorded}
    assert msg.anymail_status.recipients["b@example.com"].message_id == by_to["b@example.com"]["message_id"]
    assert by_to["b@example.com"]["metadata"] == {"k": "b"}


# --- malformed input ----------------------------------------------------------------------------


def test_malformed_json_answers_422_error_402_and_server_keeps_serving(sandbox: SandboxServer) -> None:
    response = post_json(sandbox, "email", b'{"From": "a@b.c", "To": ')

    assert response.status_code == 422
    assert response.json() == {"ErrorCode": 402, "Message": "Received invalid JSON input."}
    assert post_json(sandbox, "email", b"\xff\xfe").json()["ErrorCode"] == 402
    assert post_json(sandbox, "email/batch", {"not": "a list"}).json()["ErrorCode"] == 403
    assert post_json(sandbox, "email", postmark_message("alice@example.com")).status_code == 200


def test_unknown_path_and_wrong_method_answer_json_errors(sandbox: SandboxServer) -> None:
    assert requests.post(sandbox.url + "email/withTemplate", json={}, timeout=5).status_code == 404
    assert requests.get(sandbox.url + "email", timeout=5).status_code == 405


# --- faults ------------------------------------------------------------------------------------


def test_429_fault_with_retry_after_is_visible_on_the_api_error(sandbox: SandboxServer) -> None:
    sandbox.set_faults(fail_429=1, retry_after=7)
    with anymail_to(sandbox):
        with pytest.raises(AnymailAPIError) as excinfo:
            message().send()
        message().send()  # the fault was for one request only

    assert excinfo.value.status_code == 429
    assert excinfo.value.response.headers["Retry-After"] == "7"
    assert excinfo.value.response.json()["ErrorCode"] == 429
    assert len(sandbox.messages()) == 1
    assert sandbox.stats()["by_status"] == {"429": 1, "200": 1}


@pytest.mark.parametrize(("fault", "status"), [("fail_500", 500), ("fail_503", 503)])
def test_server_error_fault_is_not_recorded(sandbox: SandboxServer, fault: str, status: int) -> None:
    sandbox.set_faults(**{fault: 2})
    with anymail_to(sandbox):
        for _ in range(2):
            with pytest.raises(AnymailAPIError) as excinfo:
                message().send()
            assert excinfo.value.status_code == status
            assert "ErrorCode" in excinfo.value.response.json()
        message().send()

    assert len(sandbox.messages()) == 1
    assert sandbox.stats()["faults_injected"] == 2
    assert "Retry-After" not in excinfo.value.response.headers


def test_dropped_response_is_a_connection_error_but_the_message_was_accepted(sandbox: SandboxServer) -> None:
    sandbox.set_faults(drop=1)
    with anymail_to(sandbox):
        with pytest.raises(AnymailRequestsAPIError) as excinfo:
            message(metadata={"mailauto_message_id": "77"}).send()
        message().send()  # and the next request works, on a new connection

    assert isinstance(excinfo.value, requests.exceptions.ConnectionError)
    first, _ = sandbox.messages()
    assert first["metadata"] == {"mailauto_message_id": "77"}
    assert sandbox.stats()["dropped"] == 1
    assert sandbox.stats()["by_status"] == {"dropped": 1, "200": 1}


def test_latency_delays_every_send_answer(sandbox: SandboxServer) -> None:
    sandbox.set_faults(latency_ms=150)
    started = time.monotonic()
    response = post_json(sandbox, "email", postmark_message("alice@example.com"))
    elapsed = time.monotonic() - started

    assert response.status_code == 200
    # A lower bound only: the sandbox sleeps at least this long, so this cannot flake.
    assert elapsed >= 0.15
    assert sandbox.faults()["latency_ms"] == 150


def test_faults_apply_to_send_endpoints_only(sandbox: SandboxServer) -> None:
    sandbox.set_faults(fail_500=1)
    assert requests.get(sandbox.url + "_sandbox/stats", timeout=5).status_code == 200
    assert post_json(sandbox, "email", postmark_message("a@example.com")).status_code == 500


def test_probability_faults_are_repeatable_with_a_seed(sandbox: SandboxServer) -> None:
    def run() -> list[int]:
        sandbox.set_faults(rate_500=0.5, seed=1234)
        return [post_json(sandbox, "email", postmark_message("a@example.com")).status_code for _ in range(30)]

    first = run()
    assert set(first) == {200, 500}
    assert run() == first


def test_counted_faults_are_taken_in_order(sandbox: SandboxServer) -> None:
    sandbox.set_faults(fail_429=1, fail_503=1, fail_500=1)
    statuses = [post_json(sandbox, "email", postmark_message("a@example.com")).status_code for _ in range(4)]
    assert statuses == [429, 503, 500, 200]


# --- webhooks -------------------------------------------------------------------------------------


def test_delivery_webhook_carries_message_id_metadata_and_basic_auth(
    webhook_sandbox: SandboxServer, receiver: WebhookReceiver
) -> None:
    msg = message(to="alice@example.com", metadata={"mailauto_message_id": "42"}, tags=["welcome"])
    with anymail_to(webhook_sandbox):
        msg.send()

    [post] = receiver.wait_for(1)
    assert post["path"] == "/webhooks/postmark/tracking/"
    assert post["headers"]["Authorization"] == "Basic " + base64.b64encode(b"hook-user:hook-pass").decode()
    payload = post["json"]
    assert payload["RecordType"] == "Delivery"
    assert payload["MessageID"] == msg.anymail_status.message_id
    assert payload["Recipient"] == "alice@example.com"
    assert payload["Metadata"] == {"mailauto_message_id": "42"}
    assert payload["Tag"] == "welcome"
    event = as_anymail_event(payload)
    assert event.event_type == EventType.DELIVERED
    assert event.message_id == msg.anymail_status.message_id
    assert event.metadata == {"mailauto_message_id": "42"}
    assert event.timestamp is not None


@pytest.mark.parametrize(
    ("local_part", "record_types", "event_type", "bounce_type", "type_code"),
    [
        ("bounce", ["Bounce"], EventType.BOUNCED, "HardBounce", 1),
        ("softbounce", ["Bounce"], EventType.BOUNCED, "SoftBounce", 4096),
        ("complaint", ["Delivery", "SpamComplaint"], EventType.COMPLAINED, "SpamComplaint", 100001),
        ("open", ["Delivery", "Open"], EventType.OPENED, None, None),
        ("click", ["Delivery", "Click"], EventType.CLICKED, None, None),
        ("unsubscribe", ["Delivery", "SubscriptionChange"], EventType.UNSUBSCRIBED, None, None),
    ],
)
def test_recipient_local_part_scripts_the_webhooks(
    webhook_sandbox: SandboxServer,
    receiver: WebhookReceiver,
    local_part: str,
    record_types: list[str],
    event_type: str,
    bounce_type: str | None,
    type_code: int | None,
) -> None:
    msg = message(to=f"{local_part}+1@example.com", metadata={"mailauto_message_id": "9"})
    msg.attach_alternative('<a href="https://shop.test/offer">Offer</a>', "text/html")
    with anymail_to(webhook_sandbox):
        msg.send()

    receiver.wait_for(len(record_types))
    webhook_sandbox.wait_for_webhooks(timeout=10)
    payloads = receiver.payloads()
    assert [p["RecordType"] for p in payloads] == record_types
    last = payloads[-1]
    assert last["MessageID"] == msg.anymail_status.message_id
    assert last["Metadata"] == {"mailauto_message_id": "9"}
    event = as_anymail_event(last)
    assert event.event_type == event_type
    assert event.recipient == f"{local_part}+1@example.com"
    if bounce_type:
        assert (last["Type"], last["TypeCode"]) == (bounce_type, type_code)
        assert isinstance(last["ID"], int)
        assert event.event_id == str(last["ID"])
    if local_part == "click":
        assert event.click_url == "https://shop.test/offer"


def test_webhook_payloads_have_the_fields_of_postmarks_documented_examples(
    webhook_sandbox: SandboxServer, receiver: WebhookReceiver
) -> None:
    response = post_json(webhook_sandbox, "email", postmark_message("alice@example.com", Tag="t"))
    message_id = response.json()["MessageID"]
    receiver.wait_for(1)
    fixtures = {
        "Delivery": "delivery.json",
        "Bounce": "bounce.json",
        "SpamComplaint": "spam_complaint.json",
        "Open": "open.json",
        "Click": "click.json",
        "SubscriptionChange": "subscription_change.json",
    }

    for record_type, fixture in fixtures.items():
        documented = json.loads((FIXTURES / fixture).read_text())
        sent = webhook_sandbox.trigger_webhook(message_id, record_type, wait=True)["payload"]
        assert set(documented) <= set(sent), f"{record_type} lacks {set(documented) - set(sent)}"
        for nested in ("Geo", "Client", "OS"):
            if nested in documented:
                assert set(documented[nested]) <= set(sent[nested])


def test_dropped_send_is_still_followed_by_its_webhooks(
    webhook_sandbox: SandboxServer, receiver: WebhookReceiver
) -> None:
    webhook_sandbox.set_faults(drop=1)
    with anymail_to(webhook_sandbox), pytest.raises(AnymailRequestsAPIError):
        message(to="bounce@example.com", metadata={"mailauto_message_id": "5"}).send()

    [post] = receiver.wait_for(1)
    [recorded] = webhook_sandbox.messages()
    assert post["json"]["MessageID"] == recorded["message_id"]
    assert post["json"]["Metadata"] == {"mailauto_message_id": "5"}


def test_webhook_is_retried_after_the_receiver_fails(
    webhook_sandbox: SandboxServer, receiver: WebhookReceiver
) -> None:
    receiver.statuses = [500, 502]
    post_json(webhook_sandbox, "email", postmark_message("alice@example.com"))

    posts = receiver.wait_for(3)
    webhook_sandbox.wait_for_webhooks(timeout=10)

    assert [p["json"] for p in posts[1:]] == [posts[0]["json"]] * 2
    stats = webhook_sandbox.stats()
    assert (stats["webhooks_sent"], stats["webhooks_attempts_failed"], stats["webhooks_retried"]) == (1, 2, 2)
    assert stats["webhooks_failed"] == 0
    [entry] = webhook_sandbox.webhook_log()
    assert (entry["status"], entry["attempts"], entry["http_status"]) == ("sent", 3, 200)


def test_webhook_gives_up_after_its_retries(receiver: WebhookReceiver) -> None:
    receiver.statuses = [503] * 10
    with SandboxServer(
        server_token=TOKEN, webhook_url=receiver.url, webhook_retries=2, webhook_backoff_s=0.01
    ) as server:
        post_json(server, "email", postmark_message("alice@example.com"))
        server.wait_for_webhooks(timeout=10)
        stats = server.stats()

    assert len(receiver.posts) == 3
    assert (stats["webhooks_sent"], stats["webhooks_failed"], stats["webhooks_attempts_failed"]) == (0, 1, 3)


def test_webhook_answered_403_is_not_retried(
    webhook_sandbox: SandboxServer, receiver: WebhookReceiver
) -> None:
    receiver.statuses = [403]
    post_json(webhook_sandbox, "email", postmark_message("alice@example.com"))
    webhook_sandbox.wait_for_webhooks(timeout=10)

    assert len(receiver.posts) == 1
    assert webhook_sandbox.stats()["webhooks_failed"] == 1


def test_webhook_failure_when_nothing_listens_is_counted() -> None:
    with SandboxServer(server_token=TOKEN) as dead:
        dead_url = dead.url
    with SandboxServer(
        server_token=TOKEN, webhook_url=dead_url, webhook_retries=1, webhook_backoff_s=0.01
    ) as server:
        post_json(server, "email", postmark_message("alice@example.com"))
        server.wait_for_webhooks(timeout=10)
        [entry] = server.webhook_log()

    assert entry["status"] == "failed"
    assert entry["attempts"] == 2
    assert "Connection" in entry["error"]


def test_trigger_webhook_on_demand_through_the_client(
    webhook_sandbox: SandboxServer, receiver: WebhookReceiver
) -> None:
    webhook_sandbox.configure(delivery_webhooks=False)
    message_id = post_json(webhook_sandbox, "email", postmark_message("alice@example.com")).json()[
        "MessageID"
    ]
    client = SandboxClient(webhook_sandbox.url)

    result = client.trigger_webhook(message_id, "Bounce", bounce_type="SoftBounce", wait=True)

    assert result["delivery"]["status"] == "sent"
    [post] = receiver.posts
    assert (post["json"]["RecordType"], post["json"]["Type"]) == ("Bounce", "SoftBounce")
    assert post["json"]["Email"] == "alice@example.com"
    queued = client.trigger_webhook(message_id, "Open", overrides={"FirstOpen": False})
    assert queued["queued"] is True
    assert receiver.wait_for(2)[1]["json"]["FirstOpen"] is False
    with pytest.raises(SandboxError) as excinfo:
        client.trigger_webhook("no-such-id", "Bounce")
    assert excinfo.value.status == 404
    with pytest.raises(SandboxError) as excinfo:
        client.trigger_webhook(message_id, "Teleport")
    assert excinfo.value.status == 400


def test_no_webhooks_without_a_webhook_url(sandbox: SandboxServer) -> None:
    post_json(sandbox, "email", postmark_message("bounce@example.com"))
    message_id = sandbox.messages()[0]["message_id"]

    assert sandbox.stats()["webhooks_queued"] == 0
    with pytest.raises(SandboxError) as excinfo:
        sandbox.trigger_webhook(message_id, "Bounce")
    assert excinfo.value.status == 409


# --- the control API and the client ---------------------------------------------------------------


def test_client_filters_messages_and_resets(sandbox: SandboxServer) -> None:
    for to in ("a@example.com", "b@example.com", "A@Example.com"):
        post_json(sandbox, "email", postmark_message(to))
    client = SandboxClient(sandbox.url)

    assert len(client.wait_for(3, timeout=5)) == 3
    assert [m["index"] for m in client.messages(to="a@example.com")] == [0, 2]
    assert [m["to"] for m in client.messages(since_index=1)] == [["b@example.com"], ["A@Example.com"]]
    assert client.messages(limit=1)[0]["index"] == 0
    first_id = client.messages()[0]["message_id"]
    assert client.message(first_id)["to"] == ["a@example.com"]
    assert client.stats()["accepted"] == 3
    assert client.health()["status"] == "ok"

    client.reset()

    assert client.messages() == []
    assert client.stats()["accepted"] == 0
    with pytest.raises(TimeoutError):
        client.wait_for(1, timeout=0.2)


def test_client_sets_and_clears_faults(sandbox: SandboxServer) -> None:
    client = SandboxClient(sandbox.url)

    assert client.set_faults(fail_503=2, retry_after=3)["fail_503"] == 2
    assert client.set_faults(latency_ms=5)["fail_503"] == 2  # a POST changes only what it names
    response = post_json(sandbox, "email", postmark_message("a@example.com"))
    assert (response.status_code, response.headers["Retry-After"]) == (503, "3")
    assert client.faults()["fail_503"] == 1
    assert client.clear_faults()["fail_503"] == 0
    with pytest.raises(SandboxError) as excinfo:
        client.set_faults(explode=1)
    assert excinfo.value.status == 400
    with pytest.raises(SandboxError):
        client.set_faults(rate_500=2)


def test_client_reconfigures_webhooks_at_runtime(sandbox: SandboxServer, receiver: WebhookReceiver) -> None:
    client = SandboxClient(sandbox.url)
    config = client.configure(webhook_url=receiver.url, webhook_auth="x:y")
    assert config["webhook_url"] == receiver.url

    post_json(sandbox, "email", postmark_message("open@example.com"))

    assert [p["json"]["RecordType"] for p in receiver.wait_for(2)] == ["Delivery", "Open"]


def test_record_bodies_off_keeps_metadata_but_not_bodies() -> None:
    with SandboxServer(server_token=TOKEN, record_bodies=False) as server:
        post_json(server, "email", postmark_message("a@example.com", Metadata={"k": "v"}))
        [recorded] = server.messages()

    assert recorded["metadata"] == {"k": "v"}
    assert "raw" not in recorded
    assert "text" not in recorded


# --- connections and concurrency ---------------------------------------------------------------


def test_keep_alive_reuses_one_connection(sandbox: SandboxServer) -> None:
    with requests.Session() as session:
        for _ in range(5):
            response = session.post(
                sandbox.url + "email",
                json=postmark_message("a@example.com"),
                headers={"X-Postmark-Server-Token": TOKEN},
                timeout=5,
            )
            assert response.status_code == 200

    assert sandbox.stats()["connections"] == 1


def test_hundreds_of_concurrent_clients_are_all_answered(sandbox: SandboxServer) -> None:
    def send(n: int) -> str:
        response = post_json(sandbox, "email", postmark_message(f"user{n}@example.com"))
        assert response.status_code == 200
        return response.json()["MessageID"]

    with ThreadPoolExecutor(max_workers=200) as pool:
        ids = list(pool.map(send, range(400)))

    assert len(set(ids)) == 400
    assert {m["message_id"] for m in sandbox.messages()} == set(ids)
    assert sandbox.stats()["requests"] == 400


def test_stop_cuts_kept_alive_connections() -> None:
    server = SandboxServer(server_token=TOKEN).start()
    url = server.url
    with requests.Session() as session:
        assert session.get(url + "_sandbox/health", timeout=5).status_code == 200
        server.stop()
        with pytest.raises(requests.exceptions.ConnectionError):
            session.get(url + "_sandbox/health", timeout=5)
    assert server.url == url


# --- running it ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        [
            sys.executable,
            "manage.py",
            "esp_sandbox",
            "--port",
            "0",
            "--no-webhooks",
            "--server-token",
            "cli-token",
        ],
        [
            sys.executable,
            "-m",
            "mailauto.sandbox",
            "--port",
            "0",
            "--no-webhooks",
            "--server-token",
            "cli-token",
        ],
    ],
    ids=["manage.py", "python -m"],
)
def test_command_line_serves_until_sigterm(command: list[str]) -> None:
    settings_module = os.environ.get("DJANGO_SETTINGS_MODULE", "tests.settings")
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": settings_module, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command, cwd=BASE_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        url = None
        assert process.stdout is not None
        for line in process.stdout:
            match = re.search(r"ESP sandbox \(Postmark and Resend APIs\) at (\S+)", line)
            if match:
                url = match.group(1)
                break
        assert url, "the command never announced its URL"
        assert SandboxClient(url).health()["status"] == "ok"
        response = requests.post(
            url + "email",
            json=postmark_message("a@example.com"),
            headers={"X-Postmark-Server-Token": "cli-token"},
            timeout=5,
        )
        assert response.status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=10)
    assert returncode == 0


# --- Resend's API: Anymail's Resend backend and /emails/batch ------------------------------------


@contextmanager
def anymail_resend_to(sandbox: SandboxServer, token: str = TOKEN) -> Iterator[None]:
    with override_settings(
        EMAIL_BACKEND="campaigns.esp_idempotency.ResendEmailBackend",
        ANYMAIL={"RESEND_API_KEY": token, "RESEND_API_URL": sandbox.url},
    ):
        yield


def post_resend(
    sandbox: SandboxServer, path: str, data: Any, token: str | None = TOKEN, **headers: str
) -> requests.Response:
    sent = {"Content-Type": "application/json", **{k.replace("_", "-"): v for k, v in headers.items()}}
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    return requests.post(
        sandbox.url + path,
        data=data if isinstance(data, str | bytes) else json.dumps(data),
        headers=sent,
        timeout=10,
    )


def resend_email(to: str, **extra: Any) -> dict[str, Any]:
    return {"from": "Shop <hello@shop.test>", "to": [to], "subject": "Hi", "text": "Hello", **extra}


def test_anymail_resend_send_returns_the_sandbox_id_and_records_metadata_and_tags(
    sandbox: SandboxServer,
) -> None:
    from campaigns.esp_idempotency import apply_idempotency_key, esp_idempotency_key

    msg = message(
        to="Alice <alice@example.com>",
        headers={"List-Unsubscribe": "<https://shop.test/u/1>"},
        metadata={"mailauto_message_id": "42"},
        tags=["welcome"],
    )
    apply_idempotency_key(msg, message_key="evt-9:1", esp_name="resend")
    with anymail_resend_to(sandbox):
        msg.send()

    [recorded] = sandbox.messages()
    assert msg.anymail_status.message_id == recorded["message_id"]
    assert (recorded["esp"], recorded["endpoint"]) == ("resend", "emails")
    assert (recorded["from"], recorded["to"]) == ("hello@shop.test", ["alice@example.com"])
    assert recorded["metadata"] == {"mailauto_message_id": "42"}
    assert recorded["tag"] == "welcome"
    assert recorded["headers"] == {"List-Unsubscribe": "<https://shop.test/u/1>"}
    assert recorded["idempotency_key"] == esp_idempotency_key("evt-9:1")


def test_resend_wants_a_bearer_api_key(sandbox: SandboxServer) -> None:
    missing = post_resend(sandbox, "emails", resend_email("a@example.com"), token=None)
    wrong = post_resend(sandbox, "emails", resend_email("a@example.com"), token="re_wrong")

    assert (missing.status_code, missing.json()["name"]) == (401, "missing_api_key")
    assert (wrong.status_code, wrong.json()["name"]) == (401, "validation_error")
    assert set(wrong.json()) == {"statusCode", "name", "message"}
    with anymail_resend_to(sandbox, token="re_wrong"), pytest.raises(AnymailAPIError) as excinfo:
        message().send()
    assert excinfo.value.status_code == 401
    assert sandbox.messages() == []


@pytest.mark.parametrize(
    ("data", "name", "text"),
    [
        (resend_email("not-an-address"), "validation_error", "Invalid `to` field"),
        (resend_email("x@bad_domain.example"), "validation_error", "Invalid `to` field"),
        ({"to": ["a@example.com"], "subject": "Hi", "text": "x"}, "missing_required_field", "`from`"),
        (resend_email("a@example.com", subject=""), "missing_required_field", "`subject`"),
        (resend_email("a@example.com", text=""), "validation_error", "`html` or `text`"),
        (resend_email("a@example.com", headers={"X-N": 1}), "validation_error", "`headers`"),
    ],
)
def test_invalid_resend_email_is_refused_with_422(
    sandbox: SandboxServer, data: dict[str, Any], name: str, text: str
) -> None:
    response = post_resend(sandbox, "emails", data)

    assert response.status_code == 422
    assert response.json()["name"] == name
    assert text in response.json()["message"]
    assert sandbox.messages() == []


def test_resend_batch_answers_the_ids_in_request_order(sandbox: SandboxServer) -> None:
    emails = [
        resend_email(f"r{n}@example.com", headers={"X-Metadata": json.dumps({"n": n})}) for n in range(100)
    ]
    response = post_resend(sandbox, "emails/batch", emails)

    assert response.status_code == 200
    ids = [item["id"] for item in response.json()["data"]]
    recorded = sandbox.messages()
    assert ids == [r["message_id"] for r in recorded]
    assert [r["metadata"]["n"] for r in recorded] == list(range(100))
    assert {r["endpoint"] for r in recorded} == {"emails/batch"}
    assert "errors" not in response.json()


def test_resend_batch_over_100_emails_is_refused(sandbox: SandboxServer) -> None:
    response = post_resend(sandbox, "emails/batch", [resend_email("a@example.com")] * 101)

    assert (response.status_code, response.json()["name"]) == (422, "validation_error")
    assert sandbox.messages() == []


def test_resend_batch_is_strict_by_default_and_refuses_every_email_for_one_bad_one(
    sandbox: SandboxServer,
) -> None:
    emails = [resend_email("a@example.com"), resend_email("not-an-address"), resend_email("b@example.com")]
    response = post_resend(sandbox, "emails/batch", emails)

    assert response.status_code == 422
    assert "Invalid `to` field" in response.json()["message"]
    assert sandbox.messages() == []


def test_permissive_resend_batch_creates_the_valid_emails_and_lists_the_others(
    sandbox: SandboxServer,
) -> None:
    emails = [
        resend_email("not-an-address"),
        resend_email("a@example.com"),
        resend_email("b@example.com", attachments=[{"filename": "a.txt", "content": "aGk="}]),
        resend_email("c@example.com"),
    ]
    response = post_resend(sandbox, "emails/batch", emails, x_batch_validation="permissive")

    assert response.status_code == 200
    body = response.json()
    assert [e["index"] for e in body["errors"]] == [0, 2]
    assert "`attachments`" in body["errors"][1]["message"]
    assert [d["id"] for d in body["data"]] == [r["message_id"] for r in sandbox.messages()]
    assert [r["to"] for r in sandbox.messages()] == [["a@example.com"], ["c@example.com"]]
    assert sandbox.stats()["rejected"] == 2


def test_resend_idempotency_key_replays_the_same_request_without_storing_it_again(
    sandbox: SandboxServer,
) -> None:
    emails = [resend_email("a@example.com"), resend_email("b@example.com")]
    first = post_resend(sandbox, "emails/batch", emails, Idempotency_Key="batch-1")
    again = post_resend(sandbox, "emails/batch", emails, Idempotency_Key="batch-1")
    single = post_resend(sandbox, "emails", resend_email("c@example.com"), Idempotency_Key="one")
    single_again = post_resend(sandbox, "emails", resend_email("c@example.com"), Idempotency_Key="one")

    assert (first.status_code, again.status_code) == (200, 200)
    assert again.json() == first.json()
    assert single_again.json() == single.json()
    assert len(sandbox.messages()) == 3
    assert sandbox.stats()["idempotent_replays"] == 2
    assert {r["idempotency_key"] for r in sandbox.messages()} == {"batch-1", "one"}


def test_resend_idempotency_key_with_another_payload_is_refused_with_409(sandbox: SandboxServer) -> None:
    post_resend(sandbox, "emails", resend_email("a@example.com"), Idempotency_Key="k")
    other = post_resend(sandbox, "emails", resend_email("b@example.com"), Idempotency_Key="k")
    too_long = post_resend(sandbox, "emails", resend_email("b@example.com"), Idempotency_Key="k" * 257)

    assert (other.status_code, other.json()["name"]) == (409, "invalid_idempotent_request")
    assert (too_long.status_code, too_long.json()["name"]) == (400, "invalid_idempotency_key")
    assert len(sandbox.messages()) == 1


def test_a_refused_resend_request_does_not_use_up_its_idempotency_key(sandbox: SandboxServer) -> None:
    sandbox.set_faults(fail_429=1)
    limited = post_resend(sandbox, "emails", resend_email("a@example.com"), Idempotency_Key="k")
    invalid = post_resend(sandbox, "emails", resend_email("not-an-address"), Idempotency_Key="k2")
    retried = post_resend(sandbox, "emails", resend_email("a@example.com"), Idempotency_Key="k")
    fixed = post_resend(sandbox, "emails", resend_email("b@example.com"), Idempotency_Key="k2")

    assert (limited.status_code, invalid.status_code) == (429, 422)
    assert (retried.status_code, fixed.status_code) == (200, 200)
    assert len(sandbox.messages()) == 2


def test_a_dropped_resend_answer_is_replayed_for_the_same_key(sandbox: SandboxServer) -> None:
    sandbox.set_faults(drop=1)
    with pytest.raises(requests.ConnectionError):
        post_resend(sandbox, "emails/batch", [resend_email("a@example.com")], Idempotency_Key="k")
    retried = post_resend(sandbox, "emails/batch", [resend_email("a@example.com")], Idempotency_Key="k")

    [recorded] = sandbox.messages()
    assert retried.json() == {"data": [{"id": recorded["message_id"]}]}


@pytest.mark.parametrize(
    ("fault", "status", "name"),
    [
        ("fail_429", 429, "rate_limit_exceeded"),
        ("fail_500", 500, "internal_server_error"),
        ("fail_503", 503, "service_unavailable"),
    ],
)
def test_resend_faults_answer_in_resends_error_shape(
    sandbox: SandboxServer, fault: str, status: int, name: str
) -> None:
    sandbox.set_faults(**{fault: 1}, retry_after=7)
    with anymail_resend_to(sandbox), pytest.raises(AnymailAPIError) as excinfo:
        message().send()

    assert excinfo.value.status_code == status
    assert excinfo.value.response.json() == {
        "statusCode": status,
        "name": name,
        "message": excinfo.value.response.json()["message"],
    }
    assert excinfo.value.response.headers.get("Retry-After") == ("7" if status in (429, 503) else None)
    assert sandbox.messages() == []


def test_resend_sends_post_no_postmark_webhooks(
    webhook_sandbox: SandboxServer, receiver: WebhookReceiver
) -> None:
    post_resend(webhook_sandbox, "emails", resend_email("bounce@example.com"))
    [recorded] = webhook_sandbox.messages()

    assert webhook_sandbox.stats()["webhooks_queued"] == 0
    with pytest.raises(SandboxError) as excinfo:
        webhook_sandbox.trigger_webhook(recorded["message_id"], "Bounce")
    assert excinfo.value.status == 409
    # The Postmark side of the same sandbox still scripts its webhooks.
    post_json(webhook_sandbox, "email", postmark_message("bounce@example.com"))
    assert receiver.wait_for(1)[0]["json"]["RecordType"] == "Bounce"


def test_reset_forgets_idempotency_keys(sandbox: SandboxServer) -> None:
    post_resend(sandbox, "emails", resend_email("a@example.com"), Idempotency_Key="k")
    sandbox.reset()
    post_resend(sandbox, "emails", resend_email("a@example.com"), Idempotency_Key="k")

    assert len(sandbox.messages()) == 1
    assert sandbox.stats()["idempotent_replays"] == 0
