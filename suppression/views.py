"""Recipient pages: the unsubscribe link with its RFC 8058 one-click POST, and the
preference centre. No login and no cookies: the signed token in the URL is the credential.

Why the forms are csrf_exempt: CSRF protection stops a third-party site from making a
visitor's browser send a request that the visitor's cookies authorise. Nothing here is
authorised by a cookie; every request is authorised by the signed token in its URL, which
only the recipient has. A forged cross-site POST would need that token, and whoever has
it can POST directly anyway. A CSRF cookie would also break the one-click POST on the
same URL, which RFC 8058 has mail receivers send without cookies or any other context.
The pages set no cookie at all, are never cached, and cannot be framed
(XFrameOptionsMiddleware), so the confirmation button cannot be clickjacked.
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, QueryDict
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods
from django_ratelimit.core import is_ratelimited

from suppression.selectors import recipient_preferences, recipient_unsubscribed, topic_name
from suppression.services import (
    SOURCE_ONE_CLICK,
    SOURCE_PREFERENCES,
    SOURCE_UNSUBSCRIBE_LINK,
    recipient_preferences_save,
    recipient_unsubscribe,
)
from suppression.unsubscribe import InvalidLink, RecipientLink, link_read

logger = logging.getLogger(__name__)

RATE_LIMIT_GROUP = "suppression:recipient-pages"
ONE_CLICK_BODY = ("List-Unsubscribe", "One-Click")  # RFC 8058 section 3.2


def _verified(token: str) -> RecipientLink | None:
    try:
        return link_read(token)
    except InvalidLink:
        return None


def _client_ip(request: HttpRequest) -> str | None:
    """For the consent ledger's evidence. REMOTE_ADDR only, as in consent_views:
    X-Forwarded-For is client-controlled unless a trusted proxy rewrites it (behind a
    proxy, have it set REMOTE_ADDR)."""
    return request.META.get("REMOTE_ADDR") or None


def _rate_limited(request: HttpRequest) -> bool:
    """Per client IP (django-ratelimit; behind a proxy set RATELIMIT_IP_META_KEY)."""
    try:
        return bool(
            is_ratelimited(
                request,
                group=RATE_LIMIT_GROUP,
                key="ip",
                rate=settings.MAILAUTO["RECIPIENT_RATE_LIMIT"],
                increment=True,
            )
        )
    except Exception:
        # The counters live in the cache (Redis). Without it we serve the page: an
        # outage of the cache must not stop anyone from unsubscribing.
        logger.warning("recipient page rate limit unavailable", exc_info=True)
        return False


def _form(request: HttpRequest) -> QueryDict:
    """The POST body. RFC 8058 allows multipart/form-data or urlencoded; a body that cannot
    be parsed is still a POST to an authentic link, and reads as empty."""
    try:
        return request.POST
    except Exception:
        logger.info("unparseable body on a recipient page", exc_info=True)
        return QueryDict("")


def _problem(
    request: HttpRequest, kind: str, status: int, token: str = "", link: RecipientLink | None = None
) -> HttpResponse:
    context: dict[str, Any] = {"kind": kind}
    if link is not None:
        context.update(_context(token, link))
    response = render(request, "suppression/link_problem.html", context, status=status)
    if status == 429:
        response["Retry-After"] = "60"
    return response


def _context(token: str, link: RecipientLink) -> dict[str, Any]:
    return {
        "link": link,
        "topic_name": topic_name(link.topic),
        "unsubscribe_path": reverse("suppression:unsubscribe", args=[token]),
        "preferences_path": None
        if link.preferences_expired
        else reverse("suppression:preferences", args=[token]),
    }


@csrf_exempt  # token-authorised, and RFC 8058's one-click POST carries no cookies: see above
@never_cache
@require_http_methods(["GET", "HEAD", "POST"])
def unsubscribe(request: HttpRequest, token: str) -> HttpResponse:
    """GET: a confirmation page, which changes nothing (mail scanners and link previews
    fetch every URL in a message). POST: unsubscribe at once and answer 200 with a page.

    The POST is either the RFC 8058 one-click request from a mail client (body
    "List-Unsubscribe=One-Click") or the page's own button (scope=topic or scope=all).
    It never redirects: RFC 8058 section 3.1 forbids answering the one-click POST with
    one, and many clients would turn the redirected POST into a GET.
    """
    link = _verified(token)
    authentic_opt_out = link is not None and request.method == "POST"
    # Over the limit, an authentic opt-out is still honoured: a mailbox provider's
    # one-click POSTs for many recipients come from a few addresses, and dropping one
    # would leave someone subscribed against their will. Everything else gets a 429.
    if _rate_limited(request) and not authentic_opt_out:
        return _problem(request, "rate_limited", 429)
    if link is None:
        return _problem(request, "invalid", 400)
    context = _context(token, link)

    if request.method != "POST":
        context["already"] = recipient_unsubscribed(email=link.email, topic=link.topic)
        context["left_all"] = recipient_unsubscribed(email=link.email, topic="")
        return render(request, "suppression/unsubscribe_confirm.html", context)

    data = _form(request)
    scope = data.get("scope")
    one_click = data.get(ONE_CLICK_BODY[0]) == ONE_CLICK_BODY[1] or scope is None
    topic = "" if scope == "all" else link.topic
    source = SOURCE_ONE_CLICK if one_click else SOURCE_UNSUBSCRIBE_LINK
    recipient_unsubscribe(
        email=link.email,
        topic=topic,
        source=source,
        message_id=link.message_id,
        ip=_client_ip(request),
        user_agent=request.headers.get("User-Agent", ""),
    )
    logger.info(
        "recipient unsubscribed",
        extra={"message_id": link.message_id, "topic": topic, "source": source},
    )
    context["unsubscribed_from"] = topic_name(topic)
    context["all"] = topic == ""
    return render(request, "suppression/unsubscribed.html", context)


@csrf_exempt  # token-authorised: see the module docstring
@never_cache
@require_http_methods(["GET", "HEAD", "POST"])
def preferences(request: HttpRequest, token: str) -> HttpResponse:
    """The preference centre: every public topic with a checkbox, and "leave all"."""
    if _rate_limited(request):
        return _problem(request, "rate_limited", 429)
    link = _verified(token)
    if link is None:
        return _problem(request, "invalid", 400)
    if link.preferences_expired:
        # Too old to show or change choices (it could opt the address back in); it can
        # still unsubscribe, which the page offers.
        return _problem(request, "expired", 410, token, link)

    if request.method == "POST":
        data = _form(request)
        changes = recipient_preferences_save(
            email=link.email,
            subscribed=set(data.getlist("topics")),
            leave_all=data.get("leave_all") == "on",
            shown=set(data.getlist("shown")),
            source=SOURCE_PREFERENCES,
            ip=_client_ip(request),
            user_agent=request.headers.get("User-Agent", ""),
        )
        logger.info(
            "recipient preferences saved",
            extra={
                "message_id": link.message_id,
                "opted_out": changes.opted_out,
                "opted_in": changes.opted_in,
            },
        )
        # Post/redirect/get, so that reloading the page does not post the form again.
        response = HttpResponse(status=303)
        response["Location"] = f"{request.path}?saved=1"
        return response

    context = _context(token, link)
    context["preferences"] = recipient_preferences(email=link.email)
    context["saved"] = request.GET.get("saved") == "1"
    return render(request, "suppression/preferences.html", context)
