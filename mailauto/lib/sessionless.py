"""Django's session, authentication and messages middleware, standing aside for machine
endpoints (settings.SESSIONLESS_PATH_PREFIXES: the ESP webhooks).

An ESP posting a webhook sends no cookie and has no user or flash messages, so for it
these three only cost time: about a tenth of the CPU of a webhook request
(bench/webhooks.py). On every other path they are Django's own, unchanged. They stay
subclasses of Django's classes, so the admin's system checks (admin.E408-E410) still
find them in MIDDLEWARE.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.auth.middleware import AuthenticationMiddleware as DjangoAuthenticationMiddleware
from django.contrib.messages.middleware import MessageMiddleware as DjangoMessageMiddleware
from django.contrib.sessions.middleware import SessionMiddleware as DjangoSessionMiddleware
from django.http import HttpRequest


def is_sessionless(request: HttpRequest) -> bool:
    return request.path_info.startswith(tuple(settings.SESSIONLESS_PATH_PREFIXES))


class SessionMiddleware(DjangoSessionMiddleware):
    def __call__(self, request: HttpRequest) -> Any:
        # (In async mode get_response returns an awaitable, which is what the caller
        # awaits: the shortcut works in both modes.)
        if is_sessionless(request):
            return self.get_response(request)
        return super().__call__(request)


class AuthenticationMiddleware(DjangoAuthenticationMiddleware):
    def __call__(self, request: HttpRequest) -> Any:
        if is_sessionless(request):
            return self.get_response(request)
        return super().__call__(request)


class MessageMiddleware(DjangoMessageMiddleware):
    def __call__(self, request: HttpRequest) -> Any:
        if is_sessionless(request):
            return self.get_response(request)
        return super().__call__(request)
