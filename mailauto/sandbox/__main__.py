"""`python -m mailauto.sandbox`: the ESP sandbox without setting up Django, for a fast start.

Defaults mirror the ones mailauto/settings.py derives from the same environment
variables, so the standalone sandbox and the app agree without configuration.
`manage.py esp_sandbox` is the documented entry point and reads the settings instead.
"""

from __future__ import annotations

import argparse
import os

from mailauto.sandbox import cli


def main(argv: list[str] | None = None) -> None:
    site_url = os.environ.get("SITE_URL", "http://127.0.0.1:8000").rstrip("/")
    parser = argparse.ArgumentParser(prog="python -m mailauto.sandbox", description=__doc__)
    cli.add_arguments(
        parser,
        defaults={
            "port": int(os.environ.get("ESP_SANDBOX_PORT", "8025")),
            "server_token": os.environ.get("ANYMAIL_POSTMARK_SERVER_TOKEN", "sandbox-server-token"),
            "webhook_url": site_url + cli.WEBHOOK_PATH,
            "webhook_auth": os.environ.get("MAILAUTO_WEBHOOK_SECRET", "sandbox:sandbox-webhook-secret"),
        },
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG logs one line per request")
    options = vars(parser.parse_args(argv))
    cli.configure_logging(options["log_level"])
    cli.run_forever(cli.server_from_options(options), lambda line: print(line, flush=True))


if __name__ == "__main__":
    main()
