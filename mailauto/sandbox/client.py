"""A small client for the ESP sandbox's control API (`/_sandbox/`), for tests and
benchmarks that talk to a sandbox running in another process."""

from __future__ import annotations

import time
from typing import Any, Self

import requests

from mailauto.sandbox.server import SandboxError


class SandboxClient:
    def __init__(self, base_url: str, *, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        self.timeout = timeout
        self._session = requests.Session()

    def _call(
        self, method: str, route: str, *, params: dict[str, Any] | None = None, json: Any = None
    ) -> Any:
        response = self._session.request(
            method, f"{self.base_url}_sandbox/{route}", params=params, json=json, timeout=self.timeout
        )
        if response.status_code >= 400:
            try:
                message = response.json().get("error", response.text)
            except ValueError:
                message = response.text
            raise SandboxError(response.status_code, message)
        return response.json()

    def health(self) -> dict[str, Any]:
        return self._call("GET", "health")

    def messages(
        self, to: str | None = None, since_index: int = 0, limit: int | None = None
    ) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"since_index": since_index}
        if to:
            params["to"] = to
        if limit is not None:
            params["limit"] = limit
        return self._call("GET", "messages", params=params)

    def message(self, message_id: str) -> dict[str, Any]:
        return self._call("GET", f"messages/{message_id}")

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "stats")

    def reset(self) -> None:
        self._call("DELETE", "messages")

    def faults(self) -> dict[str, Any]:
        return self._call("GET", "faults")

    def set_faults(self, **faults: Any) -> dict[str, Any]:
        return self._call("POST", "faults", json=faults)

    def clear_faults(self) -> dict[str, Any]:
        return self._call("DELETE", "faults")

    def configure(self, **config: Any) -> dict[str, Any]:
        """webhook_url, webhook_auth ("user:pass") and/or delivery_webhooks."""
        return self._call("POST", "config", json=config)

    def trigger_webhook(self, message_id: str, record_type: str, **options: Any) -> dict[str, Any]:
        """options: recipient, bounce_type, overrides (dict merged into the payload), wait."""
        return self._call(
            "POST", "webhooks", json={"message_id": message_id, "record_type": record_type, **options}
        )

    def webhooks(self) -> list[dict[str, Any]]:
        return self._call("GET", "webhooks")

    def wait_for(
        self, count: int, timeout: float = 10.0, *, to: str | None = None, poll_interval: float = 0.05
    ) -> list[dict[str, Any]]:
        """Poll until at least `count` messages (to `to`, if given) are recorded; return
        them all. Raise TimeoutError if that does not happen within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            messages = self.messages(to=to)
            if len(messages) >= count:
                return messages
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{len(messages)} of {count} messages recorded after {timeout}s")
            time.sleep(poll_interval)

    def wait_for_webhooks(self, timeout: float = 10.0, *, poll_interval: float = 0.05) -> dict[str, Any]:
        """Poll until no webhook is queued or in flight; return the stats."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if stats["webhooks_pending"] == 0:
                return stats
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{stats['webhooks_pending']} webhooks still pending after {timeout}s")
            time.sleep(poll_interval)

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
