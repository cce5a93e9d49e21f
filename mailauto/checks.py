"""System checks for dangerous or missing configuration.

Ids are stable: mailauto.E001 … for errors, mailauto.W001 … for warnings. Deploy-only
checks run with `manage.py check --deploy`.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import Error, Tags, Warning, register

DEV_SECRET_KEY = "insecure-dev-key-set-SECRET_KEY-in-production"
SANDBOX_TOKEN = "sandbox-server-token"
SANDBOX_WEBHOOK_SECRET = "sandbox:sandbox-webhook-secret"


@register(Tags.compatibility)
def check_esp(app_configs: Any, **kwargs: Any) -> list:
    from django.core.mail import get_connection

    errors = []
    try:
        get_connection()
    except Exception as err:
        errors.append(
            Error(
                f"The ESP backend {settings.EMAIL_BACKEND!r} cannot start: {err}",
                hint="Set MAILAUTO_ESP and the ESP's ANYMAIL_<ESP>_<OPTION> variables, e.g. ANYMAIL_POSTMARK_SERVER_TOKEN.",
                id="mailauto.E001",
            )
        )
    secret = settings.ANYMAIL.get("WEBHOOK_SECRET")
    secrets = [secret] if isinstance(secret, str) else secret if isinstance(secret, list | tuple) else []
    # The webhook views refuse every post (503) when no entry is a non-empty string.
    if not any(isinstance(s, str) and s for s in secrets):
        errors.append(
            Error(
                "No webhook secret: ESP tracking webhooks would be accepted from anyone.",
                hint="Set MAILAUTO_WEBHOOK_SECRET to 'user:password' and configure the same in the ESP.",
                id="mailauto.E002",
            )
        )
    return errors


@register()
def check_time_zone(app_configs: Any, **kwargs: Any) -> list:
    if settings.TIME_ZONE != "UTC":
        return [
            Warning(
                f"TIME_ZONE is {settings.TIME_ZONE!r}; mailauto schedules (delays, warm-up days, beat) assume UTC.",
                hint="Leave TIME_ZONE unset (UTC). Show local times in the admin instead.",
                id="mailauto.W001",
            )
        ]
    return []


@register()
def check_mailauto_options(app_configs: Any, **kwargs: Any) -> list:
    options = settings.MAILAUTO
    errors = []
    positive = [
        "RATE_LIMIT_PER_SECOND",
        "RETRY_MAX_ATTEMPTS",
        "RETRY_BACKOFF_BASE_SECONDS",
        "RETRY_BACKOFF_MAX_SECONDS",
        "SEND_BATCH_SIZE",
        "SEND_LEASE_SECONDS",
        "EVENT_BATCH_SIZE",
        "EVENT_MAX_ATTEMPTS",
        "EVENT_LEASE_SECONDS",
        "SWEEP_INTERVAL_SECONDS",
        "SUPPRESSION_SYNC_INTERVAL_SECONDS",
        "TEMPLATE_CACHE_TTL_SECONDS",
        "UNKNOWN_RESEND_GRACE_SECONDS",
        "REPUTATION_MIN_VOLUME",
        "REPUTATION_WINDOW_HOURS",
        "CONSENT_CONFIRM_MAX_AGE_SECONDS",
    ]
    for name in positive:
        if not options[name] > 0:
            errors.append(
                Error(f"MAILAUTO[{name!r}] must be positive, not {options[name]!r}.", id="mailauto.E003")
            )
    if options["SUPPRESSION_STORAGE"] not in ("database", "redis"):
        errors.append(
            Error(
                f"MAILAUTO['SUPPRESSION_STORAGE'] must be 'database' or 'redis', not {options['SUPPRESSION_STORAGE']!r}.",
                id="mailauto.E004",
            )
        )
    return errors


@register(Tags.security, deploy=True)
def check_production_secrets(app_configs: Any, **kwargs: Any) -> list:
    errors = []
    if settings.SECRET_KEY == DEV_SECRET_KEY:
        errors.append(
            Error("SECRET_KEY is the development default.", hint="Set SECRET_KEY.", id="mailauto.E010")
        )
    if settings.ANYMAIL.get("WEBHOOK_SECRET") == SANDBOX_WEBHOOK_SECRET:
        errors.append(
            Error(
                "The webhook secret is the sandbox default.",
                hint="Set MAILAUTO_WEBHOOK_SECRET.",
                id="mailauto.E011",
            )
        )
    if any(value == SANDBOX_TOKEN for value in settings.ANYMAIL.values()):
        errors.append(
            Error(
                "The ESP is the local sandbox: no real email would be sent.",
                hint="Set MAILAUTO_ESP and its ANYMAIL_* credentials.",
                id="mailauto.E012",
            )
        )
    if settings.DEBUG:
        errors.append(Error("DEBUG is on.", id="mailauto.E013"))
    return errors


@register()
def check_rate_limits(app_configs: Any, **kwargs: Any) -> list:
    from campaigns.throttle import configuration_errors

    return [
        Error(
            message,
            hint="See the README, 'Rate limits, adaptive throttling and warm-up'.",
            id="mailauto.E005",
        )
        for message in configuration_errors()
    ]
