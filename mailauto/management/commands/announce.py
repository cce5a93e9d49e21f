"""Wait until the web process answers /health/, then say where to look (for make run)."""

from __future__ import annotations

import signal
import time
from typing import Any

import requests
from django.conf import settings
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Wait for /health/ and print the admin URL and a command that emits a demo event; then idle."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--timeout", type=float, default=60.0)
        parser.add_argument(
            "--no-idle", action="store_true", help="Exit after printing (honcho stops all on exit)."
        )

    def handle(self, *args: Any, timeout: float, no_idle: bool, **options: Any) -> None:
        url = f"{settings.SITE_URL}/health/"
        deadline = time.monotonic() + timeout
        status = "no answer"
        while time.monotonic() < deadline:
            try:
                response = requests.get(url, timeout=2)
                status = response.json().get("status", "?")
                if response.status_code == 200:
                    break
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.5)
        sandbox = f"http://127.0.0.1:{settings.ESP_SANDBOX_PORT}/_sandbox/messages"
        self.stdout.write(
            "\n".join(
                [
                    "",
                    "=" * 72,
                    f"mailauto is up (health: {status})",
                    f"  Admin:            {settings.SITE_URL}/admin/   (user 'admin'; password printed above on first run)",
                    f"  Health:           {url}",
                    f"  ESP sandbox:      {sandbox}",
                    "  Emit a demo event:",
                    '    .venv/bin/python manage.py emit_event user.signed_up demo-user \'{"plan": "pro"}\'',
                    "=" * 72,
                    "",
                ]
            )
        )
        self.stdout.flush()
        if not no_idle:
            # honcho stops every process when one exits; stay until it stops us.
            signal.pause()
