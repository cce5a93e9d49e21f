"""Operations endpoints: /health/ for load balancers and `make run`, /metrics for Prometheus."""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.core.mail import get_connection
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils.crypto import constant_time_compare
from django.views.decorators.cache import never_cache

from mailauto.celery import app as celery_app

logger = logging.getLogger(__name__)


def _check_database() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return "ok"


def _check_broker() -> str:
    with celery_app.connection_for_write() as conn:
        # One attempt with a short timeout: a health check must answer fast.
        conn.ensure_connection(max_retries=1, interval_start=0, timeout=2)
    return "ok"


def _check_esp() -> str:
    get_connection()  # instantiating the backend validates its required settings
    return f"ok ({settings.ESP_NAME})"


@never_cache
def health(request: HttpRequest) -> JsonResponse:
    checks: dict[str, str] = {}
    healthy = True
    for name, check in (("database", _check_database), ("broker", _check_broker), ("esp", _check_esp)):
        try:
            checks[name] = check()
        except Exception as err:
            # Public endpoint: say which check failed, keep hosts and users in the log.
            logger.warning("health check %s failed", name, exc_info=True)
            healthy = False
            checks[name] = f"error: {type(err).__name__}"
    return JsonResponse(
        {"status": "ok" if healthy else "unhealthy", "checks": checks}, status=200 if healthy else 503
    )


def _metric_lines() -> list[str]:
    # Imported here so that /health/ does not depend on the campaigns app.
    from campaigns.models import Message, OutboxEvent
    from mailauto.lib import metrics as m

    lines: list[str] = []

    def gauge(name: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
        lines.append(f"# HELP mailauto_{name} {help_text}")
        lines.append(f"# TYPE mailauto_{name} gauge")
        for labels, value in samples:
            lines.append(f"mailauto_{name}{_labels(labels)} {value:g}")

    def counter(name: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
        lines.append(f"# HELP mailauto_{name} {help_text}")
        lines.append(f"# TYPE mailauto_{name} counter")
        for labels, value in samples:
            lines.append(f"mailauto_{name}{_labels(labels)} {value:g}")

    # Queue depths from the rows (the truth), restricted to unfinished statuses, which
    # the partial indexes cover, plus the dead letters.
    event_statuses = [OutboxEvent.Status.PENDING, OutboxEvent.Status.PROCESSING, OutboxEvent.Status.RETRYING]
    message_statuses = [
        Message.Status.QUEUED,
        Message.Status.CLAIMED,
        Message.Status.SENDING,
        Message.Status.UNKNOWN,
    ]
    event_counts = dict(_count_by_status(OutboxEvent, [*event_statuses, OutboxEvent.Status.DEAD]))
    message_counts = dict(_count_by_status(Message, [*message_statuses, Message.Status.DEAD]))
    gauge(
        "outbox_events",
        "Events not yet processed, by status.",
        [({"status": s}, event_counts.get(s, 0)) for s in event_statuses],
    )
    gauge(
        "messages_in_flight",
        "Messages not yet in a final state, by status.",
        [({"status": s}, message_counts.get(s, 0)) for s in message_statuses],
    )
    gauge(
        "dead_letters",
        "Events and messages that exhausted their retries.",
        [
            ({"kind": "event"}, event_counts.get(OutboxEvent.Status.DEAD, 0)),
            ({"kind": "message"}, message_counts.get(Message.Status.DEAD, 0)),
        ],
    )
    gauge("broker_queue_length", "Task messages waiting in the broker, by queue.", _broker_depths())
    counter(
        "sends_total",
        "Messages handled by the delivery engine, by outcome.",
        [
            ({"outcome": o}, m.read("sends_total", outcome=o))
            for o in ("sent", "retrying", "failed", "unknown", "suppressed", "cancelled", "dead")
        ],
    )
    counter(
        "retries_total",
        "Messages queued again after a retryable ESP error.",
        [({}, m.read("sends_total", outcome="retrying"))],
    )
    counter("esp_requests_total", "HTTP requests made to the ESP.", [({}, m.read("esp_requests_total"))])
    gauge(
        "rate_limit_per_second",
        "The shared send rate limit (requests/s): configured ceiling and current effective rate.",
        _rate_samples(),
    )

    name = "mailauto_event_to_esp_seconds"
    lines.append(f"# HELP {name} Time from emit() to the ESP accepting the message.")
    lines.append(f"# TYPE {name} histogram")
    for bound in m.LATENCY_BUCKETS:
        le = f"{bound:g}"
        lines.append(f'{name}_bucket{{le="{le}"}} {m.read("event_to_esp_seconds_bucket", le=le)}')
    lines.append(f'{name}_bucket{{le="+Inf"}} {m.read("event_to_esp_seconds_bucket", le="+Inf")}')
    lines.append(f"{name}_sum {m.read('event_to_esp_seconds_sum_ms') / 1000:g}")
    lines.append(f"{name}_count {m.read('event_to_esp_seconds_count')}")
    return lines


def _rate_samples() -> list[tuple[dict[str, str], float]]:
    from campaigns import throttle

    samples: list[tuple[dict[str, str], float]] = []
    try:
        for state in throttle.rate_states():
            samples.append(({"bucket": state.bucket, "kind": "ceiling"}, state.ceiling))
            samples.append(({"bucket": state.bucket, "kind": "effective"}, state.rate))
    except Exception:  # the store is down: say what is configured
        samples.append(({"bucket": "esp", "kind": "ceiling"}, settings.MAILAUTO["RATE_LIMIT_PER_SECOND"]))
    return samples


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


def _count_by_status(model: Any, statuses: list[str]) -> list[tuple[str, int]]:
    from django.db.models import Count

    return list(
        model.objects.filter(status__in=statuses).values_list("status").annotate(n=Count("id")).order_by()
    )


def _broker_depths() -> list[tuple[dict[str, str], float]]:
    if not settings.REDIS_URL:
        return []
    import redis

    try:
        client = redis.Redis.from_url(settings.CELERY_BROKER_URL, socket_timeout=1)
        return [({"queue": q}, client.llen(q)) for q in ("events", "sends", "webhooks", "housekeeping")]
    except Exception:
        return []


@never_cache
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus text format. Protected by MAILAUTO_METRICS_TOKEN when it is set."""
    token = settings.MAILAUTO.get("METRICS_TOKEN") or ""
    if token and not constant_time_compare(request.headers.get("Authorization", ""), f"Bearer {token}"):
        return HttpResponse("unauthorized\n", status=401, content_type="text/plain")
    body = "\n".join(_metric_lines()) + "\n"
    return HttpResponse(body, content_type="text/plain; version=0.0.4; charset=utf-8")
