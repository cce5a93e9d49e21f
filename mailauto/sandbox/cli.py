"""Command-line options and the foreground run loop of the ESP sandbox, shared by
`manage.py esp_sandbox` and `python -m mailauto.sandbox`."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any

from mailauto.sandbox.server import DEFAULT_SERVER_TOKEN, SandboxServer

WEBHOOK_PATH = "/webhooks/postmark/tracking/"


def add_arguments(parser: argparse.ArgumentParser, *, defaults: Mapping[str, Any]) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument(
        "--port", type=int, default=defaults["port"], help="port (default: %(default)s; 0 = any)"
    )
    parser.add_argument(
        "--server-token",
        default=defaults.get("server_token", DEFAULT_SERVER_TOKEN),
        help="the Postmark server token (X-Postmark-Server-Token) and Resend API key (Bearer) to accept",
    )
    parser.add_argument(
        "--webhook-url",
        default=defaults.get("webhook_url"),
        help="where to post Postmark webhooks (default: %(default)s)",
    )
    parser.add_argument("--no-webhooks", action="store_true", help="post no webhooks at all")
    parser.add_argument(
        "--webhook-auth", default=defaults.get("webhook_auth"), help='basic auth for webhooks, "user:pass"'
    )
    parser.add_argument(
        "--no-delivery-webhooks",
        action="store_true",
        help="only recipient-scripted webhooks (bounce..., open...)",
    )
    parser.add_argument("--webhook-workers", type=int, default=8, help="threads posting webhooks")
    parser.add_argument("--webhook-retries", type=int, default=3, help="retries of a failed webhook")
    parser.add_argument("--latency-ms", type=float, default=0, help="added latency per send request")
    parser.add_argument("--faults", default=None, help="initial faults as JSON, e.g. '{\"rate_500\": 0.01}'")
    parser.add_argument("--no-bodies", action="store_true", help="do not keep bodies in memory (benchmarks)")


def server_from_options(options: Mapping[str, Any]) -> SandboxServer:
    sandbox = SandboxServer(
        host=options["host"],
        port=options["port"],
        server_token=options["server_token"],
        webhook_url=None if options["no_webhooks"] else options["webhook_url"],
        webhook_auth=options["webhook_auth"],
        latency_ms=options["latency_ms"],
        record_bodies=not options["no_bodies"],
        delivery_webhooks=not options["no_delivery_webhooks"],
        webhook_workers=options["webhook_workers"],
        webhook_retries=options["webhook_retries"],
    )
    if options.get("faults"):
        sandbox.set_faults(**json.loads(options["faults"]))
    return sandbox


def run_forever(sandbox: SandboxServer, write: Callable[[str], None]) -> None:
    """Start, announce, and serve until SIGINT or SIGTERM."""
    stopped = threading.Event()

    def _stop(signum: int, frame: object) -> None:
        stopped.set()

    # Procfile runners (honcho) stop processes with SIGTERM.
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    sandbox.start()
    config = sandbox.config()
    write(
        f"ESP sandbox (Postmark and Resend APIs) at {sandbox.url} (token {config['server_token']!r}); "
        f"webhooks to {config['webhook_url'] or 'nowhere'}; control API at {sandbox.url}_sandbox/"
    )
    try:
        while not stopped.wait(1.0):
            pass
    finally:
        sandbox.stop()


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
