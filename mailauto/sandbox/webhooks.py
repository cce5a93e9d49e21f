"""Posting Postmark-format webhooks from the ESP sandbox back to the app: a pool of daemon
worker threads with kept-alive connections, retries with backoff, and counters."""

from __future__ import annotations

import base64
import http.client
import json
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

logger = logging.getLogger("mailauto.sandbox")

# One job is the webhooks for one recipient of one message, posted in order by one
# worker, so that Delivery always reaches the app before the Open or Click it precedes.
# Payloads are built lazily, just before they are posted, so their timestamps are real.
PayloadFactory = Callable[[], dict[str, Any]]


class _ConnectionCache(threading.local):
    def __init__(self) -> None:
        self.conns: dict[tuple[str, str], http.client.HTTPConnection] = {}


class WebhookDispatcher:
    def __init__(
        self,
        *,
        url: str | None,
        auth: str | None,
        workers: int = 8,
        retries: int = 3,
        backoff_s: float = 0.5,
        timeout_s: float = 10.0,
        keep_payloads: bool = True,
    ) -> None:
        self.workers = workers
        self.retries = retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.keep_payloads = keep_payloads
        self._url: str | None = None
        self._auth_header: str | None = None
        self.configure(url=url, auth=auth)
        self._queue: queue.SimpleQueue[list[PayloadFactory] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._local = _ConnectionCache()
        self._cond = threading.Condition()
        self._pending = 0
        self._counts = {"queued": 0, "sent": 0, "failed": 0, "attempts_failed": 0, "retried": 0, "skipped": 0}
        self._log: list[dict[str, Any]] = []

    # --- configuration and lifecycle -------------------------------------------------

    @property
    def url(self) -> str | None:
        return self._url

    def configure(self, *, url: str | None, auth: str | None) -> None:
        self._url = url or None
        self._auth_header = "Basic " + base64.b64encode(auth.encode()).decode() if auth else None

    def start(self) -> None:
        self._stopping.clear()
        for n in range(self.workers):
            thread = threading.Thread(target=self._run, name=f"esp-sandbox-webhooks-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stopping.set()
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=2)
        self._threads.clear()

    # --- work --------------------------------------------------------------------------

    def submit(self, job: list[PayloadFactory]) -> None:
        """Queue webhooks for posting; never blocks the caller on the network."""
        self.enqueue(self.reserve([job]))

    def reserve(self, jobs: list[list[PayloadFactory]]) -> list[list[PayloadFactory]]:
        """Count jobs as pending before they are queued.

        The send handler reserves before it answers and queues after, so that a client
        that has its answer and then waits for idle webhooks cannot find "nothing
        pending" in the gap between the two.
        """
        jobs = [job for job in jobs if job] if self._url is not None else []
        count = sum(len(job) for job in jobs)
        if count:
            with self._cond:
                self._pending += count
                self._counts["queued"] += count
        return jobs

    def enqueue(self, jobs: list[list[PayloadFactory]]) -> None:
        """Queue jobs returned by reserve()."""
        for job in jobs:
            self._queue.put(job)

    def deliver_now(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Post one webhook in the calling thread, with retries; return its log entry."""
        with self._cond:
            self._counts["queued"] += 1
        try:
            return self._deliver(payload)
        finally:
            # The caller is a short-lived request thread: do not leave its socket behind.
            for conn in self._local.conns.values():
                conn.close()
            self._local.conns.clear()

    def wait_idle(self, timeout: float) -> bool:
        """Block until no webhook is queued or in flight; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout=timeout)

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {
                **{f"webhooks_{k}": v for k, v in self._counts.items()},
                "webhooks_pending": self._pending,
            }

    def log(self) -> list[dict[str, Any]]:
        with self._cond:
            return list(self._log)

    def reset(self) -> None:
        with self._cond:
            self._counts = dict.fromkeys(self._counts, 0)
            self._log.clear()

    def _count(self, key: str) -> None:
        with self._cond:
            self._counts[key] += 1

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                break
            for factory in job:
                try:
                    if not self._stopping.is_set():
                        self._deliver(factory())
                except Exception:
                    # A worker that dies silently would stall every later webhook.
                    logger.exception("ESP sandbox: building or posting a webhook failed")
                finally:
                    with self._cond:
                        self._pending -= 1
                        self._cond.notify_all()
        for conn in self._local.conns.values():
            conn.close()

    def _deliver(self, payload: dict[str, Any]) -> dict[str, Any]:
        url, auth_header = self._url, self._auth_header
        entry: dict[str, Any] = {
            "record_type": payload.get("RecordType"),
            "message_id": payload.get("MessageID"),
            "recipient": payload.get("Recipient") or payload.get("Email"),
            "url": url,
            "status": "skipped",
            "attempts": 0,
            "http_status": None,
            "error": None,
        }
        if self.keep_payloads:
            entry["payload"] = payload
        if url is None:  # webhooks were switched off after this one was queued
            self._finish(entry, "skipped")
            return entry
        body = json.dumps(payload).encode()
        for attempt in range(self.retries + 1):
            if attempt:
                self._count("retried")
                # Postmark retries over hours; compressed here, but still backing off so a
                # struggling app is not hammered. Event.wait lets stop() cut it short.
                if self._stopping.wait(self.backoff_s * 2 ** (attempt - 1)):
                    break
            entry["attempts"] += 1
            try:
                status = self._post(url, auth_header, body)
            except (OSError, http.client.HTTPException) as exc:
                entry["http_status"], entry["error"] = None, repr(exc)
            else:
                entry["http_status"], entry["error"] = status, None
                if 200 <= status < 300:
                    self._finish(entry, "sent")
                    return entry
                if status == 403:
                    # Postmark stops retrying a webhook its endpoint answers with 403.
                    self._count("attempts_failed")
                    break
            self._count("attempts_failed")
            logger.info(
                "ESP sandbox: %s webhook for %s attempt %d failed (%s)",
                entry["record_type"],
                entry["message_id"],
                entry["attempts"],
                entry["error"] or entry["http_status"],
            )
        self._finish(entry, "failed")
        return entry

    def _finish(self, entry: dict[str, Any], status: str) -> None:
        entry["status"] = status
        with self._cond:
            self._counts[status] += 1
            self._log.append(entry)

    def _post(self, url: str, auth_header: str | None, body: bytes) -> int:
        parts = urlsplit(url)
        key = (parts.scheme, parts.netloc)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "Postmark",
            "Content-Length": str(len(body)),
        }
        if auth_header:
            headers["Authorization"] = auth_header
        conn = self._local.conns.get(key)
        if conn is not None:
            try:
                return self._exchange(conn, key, path, body, headers)
            except (http.client.HTTPException, ConnectionError):
                # The app may close a kept-alive connection while it idles; that is not a
                # failed delivery, so try once more on a fresh connection.
                pass
        conn_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = conn_class(parts.netloc, timeout=self.timeout_s)
        self._local.conns[key] = conn
        return self._exchange(conn, key, path, body, headers)

    def _exchange(
        self,
        conn: http.client.HTTPConnection,
        key: tuple[str, str],
        path: str,
        body: bytes,
        headers: dict[str, str],
    ) -> int:
        try:
            conn.request("POST", path, body=body, headers=headers)
            response = conn.getresponse()
            response.read()  # drain it, or the connection cannot be reused
        except BaseException:
            conn.close()
            self._local.conns.pop(key, None)
            raise
        if response.will_close:
            conn.close()
            self._local.conns.pop(key, None)
        return response.status
