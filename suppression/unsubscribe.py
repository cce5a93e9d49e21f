"""Recipient links: the signed token in unsubscribe and preference-centre URLs, the links
each message carries, and its RFC 8058 one-click unsubscribe headers.

The token is django.core.signing (HMAC-SHA256 keyed from SECRET_KEY, under a salt used
for nothing else) over the address, the topic and the message id, with the time it was
signed. Changing any of them breaks the signature, so a link can neither be forged nor
turned into one for another address or topic; the URL carries nothing else the views
read. RFC 8058 section 3.1 asks for exactly this: the URI must identify the recipient
and the list by itself (the one-click POST carries no other information) and should
contain a hard-to-forge component that the server verifies, so that spam with forged
unsubscribe links cannot unsubscribe people from our lists.

How long links work (decided here, configurable in MAILAUTO):
- Unsubscribing (the confirmation page, its button, the one-click POST) works for as
  long as the signature is valid, whatever the link's age. People unsubscribe from mail
  they kept for months, and mailbox providers show the one-click button on every
  message in the mailbox; refusing an authentic opt-out only turns it into a spam
  complaint. CAN-SPAM asks that the opt-out keeps working for at least 30 days after
  sending, Gmail and Yahoo that it is honoured within two days. Honouring a stale but
  authentic opt-out harms no one: the worst a leaked link can do is unsubscribe that one
  address from that one topic, which its owner can undo. Rotating SECRET_KEY without
  keeping the old key in SECRET_KEY_FALLBACKS revokes every link.
- The preference centre shows the address's choices and can opt it back in, which an
  old leaked link should not: it expires after PREFERENCES_LINK_MAX_AGE_DAYS (365 by
  default, so a year of archived mail keeps working). An expired link can still
  unsubscribe.

Transactional mail (receipts, password resets) gets a preference-centre link only: no
unsubscribe link and no List-Unsubscribe headers, because an unsubscribe does not stop
transactional mail (send_decision) and promising otherwise would be false. Gmail's
sender guidelines require one-click unsubscribe for marketing and subscribed messages
and name password resets and receipts as messages that are not.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core import signing
from django.urls import get_script_prefix, get_urlconf, reverse

from suppression.services import normalize_email

if TYPE_CHECKING:
    from campaigns.models import Message

# Used for nothing else: a value signed elsewhere with SECRET_KEY never verifies here.
TOKEN_SALT = "mailauto.suppression.recipient-link.v1"
MAX_TOKEN_CHARS = 1000  # ~3x the longest real token (a 254-character address)


class InvalidLink(Exception):
    """Not a token we signed (forged, tampered with, truncated or mangled)."""


@dataclass(frozen=True)
class RecipientLink:
    """What a verified token says."""

    email: str
    topic: str
    message_id: int | None
    preferences_expired: bool = False


def _signer() -> signing.TimestampSigner:
    return _signer_for(settings.SECRET_KEY, tuple(settings.SECRET_KEY_FALLBACKS))


@functools.lru_cache(maxsize=4)
def _signer_for(key: str, fallback_keys: tuple[str, ...]) -> signing.TimestampSigner:
    # One signer per key set (a signer keeps no state between calls), remembered by
    # the keys' values so an override or a rotation is seen on the next call.
    return signing.TimestampSigner(key=key, fallback_keys=list(fallback_keys), salt=TOKEN_SALT)


def link_token(*, email: str, topic: str, message_id: int | None) -> str:
    """A URL-safe token for one address, topic and message (base64 JSON, a timestamp and
    an HMAC, separated by colons). Signed, not encrypted: it shows the address, which is
    the recipient's own and already in the message."""
    return _signer().sign_object({"e": normalize_email(email), "t": topic, "m": message_id})


def preferences_max_age() -> timedelta:
    return timedelta(days=settings.MAILAUTO["PREFERENCES_LINK_MAX_AGE_DAYS"])


def link_read(token: str) -> RecipientLink:
    """Verify a token. Raises InvalidLink; an authentic token past the preference
    centre's lifetime is returned with preferences_expired=True (unsubscribing still works)."""
    if not token or len(token) > MAX_TOKEN_CHARS:
        raise InvalidLink("missing or oversized token")
    signer = _signer()
    expired = False
    try:
        try:
            data: Any = signer.unsign_object(token, max_age=preferences_max_age())
        except signing.SignatureExpired:
            data = signer.unsign_object(token)
            expired = True
    except (signing.BadSignature, ValueError, TypeError, UnicodeError) as err:
        raise InvalidLink(str(err)) from err
    if not isinstance(data, dict):
        raise InvalidLink("unexpected payload")
    email, topic, message_id = data.get("e"), data.get("t"), data.get("m")
    if not (isinstance(email, str) and "@" in email and isinstance(topic, str)):
        raise InvalidLink("unexpected payload")
    if message_id is not None and not isinstance(message_id, int):
        raise InvalidLink("unexpected payload")
    return RecipientLink(email=email, topic=topic, message_id=message_id, preferences_expired=expired)


# What a signed token is made of (base64url, and ":" between its parts): reverse()
# leaves all of it as it is, so the URL is the same around any token.
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_\-:]+")
_TOKEN_MARK = "TOKEN"


@functools.lru_cache(maxsize=16)
def _url_around_token(name: str, site_url: str, urlconf: str | None, script_prefix: str) -> tuple[str, str]:
    """(before, after) the token in SITE_URL + reverse(name, args=[token]): reverse()
    is most of the cost of a message's links, and its answer depends only on these
    arguments (the script prefix is read by reverse() itself; no pattern here is
    translated). Remembered by their values, so overrides are seen on the next call."""
    before, _, after = reverse(name, args=[_TOKEN_MARK], urlconf=urlconf).rpartition(_TOKEN_MARK)
    return site_url + before, after


def _url_context() -> tuple[str, str, str]:
    """What a token URL depends on besides the token: SITE_URL, the URLconf in use and
    the script prefix (both per thread, set by a request)."""
    return settings.SITE_URL, get_urlconf() or settings.ROOT_URLCONF, get_script_prefix()


def _token_url(name: str, token: str, context: tuple[str, str, str] | None = None) -> str:
    if not _TOKEN_CHARS.fullmatch(token):  # not one of our tokens: let reverse() quote it
        return settings.SITE_URL + reverse(name, args=[token])
    before, after = _url_around_token(name, *(context or _url_context()))
    return before + token + after


def unsubscribe_url(token: str) -> str:
    """The confirmation page (GET) and the one-click target (POST): one URL, the one in
    List-Unsubscribe, which the mail receiver POSTs to (RFC 8058 section 3.2)."""
    return _token_url("suppression:unsubscribe", token)


def preferences_url(token: str) -> str:
    return _token_url("suppression:preferences", token)


def message_links(*, message: Message) -> dict[str, str]:
    """The links a template and the layout may show: unsubscribe_url (marketing only)
    and preferences_url (every message)."""
    # A transactional purpose is not something one can unsubscribe from, so its token
    # names no topic: if it is ever used to unsubscribe, it offers all marketing.
    topic = "" if message.transactional else message.purpose
    token = link_token(email=message.to_email, topic=topic, message_id=message.pk)
    context = _url_context()
    links = {"preferences_url": _token_url("suppression:preferences", token, context)}
    if not message.transactional:
        links["unsubscribe_url"] = _token_url("suppression:unsubscribe", token, context)
    return links


def message_headers(*, message: Message, links: dict[str, str]) -> dict[str, str]:
    """RFC 2369 List-Unsubscribe and RFC 8058 List-Unsubscribe-Post, for marketing mail.

    RFC 8058 section 3.1: List-Unsubscribe must contain one HTTPS URI and
    List-Unsubscribe-Post the single pair "List-Unsubscribe=One-Click". The POST header
    is only sent with an https URL (SITE_URL): a one-click signal pointing at plain http
    is what the RFC rules out. Both headers must be covered by the DKIM signature
    (section 4); that is the ESP's signing configuration, not ours. No mailto: URI is
    offered, because nothing here reads a mailbox.
    """
    url = links.get("unsubscribe_url")
    if message.transactional or not url:
        return {}
    headers = {"List-Unsubscribe": f"<{url}>"}
    if url.startswith("https://"):
        headers["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    return headers
