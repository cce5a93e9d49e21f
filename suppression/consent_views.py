"""The double opt-in confirmation page: GET shows what is being confirmed and changes
nothing (mail scanners prefetch links); POST records the grant."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods

from suppression.consent import InvalidConsentToken, consent_confirm, consent_request_for_token


def _client_ip(request: HttpRequest) -> str | None:
    # REMOTE_ADDR only: X-Forwarded-For is client-controlled unless a trusted proxy
    # rewrites it. Behind a proxy, have it set REMOTE_ADDR (or add a middleware that
    # trusts exactly that proxy) so the evidence records the real client.
    return request.META.get("REMOTE_ADDR") or None


# The signed token is the credential: only the inbox owner has it, so a cross-site POST
# could only confirm what its sender could confirm anyway. Exempt so that a recipient
# whose browser refuses cookies can still confirm.
@csrf_exempt
@never_cache
@require_http_methods(["GET", "POST"])
def consent_confirm_view(request: HttpRequest, token: str) -> HttpResponse:
    try:
        pending = consent_request_for_token(token=token)
    except InvalidConsentToken as err:
        return render(request, "suppression/consent/invalid.html", {"message": str(err)}, status=400)
    if request.method == "GET":
        return render(request, "suppression/consent/confirm.html", {"request_record": pending})
    try:
        granted = consent_confirm(
            token=token, ip=_client_ip(request), user_agent=request.headers.get("User-Agent", "")
        )
    except InvalidConsentToken as err:  # erased or changed between GET and POST
        return render(request, "suppression/consent/invalid.html", {"message": str(err)}, status=400)
    return render(request, "suppression/consent/confirmed.html", {"record": granted})
