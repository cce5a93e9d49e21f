"""`manage.py esp_sandbox`: run the local ESP sandbox (a Postmark-compatible server) in
the foreground, with defaults taken from the settings so the app talks to it as is."""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from mailauto.sandbox import DEFAULT_SERVER_TOKEN, cli


class Command(BaseCommand):
    help = "Run the local ESP sandbox: Postmark's send API on loopback, with webhooks back to the app."
    # The sandbox needs nothing the system checks verify, and should start fast.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        anymail = getattr(settings, "ANYMAIL", {})
        cli.add_arguments(
            parser,
            defaults={
                "port": getattr(settings, "ESP_SANDBOX_PORT", 8025),
                "server_token": anymail.get("POSTMARK_SERVER_TOKEN", DEFAULT_SERVER_TOKEN),
                "webhook_url": settings.SITE_URL.rstrip("/") + cli.WEBHOOK_PATH,
                "webhook_auth": anymail.get("WEBHOOK_SECRET"),
            },
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["verbosity"] >= 2:
            logging.getLogger("mailauto.sandbox").setLevel(logging.DEBUG)

        def write(line: str) -> None:
            self.stdout.write(line)
            self.stdout.flush()

        cli.run_forever(cli.server_from_options(options), write)
