"""Operations endpoints: /health/ for load balancers and for `make run` to wait on."""

from __future__ import annotations

from django.conf import settings
from django.core.mail import get_connection
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache

from mailauto.celery import app as celery_app


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
            healthy = False
            checks[name] = f"error: {type(err).__name__}: {err}"[:300]
    return JsonResponse(
        {"status": "ok" if healthy else "unhealthy", "checks": checks}, status=200 if healthy else 503
    )
