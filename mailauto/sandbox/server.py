"""The local ESP sandbox: a loopback HTTP server that speaks Postmark's send API
(`POST /email`, `POST /email/batch`) and Resend's (`POST /emails`, `POST /emails/batch`,
with `Idempotency-Key`) so that the demo, tests and benchmarks run with no real ESP. It
records what it accepts in memory, injects faults on demand, posts Postmark-format
webhooks back to the app (for Postmark sends only), and has a control API under
`/_sandbox/`.

Standard library only: `python -m mailauto.sandbox` runs it without setting up Django.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import ipaddress
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs

from mailauto.sandbox import postmark, resend
from mailauto.sandbox.faults import FaultPlan
from mailauto.sandbox.webhooks import PayloadFactory, WebhookDispatcher

logger = logging.getLogger("mailauto.sandbox")

DEFAULT_SERVER_TOKEN = "sandbox-server-token"
# Postmark accepts up to 10 MB per message and 50 MB per batch.
MAX_BODY_BYTES = 64 * 1024 * 1024
POSTMARK_PATHS = ("/email", "/email/batch")
RESEND_PATHS = ("/emails", "/emails/batch")
SEND_PATHS = POSTMARK_PATHS + RESEND_PATHS
CONTROL_PREFIX = "/_sandbox"

_FAULT_RESPONSES = {
    "429": (429, postmark.ERROR_RATE_LIMIT, "Rate limit exceeded. Slow down (ESP sandbox fault injection)."),
    "500": (500, postmark.ERROR_INTERNAL, "Internal server error (ESP sandbox fault injection)."),
    "503": (
        503,
        postmark.ERROR_MAINTENANCE,
        "Service unavailable for maintenance (ESP sandbox fault injection).",
    ),
}

# The same faults in Resend's words (https://resend.com/docs/api-reference/errors).
_RESEND_FAULT_RESPONSES = {
    "429": (429, "rate_limit_exceeded", "Too many requests. Slow down (ESP sandbox fault injection)."),
    "500": (500, "internal_server_error", "An unexpected error occurred (ESP sandbox fault injection)."),
    "503": (503, "service_unavailable", "Service unavailable (ESP sandbox fault injection)."),
}


# "Leave unchanged" for configure(), where None already means "switch off".
_UNCHANGED: Any = object()


class SandboxError(Exception):
    """A control request the sandbox refuses; `status` is the HTTP status it answers."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog of 5 makes a burst of hundreds of clients wait for
    # SYN retransmits (a second or more each); benchmarks open that many at once.
    request_queue_size = 1024
    block_on_close = False
    sandbox: SandboxServer


class _HTTP6Server(_HTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: Anymail's requests.Session reuses connections
    server_version = "mailauto-esp-sandbox/1.0"
    sys_version = ""
    # Headers and body go out in two writes; with Nagle on, a kept-alive client would
    # wait for a delayed ACK (~40 ms) on every response.
    disable_nagle_algorithm = True
    timeout = 120  # an idle kept-alive connection holds a thread; let it go eventually
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.sandbox._track_connection(self.connection, open_=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.sandbox._track_connection(self.connection, open_=False)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        logger.debug("ESP sandbox: %s %s -> %s", self.command, self.path, code)

    def log_message(self, format: str, *args: Any) -> None:
        logger.info("ESP sandbox: " + format, *args)

    def do_GET(self) -> None:
        self._route()

    do_POST = do_DELETE = do_PUT = do_PATCH = do_GET

    # --- plumbing ------------------------------------------------------------------------

    def _route(self) -> None:
        path, _, query = self.path.partition("?")
        path = path.rstrip("/") or "/"
        try:
            body = self._read_body()
            if body is None:
                return
            if path in SEND_PATHS:
                if self.command != "POST":
                    self._send_json(405, postmark.error_body(405, "Method not allowed."), {"Allow": "POST"})
                else:
                    self._send_api(path, body)
            elif path == CONTROL_PREFIX or path.startswith(CONTROL_PREFIX + "/"):
                self._control(path, query, body)
            else:
                self._send_json(404, postmark.error_body(404, f"The ESP sandbox does not implement {path}."))
        except Exception:
            # One bad request must never take the sandbox down for everyone else.
            logger.exception("ESP sandbox: error handling %s %s", self.command, self.path)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._send_json(
                    500, postmark.error_body(postmark.ERROR_INTERNAL, "ESP sandbox internal error.")
                )

    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True  # the unread body would be parsed as the next request
            self._send_json(
                413 if length > 0 else 400, postmark.error_body(413, "Bad or too large Content-Length.")
            )
            return None
        return self.rfile.read(length) if length else b""

    def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        while True:
            size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            chunks.append(self.rfile.read(size))
            self.rfile.readline(1024)

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    # --- Postmark's send API ---------------------------------------------------------

    def _send_api(self, path: str, body: bytes) -> None:
        sandbox = self.server.sandbox
        decision = sandbox._faults.take()
        if decision.latency_s:
            time.sleep(decision.latency_s)
        is_resend = path in RESEND_PATHS
        if decision.action in _FAULT_RESPONSES:
            if is_resend:
                status, name, message = _RESEND_FAULT_RESPONSES[decision.action]
                error: dict[str, Any] = resend.error_body(status, name, message)
            else:
                status, error_code, message = _FAULT_RESPONSES[decision.action]
                error = postmark.error_body(error_code, message)
            headers = {}
            if decision.retry_after is not None and status in (429, 503):
                headers["Retry-After"] = str(decision.retry_after)
            sandbox._count_fault(status)
            self._send_json(status, error, headers)
            return
        if is_resend:
            scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
            status, response, records = sandbox._process_send(
                path,
                body,
                token.strip() if scheme.lower() == "bearer" else None,
                dropped=decision.action == "drop",
                idempotency_key=self.headers.get("Idempotency-Key"),
                permissive=(self.headers.get(resend.BATCH_VALIDATION_HEADER) or "").lower() == "permissive",
            )
        else:
            status, response, records = sandbox._process_send(
                path, body, self.headers.get("X-Postmark-Server-Token"), dropped=decision.action == "drop"
            )
        webhooks = sandbox._reserve_webhooks(records)
        try:
            if decision.action == "drop":
                # The ambiguous outcome: the ESP took the message, the client never hears so.
                self.close_connection = True
                logger.debug("ESP sandbox: %s %s -> dropped (would have been %s)", self.command, path, status)
            else:
                self._send_json(status, response)
        finally:
            # Queued only after the answer is on the wire, so a webhook rarely overtakes
            # the API response it belongs to (as with the real ESP; the app must cope
            # either way). Queued even if the client has gone: the message was accepted.
            sandbox._webhooks.enqueue(webhooks)

    # --- control API -----------------------------------------------------------------

    def _control(self, path: str, query: str, body: bytes) -> None:
        sandbox = self.server.sandbox
        sandbox._count_control()
        if not ipaddress.ip_address(self.client_address[0].split("%")[0]).is_loopback:
            self._send_json(403, {"error": "the sandbox control API answers loopback clients only"})
            return
        params = {k: v[-1] for k, v in parse_qs(query).items()}
        route = path.removeprefix(CONTROL_PREFIX).strip("/")
        method = self.command
        try:
            data = json.loads(body) if body.strip() else {}
        except ValueError:
            self._send_json(400, {"error": "invalid JSON body"})
            return
        try:
            result = self._control_dispatch(sandbox, method, route, params, data)
        except SandboxError as exc:
            self._send_json(exc.status, {"error": exc.message})
            return
        except (TypeError, ValueError) as exc:
            self._send_json(400, {"error": str(exc)})
            return
        self._send_json(200, result)

    def _control_dispatch(
        self, sandbox: SandboxServer, method: str, route: str, params: dict[str, str], data: Any
    ) -> Any:
        if not isinstance(data, dict):
            raise SandboxError(400, "the body must be a JSON object")
        if route == "health" and method == "GET":
            return {"status": "ok", "url": sandbox.url, "messages": sandbox.stats()["messages_recorded"]}
        if route == "messages":
            if method == "GET":
                return sandbox.messages(
                    to=params.get("to"),
                    since_index=int(params.get("since_index", 0)),
                    limit=int(params["limit"]) if "limit" in params else None,
                )
            if method == "DELETE":
                sandbox.reset()
                return {"reset": True}
        if route.startswith("messages/") and method == "GET":
            record = sandbox.message(route.removeprefix("messages/"))
            if record is None:
                raise SandboxError(404, "no such message")
            return record
        if route == "stats" and method == "GET":
            return sandbox.stats()
        if route == "faults":
            if method == "GET":
                return sandbox.faults()
            if method == "POST":
                return sandbox.set_faults(**data)
            if method == "DELETE":
                return sandbox.clear_faults()
        if route == "webhooks":
            if method == "GET":
                return sandbox.webhook_log()
            if method == "POST":
                if "message_id" not in data or "record_type" not in data:
                    raise SandboxError(400, "message_id and record_type are required")
                return sandbox.trigger_webhook(**data)
        if route == "config":
            if method == "POST":
                sandbox.configure(**data)
            if method in ("GET", "POST"):
                return sandbox.config()
        raise SandboxError(404, f"no control endpoint {method} /_sandbox/{route}")


class SandboxServer:
    """A Postmark- and Resend-compatible ESP on loopback. Start it, point Anymail's
    Postmark or Resend backend at `.url`, and inspect what it received. `server_token` is
    both the Postmark server token and the Resend API key (`Authorization: Bearer`).

        with SandboxServer(webhook_url=..., webhook_auth="user:pass") as sandbox:
            settings.ANYMAIL["POSTMARK_API_URL"] = sandbox.url  # or RESEND_API_URL
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        server_token: str = DEFAULT_SERVER_TOKEN,
        webhook_url: str | None = None,
        webhook_auth: str | None = None,
        latency_ms: float = 0,
        record_bodies: bool = True,
        *,
        delivery_webhooks: bool = True,
        webhook_workers: int = 8,
        webhook_retries: int = 3,
        webhook_backoff_s: float = 0.5,
        webhook_timeout_s: float = 10.0,
    ) -> None:
        self.host = host
        self._port = port
        self.server_token = server_token
        self.record_bodies = record_bodies
        self.delivery_webhooks = delivery_webhooks
        self._faults = FaultPlan(latency_ms=latency_ms)
        self._webhooks = WebhookDispatcher(
            url=webhook_url,
            auth=webhook_auth,
            workers=webhook_workers,
            retries=webhook_retries,
            backoff_s=webhook_backoff_s,
            timeout_s=webhook_timeout_s,
            keep_payloads=record_bodies,
        )
        self._webhook_auth = webhook_auth
        # One lock for the store and the counters: each request takes it once, briefly.
        # Records are never changed after they are appended, so readers may use them
        # outside the lock.
        self._lock = threading.Condition(threading.Lock())
        self._records: list[dict[str, Any]] = []
        self._by_id: dict[str, dict[str, Any]] = {}
        # Resend's Idempotency-Key store: key -> the request's fingerprint and answer.
        self._idempotency: dict[str, _IdempotentRequest] = {}
        self._stats = self._zero_stats()
        self._connections: set[socket.socket] = set()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port once started (and after stop, so a restart keeps the URL)."""
        return self._port

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host  # noqa: S104
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/"

    def start(self) -> Self:
        """Serve in a background daemon thread; return self once the port is bound."""
        if self._httpd is not None:
            raise RuntimeError("the ESP sandbox is already running")
        server_class = _HTTP6Server if ":" in self.host else _HTTPServer
        httpd = server_class((self.host, self._port), _Handler)
        httpd.sandbox = self
        self._httpd = httpd
        self._port = httpd.server_address[1]
        self._webhooks.start()
        logger.info(
            "ESP sandbox (Postmark and Resend APIs) listening on %s; webhooks to %s",
            self.url,
            self._webhooks.url or "nowhere",
        )
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="esp-sandbox", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd = self._httpd
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd = None
        # Kept-alive connections each hold a handler thread that would go on serving
        # after stop(); cut them so clients see the server is gone.
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._webhooks.stop()
        logger.info("ESP sandbox stopped")

    def __enter__(self) -> Self:
        return self if self._httpd else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- inspection and control ------------------------------------------------------------

    def messages(
        self, to: str | None = None, since_index: int = 0, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """Recorded messages in arrival order, from `since_index`; `to` matches any
        recipient (To, Cc or Bcc), case-insensitively."""
        with self._lock:
            records = self._records[since_index:]
        if to:
            wanted = to.lower()
            records = [r for r in records if wanted in r["_recipients"]]
        if limit is not None:
            records = records[:limit]
        return [_public(r) for r in records]

    def message(self, message_id: str) -> dict[str, Any] | None:
        with self._lock:
            record = self._by_id.get(message_id)
        return _public(record) if record else None

    def stats(self) -> dict[str, Any]:
        with self._lock:
            stats = {**self._stats, "by_status": dict(self._stats["by_status"])}
            stats["messages_recorded"] = len(self._records)
        stats.update(self._webhooks.stats())
        return stats

    def reset(self) -> None:
        """Forget recorded messages, counters, idempotency keys and the webhook log
        (faults stay)."""
        with self._lock:
            self._records.clear()
            self._by_id.clear()
            self._idempotency.clear()
            self._stats = self._zero_stats()
        self._webhooks.reset()

    def set_faults(self, **faults: Any) -> dict[str, Any]:
        """Change the given faults (see faults.Faults); return all current faults."""
        return self._faults.update(**faults)

    def clear_faults(self) -> dict[str, Any]:
        return self._faults.clear()

    def faults(self) -> dict[str, Any]:
        return self._faults.snapshot()

    def configure(
        self,
        *,
        webhook_url: str | None = _UNCHANGED,
        webhook_auth: str | None = _UNCHANGED,
        delivery_webhooks: bool | None = None,
    ) -> None:
        """Change where webhooks go while running (e.g. once a live test server is up)."""
        url = self._webhooks.url if webhook_url is _UNCHANGED else webhook_url
        if webhook_auth is not _UNCHANGED:
            self._webhook_auth = webhook_auth
        self._webhooks.configure(url=url, auth=self._webhook_auth)
        if delivery_webhooks is not None:
            self.delivery_webhooks = bool(delivery_webhooks)

    def config(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "server_token": self.server_token,
            "webhook_url": self._webhooks.url,
            "webhook_auth_set": bool(self._webhook_auth),
            "delivery_webhooks": self.delivery_webhooks,
            "record_bodies": self.record_bodies,
        }

    def trigger_webhook(
        self,
        message_id: str,
        record_type: str,
        *,
        recipient: str | None = None,
        bounce_type: str | None = None,
        overrides: dict[str, Any] | None = None,
        wait: bool = False,
    ) -> dict[str, Any]:
        """Post a webhook of `record_type` for a recorded message, now.

        With wait=True the webhook is posted (with retries) before this returns and the
        result says how the app answered; otherwise it is queued like any other.
        """
        with self._lock:
            record = self._by_id.get(message_id)
        if record is None:
            raise SandboxError(404, f"no recorded message {message_id!r}")
        if record["esp"] != "postmark":
            raise SandboxError(409, "the sandbox posts Postmark-format webhooks only")
        if self._webhooks.url is None:
            raise SandboxError(409, "no webhook URL is configured")
        if recipient is None:
            active = [
                r for r in record["to"] + record["cc"] + record["bcc"] if r.lower() not in record["inactive"]
            ]
            recipient = active[0]
        payload = postmark.webhook_payload(
            record_type, record, recipient, bounce_type=bounce_type, overrides=overrides
        )
        if wait:
            return {"queued": False, "delivery": self._webhooks.deliver_now(payload), "payload": payload}
        self._webhooks.submit([lambda: payload])
        return {"queued": True, "payload": payload}

    def webhook_log(self) -> list[dict[str, Any]]:
        """Every webhook that finished (sent, failed or skipped), in completion order."""
        return self._webhooks.log()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Block until at least `count` messages are recorded; raise TimeoutError if not."""
        with self._lock:
            if not self._lock.wait_for(lambda: len(self._records) >= count, timeout=timeout):
                raise TimeoutError(f"{len(self._records)} of {count} messages recorded after {timeout}s")
        return self.messages()

    def wait_for_webhooks(self, timeout: float = 10.0) -> None:
        """Block until no webhook is queued or being posted; raise TimeoutError if not."""
        if not self._webhooks.wait_idle(timeout):
            raise TimeoutError(f"webhooks still pending after {timeout}s")

    # --- used by the request handler -------------------------------------------------------

    @staticmethod
    def _zero_stats() -> dict[str, Any]:
        return {
            "requests": 0,
            "batch_requests": 0,
            "accepted": 0,
            "rejected": 0,
            "dropped": 0,
            "idempotent_replays": 0,
            "faults_injected": 0,
            "control_requests": 0,
            "connections": 0,
            "by_status": {},
        }

    def _track_connection(self, conn: socket.socket, *, open_: bool) -> None:
        with self._lock:
            if open_:
                self._connections.add(conn)
                self._stats["connections"] += 1
            else:
                self._connections.discard(conn)

    def _count_control(self) -> None:
        with self._lock:
            self._stats["control_requests"] += 1

    def _count_fault(self, status: int) -> None:
        with self._lock:
            self._stats["requests"] += 1
            self._stats["faults_injected"] += 1
            by_status = self._stats["by_status"]
            by_status[str(status)] = by_status.get(str(status), 0) + 1

    def _process_send(
        self,
        path: str,
        body: bytes,
        token: str | None,
        *,
        dropped: bool,
        idempotency_key: str | None = None,
        permissive: bool = False,
    ) -> tuple[int, Any, list[dict[str, Any]]]:
        """Answer one send request as Postmark or Resend would (by path), recording what
        it accepts. `token` is the Postmark server token or the Resend API key."""
        received_at = postmark.now_iso()
        claimed: str | None = None
        replayed = False
        records: list[dict[str, Any]]
        if path in RESEND_PATHS:
            try:
                claimed, replay = self._claim_idempotency_key(token, idempotency_key, path, body)
                if replay is not None:
                    (status, response), records, rejected = replay, [], 0
                    replayed = True
                else:
                    status, response, records, rejected = self._answer_resend(
                        path, body, received_at, permissive=permissive, idempotency_key=idempotency_key
                    )
            except resend.ResendError as exc:
                status, response, records, rejected = exc.status, exc.body(), [], 0
            except BaseException:
                if claimed is not None:
                    with self._lock:
                        del self._idempotency[claimed]  # not stuck "in progress" after a bug
                raise
        else:
            status, response, records, rejected = self._answer_postmark(path, body, token, received_at)
        with self._lock:
            if claimed is not None:
                # Only an accepted request is remembered: one Resend refused may be sent
                # again, corrected, under the same key.
                if status == 200:
                    self._idempotency[claimed] = _IdempotentRequest(
                        fingerprint=self._idempotency[claimed].fingerprint,
                        at=time.monotonic(),
                        answer=(status, response),
                    )
                else:
                    del self._idempotency[claimed]
            stats = self._stats
            stats["requests"] += 1
            stats["batch_requests"] += path in ("/email/batch", "/emails/batch")
            stats["accepted"] += len(records)
            stats["rejected"] += rejected
            stats["idempotent_replays"] += replayed
            key = "dropped" if dropped else str(status)
            stats["by_status"][key] = stats["by_status"].get(key, 0) + 1
            stats["dropped"] += dropped
            for record in records:
                record["index"] = len(self._records)
                self._records.append(record)
                self._by_id[record["message_id"]] = record
            if records:
                self._lock.notify_all()
        return status, response, records

    def _answer_postmark(
        self, path: str, body: bytes, token: str | None, received_at: str
    ) -> tuple[int, Any, list[dict[str, Any]], int]:
        records: list[dict[str, Any]] = []
        response: dict[str, Any] | list[dict[str, Any]]
        rejected = 0
        try:
            if token != self.server_token:
                raise postmark.bad_token_error(bool(token))
            try:
                data = json.loads(body)
            except ValueError as exc:  # UnicodeDecodeError is a ValueError too
                raise postmark.invalid_json_error() from exc
            if path == "/email":
                result, record = self._accept_one(data, "email", received_at)
                status, response = (200 if record else 422), result
                records = [record] if record else []
                rejected = 0 if record else 1
            else:
                if not isinstance(data, list):
                    raise postmark.incompatible_json_error("a batch must be a JSON array of messages")
                if len(data) > postmark.MAX_BATCH_MESSAGES:
                    raise postmark.too_many_batch_messages_error(len(data))
                results: list[dict[str, Any]] = []
                status, response = 200, results
                for item in data:
                    result, record = self._accept_one(item, "email/batch", received_at)
                    results.append(result)
                    if record:
                        records.append(record)
                    else:
                        rejected += 1
        except postmark.PostmarkError as exc:
            status, response = exc.http_status, exc.body()
        return status, response, records, rejected

    def _claim_idempotency_key(
        self, token: str | None, key: str | None, path: str, body: bytes
    ) -> tuple[str | None, tuple[int, Any] | None]:
        """Authenticate, then look the Idempotency-Key up: (key claimed for this request,
        None), (None, the stored answer to replay), or (None, None) without a key.
        Raises ResendError for a bad key, a different payload, or one still in flight."""
        if not token:
            raise resend.missing_api_key_error()
        if token != self.server_token:
            raise resend.invalid_api_key_error()
        if key is None:
            return None, None
        if not 1 <= len(key) <= resend.MAX_IDEMPOTENCY_KEY:
            raise resend.invalid_idempotency_key_error()
        fingerprint = hashlib.sha256(path.encode() + b"\n" + body).hexdigest()
        now = time.monotonic()
        with self._lock:
            entry = self._idempotency.get(key)
            if (
                entry is not None
                and entry.answer is not None
                and now - entry.at > resend.IDEMPOTENCY_TTL_SECONDS
            ):
                del self._idempotency[key]
                entry = None
            if entry is None:
                self._idempotency[key] = _IdempotentRequest(fingerprint=fingerprint, at=now, answer=None)
                return key, None
        if entry.fingerprint != fingerprint:
            raise resend.idempotency_conflict_error()
        if entry.answer is None:
            raise resend.idempotency_in_progress_error()
        return None, entry.answer

    def _answer_resend(
        self, path: str, body: bytes, received_at: str, *, permissive: bool, idempotency_key: str | None
    ) -> tuple[int, Any, list[dict[str, Any]], int]:
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise resend.invalid_json_error() from exc
        if path == "/emails":
            parsed = resend.parse_email(data, in_batch=False)
            record = self._resend_record(parsed, "emails", received_at, idempotency_key)
            return 200, {"id": record["message_id"]}, [record], 0
        if not isinstance(data, list) or not data:
            raise resend.validation_error("The batch must be a non-empty JSON array of emails.")
        if len(data) > resend.MAX_BATCH_EMAILS:
            raise resend.validation_error(
                f"Too many emails in the batch: {len(data)}; the limit is {resend.MAX_BATCH_EMAILS}."
            )
        parsed_items: list[resend.ParsedEmail | None] = []
        errors: list[dict[str, Any]] = []
        for index, item in enumerate(data):
            try:
                parsed_items.append(resend.parse_email(item, in_batch=True))
            except resend.ResendError as exc:
                if not permissive:
                    # Strict (the default): one invalid email refuses the whole batch.
                    raise resend.ResendError(exc.status, exc.name, f"emails[{index}]: {exc.message}") from exc
                parsed_items.append(None)
                errors.append({"index": index, "message": exc.message})
        # `data` lists the created emails in request order; permissive mode adds `errors`
        # (index into the request) for the ones it could not create.
        records = [
            self._resend_record(parsed, "emails/batch", received_at, idempotency_key)
            for parsed in parsed_items
            if parsed is not None
        ]
        response: dict[str, Any] = {"data": [{"id": r["message_id"]} for r in records]}
        if permissive:
            response["errors"] = errors
        return 200, response, records, len(errors)

    def _resend_record(
        self, parsed: resend.ParsedEmail, endpoint: str, received_at: str, idempotency_key: str | None
    ) -> dict[str, Any]:
        # Anymail's Resend backend carries metadata and tags in X-Metadata and X-Tags.
        metadata = resend.header_json(parsed.headers, "X-Metadata")
        tags = resend.header_json(parsed.headers, "X-Tags")
        data = parsed.raw
        record: dict[str, Any] = {
            "index": None,
            "message_id": postmark.new_message_id(),
            "esp": "resend",
            "endpoint": endpoint,
            "received_at": received_at,
            "idempotency_key": idempotency_key,
            "from": parsed.from_,
            "to": parsed.to,
            "cc": parsed.cc,
            "bcc": parsed.bcc,
            "inactive": [],
            "subject": data.get("subject"),
            "headers": {k: v for k, v in parsed.headers.items() if k.lower() not in ("x-metadata", "x-tags")},
            "metadata": metadata if isinstance(metadata, dict) else {},
            "tag": tags[0] if isinstance(tags, list) and tags else None,
            "message_stream": None,
            "_recipients": frozenset(a.lower() for a in parsed.to + parsed.cc + parsed.bcc),
        }
        if self.record_bodies:
            record["html"] = data.get("html")
            record["text"] = data.get("text")
            record["raw"] = data
        return record

    def _accept_one(
        self, data: Any, endpoint: str, received_at: str
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        try:
            message = postmark.parse_message(data)
        except postmark.PostmarkError as exc:
            return exc.body(), None
        inactive = [a.addr_spec.lower() for a in message.recipients if a.is_inactive]
        if len(inactive) == len(message.recipients):
            return postmark.error_body(
                postmark.ERROR_INACTIVE_RECIPIENT, postmark.inactive_message(inactive)
            ), None
        message_id = postmark.new_message_id()
        headers = data.get("Headers") or []
        record: dict[str, Any] = {
            "index": None,
            "message_id": message_id,
            "esp": "postmark",
            "endpoint": endpoint,
            "received_at": received_at,
            "idempotency_key": None,
            "from": message.from_.addr_spec,
            "to": [a.addr_spec for a in message.to],
            "cc": [a.addr_spec for a in message.cc],
            "bcc": [a.addr_spec for a in message.bcc],
            "inactive": inactive,
            "subject": data.get("Subject"),
            "headers": {h["Name"]: h.get("Value") for h in headers},
            "metadata": data.get("Metadata") or {},
            "tag": data.get("Tag"),
            "message_stream": data.get("MessageStream") or postmark.DEFAULT_MESSAGE_STREAM,
            "_recipients": frozenset(a.addr_spec.lower() for a in message.recipients),
        }
        if self.record_bodies:
            record["html"] = data.get("HtmlBody")
            record["text"] = data.get("TextBody")
            record["raw"] = data
        text = postmark.partially_inactive_message(inactive) if inactive else "OK"
        return postmark.accepted_body(
            message_id=message_id, to_header=data.get("To"), submitted_at=received_at, message=text
        ), record

    def _reserve_webhooks(self, records: list[dict[str, Any]]) -> list[list[PayloadFactory]]:
        """The webhooks the accepted messages' recipients script, counted as pending."""
        if not records or self._webhooks.url is None:
            return []
        jobs: list[list[PayloadFactory]] = []
        for record in records:
            if record["esp"] != "postmark":
                continue  # the webhooks are Postmark's format; Resend's are not simulated
            seen: set[str] = set()
            for recipient in record["to"] + record["cc"] + record["bcc"]:
                if recipient.lower() in record["inactive"] or recipient.lower() in seen:
                    continue
                seen.add(recipient.lower())
                script = postmark.script_for(recipient)
                if script == (("Delivery", None),) and not self.delivery_webhooks:
                    continue
                jobs.append(
                    [
                        functools.partial(
                            postmark.webhook_payload, record_type, record, recipient, bounce_type=kind
                        )
                        for record_type, kind in script
                    ]
                )
        return self._webhooks.reserve(jobs)


@dataclass(frozen=True)
class _IdempotentRequest:
    fingerprint: str  # SHA-256 of the path and body: "same request" as Resend compares it
    at: float  # monotonic time of the answer (kept IDEMPOTENCY_TTL_SECONDS)
    answer: tuple[int, Any] | None  # None while the first request is still in flight


def _public(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if not k.startswith("_")}
